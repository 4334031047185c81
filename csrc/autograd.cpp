// The norms' autograd in C++ (BatchNorm, with or without its residual add, InstanceNorm,
// LayerNorm, GroupNorm, and LayerNorm/RMSNorm with or without a residual add), for plain
// eager calls: fusednorm/autograd.py calls these when autograd.native_path() holds (no
// torch.func transform, forward-mode AD or Dynamo trace; a plain tensor that the compiled
// ops run), with or without gradients. They do what the Python Functions there do (the
// same forward op, saved tensors and backward op) the way ATen's own ops do it: the forward
// op runs below autograd and, when an input requires a gradient, the output gets a backward
// node that holds the saved tensors, without the Python autograd.Function machinery, which
// cost a small norm more than eager torch.nn's whole forward+backward. Ops go through the
// dispatcher, so the CPU or CUDA kernel is chosen by the input as for a call from Python.
//
// A backward whose result will be differentiated again (create_graph=True: grad mode is
// on in backward) has no kernel: it calls back into Python (set_recompute), which
// recomputes the output in differentiable torch ops, as the Python Functions do.
#include "autograd.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>

#include "common/norm_math.h"

namespace fusednorm {
namespace {

using at::Tensor;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using Opt = c10::optional<Tensor>;
using Mask = std::array<bool, 3>;
using Result3 = std::tuple<Tensor, Tensor, Tensor>;

template <class Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

Opt opt(const Tensor& t) { return t.defined() ? Opt(t) : c10::nullopt; }

// fusednorm.autograd._native_recompute; held for the life of the process (never
// released: the interpreter may be gone when static destructors run).
py::object* recompute_fn = nullptr;

// What every norm's backward takes besides its own arguments.
struct Saved {
  Tensor x, weight, bias, mean, rstd;
  int64_t act;
  double act_a, act_b;
};

// [dx, dweight, dbias] of a backward whose result will be differentiated again, from the
// Python recompute (None there: undefined here); args: the norm's own argument.
template <class Args>
variable_list recompute(const char* kind, const Tensor& dy, const Saved& s, Mask mask, double eps, const Args& args) {
  TORCH_CHECK(recompute_fn != nullptr, "fusednorm: the double backward's Python side is not registered");
  py::gil_scoped_acquire gil;
  variable_list out(3);
  try {
    py::tuple r = (*recompute_fn)(kind, dy, s.x, opt(s.weight), opt(s.bias), s.mean, s.rstd, mask, eps, s.act,
                                  s.act_a, s.act_b, args);
    for (size_t i = 0; i < 3; ++i) {
      if (!r[i].is_none()) out[i] = r[i].cast<Tensor>();
    }
  } catch (py::error_already_set& e) {
    TORCH_CHECK(false, e.what());
  }
  return out;
}

using BatchNormFwd = Result3(const Tensor&, const Opt&, const Opt&, const Opt&, const Opt&, bool, double, double,
                             int64_t, double, double, const Opt&);
using GroupNormBwd = Result3(const Tensor&, const Tensor&, int64_t, const Tensor&, const Tensor&, const Opt&,
                             const Opt&, int64_t, double, double, Mask);

// The four norms: their name, their own arguments (Args, handed to the recompute as
// `extra`) and the call of their backward op.
struct BatchNorm {
  static constexpr const char* kind = "batch_norm";
  static constexpr const char* node = "fusednorm::BatchNormBackward";
  using Args = bool;  // training
  static Result3 backward(const Tensor& dy, const Saved& s, Args training, Mask mask) {
    static auto op = find_op<Result3(const Tensor&, const Tensor&, const Opt&, const Opt&, const Tensor&,
                                     const Tensor&, bool, int64_t, double, double, Mask)>("fusednorm::batch_norm_bwd");
    return op.call(dy, s.x, opt(s.weight), opt(s.bias), s.mean, s.rstd, training, s.act, s.act_a, s.act_b, mask);
  }
};

struct LayerNorm {
  static constexpr const char* kind = "layer_norm";
  static constexpr const char* node = "fusednorm::LayerNormBackward";
  using Args = std::vector<int64_t>;  // normalized_shape
  static Result3 backward(const Tensor& dy, const Saved& s, const Args& shape, Mask mask) {
    static auto op = find_op<Result3(const Tensor&, const Tensor&, at::IntArrayRef, const Tensor&, const Tensor&,
                                     const Opt&, const Opt&, int64_t, double, double, Mask)>("fusednorm::layer_norm_bwd");
    return op.call(dy, s.x, shape, s.mean, s.rstd, opt(s.weight), opt(s.bias), s.act, s.act_a, s.act_b, mask);
  }
};

struct GroupNorm {
  static constexpr const char* kind = "group_norm";
  static constexpr const char* node = "fusednorm::GroupNormBackward";
  using Args = int64_t;  // num_groups
  static Result3 backward(const Tensor& dy, const Saved& s, Args groups, Mask mask) {
    static auto op = find_op<GroupNormBwd>("fusednorm::group_norm_bwd");
    return op.call(dy, s.x, groups, s.mean, s.rstd, opt(s.weight), opt(s.bias), s.act, s.act_a, s.act_b, mask);
  }
};

// InstanceNorm's backward is GroupNorm's with one group per channel (Args: the channels).
struct InstanceNorm : GroupNorm {
  static constexpr const char* kind = "instance_norm";
  static constexpr const char* node = "fusednorm::InstanceNormBackward";
};

// The backward node of a norm's output: gradients for its edges (x, weight, bias), none for
// an absent output gradient, the backward op for a first derivative, the Python recompute
// for one that will be differentiated again.
template <class Norm>
struct NormBackward final : torch::autograd::Node {
  SavedVariable x, weight, bias, mean, rstd;
  typename Norm::Args args;
  double eps = 0;
  int64_t act = 0;
  double act_a = 0, act_b = 0;

  std::string name() const override { return Norm::node; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* v : {&x, &weight, &bias, &mean, &rstd}) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list out(3);
    const Tensor& dy = grads[0];
    if (!dy.defined()) return out;
    const Saved s{x.unpack(), weight.unpack(), bias.unpack(), mean.unpack(), rstd.unpack(), act, act_a, act_b};
    const Mask mask{task_should_compute_output(0), s.weight.defined() && task_should_compute_output(1),
                    s.bias.defined() && task_should_compute_output(2)};
    if (!at::GradMode::is_enabled()) {
      std::tie(out[0], out[1], out[2]) = Norm::backward(dy, s, args, mask);
    } else {
      out = recompute(Norm::kind, dy, s, mask, eps, args);
    }
    for (size_t i = 0; i < 3; ++i) {
      if (!mask[i]) out[i] = Tensor();  // the ops' empty placeholders
    }
    return out;
  }
};

// BatchNorm with a residual add, y = act(bn(x) + z), act none, ReLU or LeakyReLU with a
// non-negative slope (fusednorm/autograd_bn_add.py says why): dz = dy * act'(y), read off
// the saved output as torch's ReLU backward reads it, is z's gradient and the input of
// BatchNorm's backward without an activation. Edges: x, weight, bias, z.
struct BatchNormAddBackward final : torch::autograd::Node {
  SavedVariable x, weight, bias, mean, rstd, y;
  bool training = true;
  double eps = 0;
  int64_t act = 0;
  double slope = 0;
  c10::ScalarType residual_dtype = c10::ScalarType::Float;

  std::string name() const override { return "fusednorm::BatchNormAddBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* v : {&x, &weight, &bias, &mean, &rstd, &y}) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list out(4);
    const Tensor& dy = grads[0];
    if (!dy.defined()) return out;
    const Saved s{x.unpack(), weight.unpack(), bias.unpack(), mean.unpack(), rstd.unpack(), kNone, 0, 0};
    const Mask mask{task_should_compute_output(0), s.weight.defined() && task_should_compute_output(1),
                    s.bias.defined() && task_should_compute_output(2)};
    const bool need_z = task_should_compute_output(3);
    if (!(mask[0] || mask[1] || mask[2] || need_z)) return out;
    // ATen's own ReLU/LeakyReLU backward: one vectorised pass. y is detached: act' is
    // piecewise constant, only dz's dependence on dy is differentiated.
    const Tensor out_y = y.unpack(getptr()).detach();
    const Tensor dz = act == kNone ? dy
                      : (act == kLeakyRelu && slope != 0 ? at::leaky_relu_backward(dy, out_y, slope, true)
                                                         : at::threshold_backward(dy, out_y, 0));
    if (mask[0] || mask[1] || mask[2]) {
      if (!at::GradMode::is_enabled()) {
        std::tie(out[0], out[1], out[2]) = BatchNorm::backward(dz, s, training, mask);
      } else {
        variable_list g = recompute(BatchNorm::kind, dz, s, mask, eps, training);
        std::copy(g.begin(), g.end(), out.begin());
      }
      for (size_t i = 0; i < 3; ++i) {
        if (!mask[i]) out[i] = Tensor();
      }
    }
    if (need_z) out[3] = dz.to(residual_dtype);
    return out;
  }
};

// LayerNorm or RMSNorm of s = x + residual (of x alone without a residual, which is how
// RMSNorm runs): add_norm_fwd/bwd, as fusednorm/autograd_add.py's Function. Outputs y and,
// with a residual, s; edges x, residual, weight, bias. s's gradient reaches x and the
// residual unchanged: the backward op returns ds = the norm's input gradient + the gradient
// s receives as an output, then cast to each input's dtype.
struct AddNormBackward final : torch::autograd::Node {
  SavedVariable normalised, weight, bias, mean, rstd;  // normalised: s (an output) or x
  bool has_residual = false, rms = false;
  std::vector<int64_t> shape;
  double eps = 0;
  int64_t act = 0;
  double act_a = 0, act_b = 0;
  c10::ScalarType x_dtype = c10::ScalarType::Float, r_dtype = c10::ScalarType::Float;

  std::string name() const override { return "fusednorm::AddNormBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* v : {&normalised, &weight, &bias, &mean, &rstd}) v->reset_data();
  }

  // A parameter the backward op takes beside a normalised tensor of `dtype` (float32
  // parameters beside a 16-bit one; otherwise its dtype).
  static Tensor param_in(const Tensor& p, c10::ScalarType dtype) {
    const bool half = dtype == c10::ScalarType::Half || dtype == c10::ScalarType::BFloat16;
    if (!p.defined() || p.scalar_type() == dtype || (p.scalar_type() == c10::ScalarType::Float && half)) return p;
    return p.to(dtype);
  }

  variable_list apply(variable_list&& grads) override {
    static auto op = find_op<Result3(const Tensor&, const Opt&, const Tensor&, at::IntArrayRef, const Tensor&,
                                     const Tensor&, const Opt&, const Opt&, bool, int64_t, double, double, Mask)>(
        "fusednorm::add_norm_bwd");
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list out(4);
    const Tensor& dy = grads[0];
    const Tensor ds = has_residual ? grads[1] : Tensor();
    if (!dy.defined() && !ds.defined()) return out;
    const Saved sv{normalised.unpack(has_residual ? getptr() : nullptr), weight.unpack(), bias.unpack(),
                   mean.unpack(), rstd.unpack(), act, act_a, act_b};
    const bool need_x = task_should_compute_output(0), need_r = task_should_compute_output(1);
    const Mask mask{need_x || need_r, sv.weight.defined() && task_should_compute_output(2),
                    sv.bias.defined() && task_should_compute_output(3)};
    Tensor dsum, dw, db;
    if (!dy.defined()) {  // only the sum is used: its gradient passes through
      dsum = ds;
    } else if (at::GradMode::is_enabled()) {
      // The recompute's output is in s's dtype: y's gradient cast to it, as y's cast would.
      variable_list g = recompute(rms ? "rms_norm" : "layer_norm", dy.to(sv.x.scalar_type()), sv, mask, eps, shape);
      dsum = g[0];
      dw = g[1];
      db = g[2];
      if (ds.defined() && dsum.defined()) dsum = dsum + ds;
    } else {
      const c10::ScalarType dtype = sv.x.scalar_type();
      std::tie(dsum, dw, db) = op.call(dy, opt(ds), sv.x, shape, sv.mean, sv.rstd, opt(param_in(sv.weight, dtype)),
                                       opt(param_in(sv.bias, dtype)), rms, act, act_a, act_b, mask);
      dw = mask[1] ? dw.to(sv.weight.scalar_type()) : Tensor();
      db = mask[2] ? db.to(sv.bias.scalar_type()) : Tensor();
    }
    if (dsum.defined() && mask[0]) {
      if (need_x) out[0] = dsum.to(x_dtype);
      if (need_r) out[1] = dsum.to(r_dtype);
    }
    out[2] = mask[1] ? dw : Tensor();
    out[3] = mask[2] ? db : Tensor();
    return out;
  }
};

// y = the forward op's output, with a NormBackward as its gradient function when x, weight
// or bias requires a gradient (and grad mode is on).
template <class Norm, class Forward>
Tensor forward(const Tensor& x, const Opt& w, const Opt& b, typename Norm::Args args, double eps, int64_t act,
               double act_a, double act_b, Forward run) {
  Result3 out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = run();
  }
  const Tensor& y = std::get<0>(out);
  if (!torch::autograd::compute_requires_grad(x, w, b)) return y;
  auto node = c10::make_intrusive<NormBackward<Norm>>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, w, b));
  node->x = SavedVariable(x, false);
  node->weight = SavedVariable(w.value_or(Tensor()), false);
  node->bias = SavedVariable(b.value_or(Tensor()), false);
  node->mean = SavedVariable(std::get<1>(out), false);
  node->rstd = SavedVariable(std::get<2>(out), false);
  node->args = std::move(args);
  node->eps = eps;
  node->act = act;
  node->act_a = act_a;
  node->act_b = act_b;
  torch::autograd::set_history(y, node);
  return y;
}

Tensor batch_norm(const Tensor& x, const Opt& w, const Opt& b, const Opt& rm, const Opt& rv, bool training,
                  double momentum, double eps, int64_t act, double act_a, double act_b) {
  static auto op = find_op<BatchNormFwd>("fusednorm::batch_norm_fwd");
  return forward<BatchNorm>(x, w, b, training, eps, act, act_a, act_b, [&] {
    return op.call(x, w, b, rm, rv, training, momentum, eps, act, act_a, act_b, c10::nullopt);
  });
}

Tensor batch_norm_add(const Tensor& x, const Opt& w, const Opt& b, const Opt& rm, const Opt& rv, bool training,
                      double momentum, double eps, int64_t act, double act_a, double act_b, const Tensor& z) {
  static auto op = find_op<BatchNormFwd>("fusednorm::batch_norm_fwd");
  Result3 out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = op.call(x, w, b, rm, rv, training, momentum, eps, act, act_a, act_b, z);
  }
  const Tensor& y = std::get<0>(out);
  if (!torch::autograd::compute_requires_grad(x, w, b, z)) return y;
  auto node = c10::make_intrusive<BatchNormAddBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, w, b, z));
  node->x = SavedVariable(x, false);
  node->weight = SavedVariable(w.value_or(Tensor()), false);
  node->bias = SavedVariable(b.value_or(Tensor()), false);
  node->mean = SavedVariable(std::get<1>(out), false);
  node->rstd = SavedVariable(std::get<2>(out), false);
  node->training = training;
  node->eps = eps;
  node->act = act;
  node->slope = act_a;
  node->residual_dtype = z.scalar_type();
  torch::autograd::set_history(y, node);
  node->y = SavedVariable(y, true);  // an output of the node: saved after set_history
  return y;
}

// (y, s): s is add_norm_fwd's sum (an empty tensor without a residual).
std::tuple<Tensor, Tensor> add_norm(const Tensor& x, const Opt& residual, const Opt& w, const Opt& b,
                                    std::vector<int64_t> shape, bool rms, bool residual_in_fp32, double eps,
                                    int64_t act, double act_a, double act_b) {
  static auto op = find_op<std::tuple<Tensor, Tensor, Tensor, Tensor>(
      const Tensor&, const Opt&, at::IntArrayRef, const Opt&, const Opt&, double, bool, bool, int64_t, double,
      double)>("fusednorm::add_norm_fwd");
  std::tuple<Tensor, Tensor, Tensor, Tensor> out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = op.call(x, residual, shape, w, b, eps, rms, residual_in_fp32, act, act_a, act_b);
  }
  const auto& [y, s, mean, rstd] = out;
  if (!torch::autograd::compute_requires_grad(x, residual, w, b)) return {y, s};
  auto node = c10::make_intrusive<AddNormBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, residual, w, b));
  node->weight = SavedVariable(w.value_or(Tensor()), false);
  node->bias = SavedVariable(b.value_or(Tensor()), false);
  node->mean = SavedVariable(mean, false);
  node->rstd = SavedVariable(rstd, false);
  node->has_residual = residual.has_value();
  node->rms = rms;
  node->shape = shape;
  node->eps = eps;
  node->act = act;
  node->act_a = act_a;
  node->act_b = act_b;
  node->x_dtype = x.scalar_type();
  node->r_dtype = residual.has_value() ? residual->scalar_type() : x.scalar_type();
  if (residual.has_value()) {
    torch::autograd::set_history(std::vector<Tensor>{y, s}, node);
    node->normalised = SavedVariable(s, true);  // an output of the node: saved after set_history
  } else {
    torch::autograd::set_history(y, node);
    node->normalised = SavedVariable(x, false);
  }
  return {y, s};
}

Tensor instance_norm(const Tensor& x, const Opt& w, const Opt& b, const Opt& rm, const Opt& rv, double momentum,
                     double eps, int64_t act, double act_a, double act_b) {
  static auto op = find_op<Result3(const Tensor&, const Opt&, const Opt&, const Opt&, const Opt&, double, double,
                                   int64_t, double, double)>("fusednorm::instance_norm_fwd");
  return forward<InstanceNorm>(x, w, b, x.dim() > 1 ? x.size(1) : 0, eps, act, act_a, act_b, [&] {
    return op.call(x, w, b, rm, rv, momentum, eps, act, act_a, act_b);
  });
}

Tensor layer_norm(const Tensor& x, const Opt& w, const Opt& b, std::vector<int64_t> shape, double eps, int64_t act,
                  double act_a, double act_b) {
  static auto op = find_op<Result3(const Tensor&, at::IntArrayRef, const Opt&, const Opt&, double, int64_t, double,
                                   double)>("fusednorm::layer_norm_fwd");
  auto run = [&] { return op.call(x, shape, w, b, eps, act, act_a, act_b); };
  return forward<LayerNorm>(x, w, b, shape, eps, act, act_a, act_b, run);
}

Tensor group_norm(const Tensor& x, const Opt& w, const Opt& b, int64_t groups, double eps, int64_t act,
                  double act_a, double act_b) {
  static auto op = find_op<Result3(const Tensor&, int64_t, const Opt&, const Opt&, double, int64_t, double,
                                   double)>("fusednorm::group_norm_fwd");
  return forward<GroupNorm>(x, w, b, groups, eps, act, act_a, act_b, [&] {
    return op.call(x, groups, w, b, eps, act, act_a, act_b);
  });
}

}  // namespace

void bind_autograd(py::module_& m) {
  m.def("set_recompute", [](py::object fn) { recompute_fn = new py::object(std::move(fn)); },
        "The Python function the nodes' double backward calls (fusednorm.autograd._native_recompute)");
  // Each takes the arguments of its Function's forward in fusednorm/autograd.py (x, weight,
  // bias, then the norm's own) and returns y; the GIL is released while the op runs, as
  // torch's own ops release it.
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("batch_norm", &batch_norm, release());
  m.def("batch_norm_add", &batch_norm_add, release());
  m.def("instance_norm", &instance_norm, release());
  m.def("layer_norm", &layer_norm, release());
  m.def("group_norm", &group_norm, release());
  // add_norm_fwd's arguments in AddNormFunction.forward's order; returns (y, sum).
  m.def("add_norm", &add_norm, release());
}

}  // namespace fusednorm
