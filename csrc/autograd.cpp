// The four norms' autograd nodes in C++, for the plain eager path: fusednorm/autograd.py's
// apply() calls these when no torch.func transform, forward-mode AD or torch.compile is
// active and the compiled ops run the input. They do what the Python Functions there do
// (the same forward op, saved tensors and backward op) without the Python
// autograd.Function machinery, which cost a small norm more than eager torch.nn's whole
// forward+backward. Ops go through the dispatcher, so the CPU or CUDA kernel is chosen
// by the input as for a call from Python.
//
// A backward whose result will be differentiated again (create_graph=True: grad mode is
// on in backward) has no kernel: it calls back into Python (set_recompute), which
// recomputes the output in differentiable torch ops, as the Python Functions do.
#include "autograd.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

namespace fusednorm {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
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

// What every node saves: the input, the parameters and the forward op's statistics, the
// activation and eps, plus one norm-specific argument (`extra`, handed to the recompute).
Tensor save(AutogradContext* ctx, const Tensor& x, const Opt& w, const Opt& b, const Result3& out,
            double eps, int64_t act, double act_a, double act_b, c10::IValue extra) {
  ctx->save_for_backward({x, w.value_or(Tensor()), b.value_or(Tensor()), std::get<1>(out), std::get<2>(out)});
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["act"] = act;
  ctx->saved_data["act_a"] = act_a;
  ctx->saved_data["act_b"] = act_b;
  ctx->saved_data["extra"] = std::move(extra);
  return std::get<0>(out);
}

// The gradients of the forward's n_args arguments (x, weight and bias first): none for an
// absent output gradient, the backward op (`call`) for a first derivative, the Python
// recompute for a differentiable one.
template <class Call>
variable_list backward_of(AutogradContext* ctx, const char* kind, const variable_list& grads, size_t n_args,
                          Call call) {
  variable_list out(n_args);
  const Tensor& dy = grads[0];
  if (!dy.defined()) return out;
  const variable_list s = ctx->get_saved_variables();  // x, weight, bias, mean, rstd
  // An absent weight or bias has no edge: the bias's is 1 without a weight.
  const bool has_w = s[1].defined(), has_b = s[2].defined();
  const Mask mask{ctx->needs_input_grad(0), has_w && ctx->needs_input_grad(1),
                  has_b && ctx->needs_input_grad(has_w ? 2 : 1)};
  auto& d = ctx->saved_data;
  const int64_t act = d["act"].toInt();
  const double act_a = d["act_a"].toDouble(), act_b = d["act_b"].toDouble();
  if (!at::GradMode::is_enabled()) {
    std::tie(out[0], out[1], out[2]) = call(dy, s, act, act_a, act_b, mask);
  } else {
    TORCH_CHECK(recompute_fn != nullptr, "fusednorm: the double backward's Python side is not registered");
    py::gil_scoped_acquire gil;
    try {
      const c10::IValue& extra = d["extra"];
      py::object e = extra.isIntList() ? py::cast(extra.toIntVector())
                                       : (extra.isBool() ? py::cast(extra.toBool()) : py::cast(extra.toInt()));
      py::tuple r = (*recompute_fn)(kind, dy, s[0], opt(s[1]), opt(s[2]), s[3], s[4], mask, d["eps"].toDouble(),
                                    act, act_a, act_b, e);
      for (size_t i = 0; i < 3; ++i) {
        if (!r[i].is_none()) out[i] = r[i].cast<Tensor>();
      }
    } catch (py::error_already_set& e) {
      TORCH_CHECK(false, e.what());
    }
  }
  for (size_t i = 0; i < 3; ++i) {
    if (!mask[i]) out[i] = Tensor();  // empty placeholders of the ops, and unwanted gradients
  }
  return out;
}

struct BatchNormNode : torch::autograd::Function<BatchNormNode> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Opt& w, const Opt& b, const Opt& rm,
                        const Opt& rv, bool training, double momentum, double eps, int64_t act, double act_a,
                        double act_b) {
    static auto op = find_op<Result3(const Tensor&, const Opt&, const Opt&, const Opt&, const Opt&, bool, double,
                                     double, int64_t, double, double, const Opt&)>("fusednorm::batch_norm_fwd");
    at::AutoDispatchBelowADInplaceOrView guard;
    return save(ctx, x, w, b, op.call(x, w, b, rm, rv, training, momentum, eps, act, act_a, act_b, {}),
                eps, act, act_a, act_b, training);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = find_op<Result3(const Tensor&, const Tensor&, const Opt&, const Opt&, const Tensor&,
                                     const Tensor&, bool, int64_t, double, double, Mask)>("fusednorm::batch_norm_bwd");
    const bool training = ctx->saved_data["extra"].toBool();
    return backward_of(ctx, "batch_norm", grads, 11, [&](const Tensor& dy, const variable_list& s, int64_t act,
                                                           double a, double b, Mask mask) {
      return op.call(dy, s[0], opt(s[1]), opt(s[2]), s[3], s[4], training, act, a, b, mask);
    });
  }
};

using GroupNormBwd = Result3(const Tensor&, const Tensor&, int64_t, const Tensor&, const Tensor&, const Opt&,
                             const Opt&, int64_t, double, double, Mask);

// InstanceNorm's backward is GroupNorm's with one group per channel.
struct InstanceNormNode : torch::autograd::Function<InstanceNormNode> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Opt& w, const Opt& b, const Opt& rm,
                        const Opt& rv, double momentum, double eps, int64_t act, double act_a, double act_b) {
    static auto op = find_op<Result3(const Tensor&, const Opt&, const Opt&, const Opt&, const Opt&, double, double,
                                     int64_t, double, double)>("fusednorm::instance_norm_fwd");
    at::AutoDispatchBelowADInplaceOrView guard;
    return save(ctx, x, w, b, op.call(x, w, b, rm, rv, momentum, eps, act, act_a, act_b), eps, act,
                act_a, act_b, x.size(1));
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = find_op<GroupNormBwd>("fusednorm::group_norm_bwd");
    const int64_t channels = ctx->saved_data["extra"].toInt();
    return backward_of(ctx, "instance_norm", grads, 10, [&](const Tensor& dy, const variable_list& s,
                                                              int64_t act, double a, double b, Mask mask) {
      return op.call(dy, s[0], channels, s[3], s[4], opt(s[1]), opt(s[2]), act, a, b, mask);
    });
  }
};

struct LayerNormNode : torch::autograd::Function<LayerNormNode> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Opt& w, const Opt& b,
                        std::vector<int64_t> shape, double eps, int64_t act, double act_a, double act_b) {
    static auto op = find_op<Result3(const Tensor&, at::IntArrayRef, const Opt&, const Opt&, double, int64_t, double,
                                     double)>("fusednorm::layer_norm_fwd");
    at::AutoDispatchBelowADInplaceOrView guard;
    return save(ctx, x, w, b, op.call(x, shape, w, b, eps, act, act_a, act_b), eps, act, act_a, act_b,
                shape);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = find_op<Result3(const Tensor&, const Tensor&, at::IntArrayRef, const Tensor&, const Tensor&,
                                     const Opt&, const Opt&, int64_t, double, double, Mask)>("fusednorm::layer_norm_bwd");
    const std::vector<int64_t> shape = ctx->saved_data["extra"].toIntVector();
    return backward_of(ctx, "layer_norm", grads, 8, [&](const Tensor& dy, const variable_list& s, int64_t act,
                                                          double a, double b, Mask mask) {
      return op.call(dy, s[0], shape, s[3], s[4], opt(s[1]), opt(s[2]), act, a, b, mask);
    });
  }
};

struct GroupNormNode : torch::autograd::Function<GroupNormNode> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Opt& w, const Opt& b, int64_t groups,
                        double eps, int64_t act, double act_a, double act_b) {
    static auto op = find_op<Result3(const Tensor&, int64_t, const Opt&, const Opt&, double, int64_t, double,
                                     double)>("fusednorm::group_norm_fwd");
    at::AutoDispatchBelowADInplaceOrView guard;
    return save(ctx, x, w, b, op.call(x, groups, w, b, eps, act, act_a, act_b), eps, act, act_a, act_b,
                groups);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = find_op<GroupNormBwd>("fusednorm::group_norm_bwd");
    const int64_t groups = ctx->saved_data["extra"].toInt();
    return backward_of(ctx, "group_norm", grads, 8, [&](const Tensor& dy, const variable_list& s, int64_t act,
                                                          double a, double b, Mask mask) {
      return op.call(dy, s[0], groups, s[3], s[4], opt(s[1]), opt(s[2]), act, a, b, mask);
    });
  }
};

}  // namespace

void bind_autograd(py::module_& m) {
  m.def("set_recompute", [](py::object fn) { recompute_fn = new py::object(std::move(fn)); },
        "The Python function the nodes' double backward calls (fusednorm.autograd._native_recompute)");
  // Each takes the arguments of its Function's forward in fusednorm/autograd.py (x, weight,
  // bias, then the norm's own) and returns y.
  m.def("batch_norm", [](const Tensor& x, const Opt& w, const Opt& b, const Opt& rm, const Opt& rv,
                         bool training, double momentum, double eps, int64_t act, double act_a, double act_b) {
    return BatchNormNode::apply(x, w, b, rm, rv, training, momentum, eps, act, act_a, act_b);
  });
  m.def("instance_norm", [](const Tensor& x, const Opt& w, const Opt& b, const Opt& rm, const Opt& rv,
                            double momentum, double eps, int64_t act, double act_a, double act_b) {
    return InstanceNormNode::apply(x, w, b, rm, rv, momentum, eps, act, act_a, act_b);
  });
  m.def("layer_norm", [](const Tensor& x, const Opt& w, const Opt& b, std::vector<int64_t> shape, double eps,
                         int64_t act, double act_a, double act_b) {
    return LayerNormNode::apply(x, w, b, std::move(shape), eps, act, act_a, act_b);
  });
  m.def("group_norm", [](const Tensor& x, const Opt& w, const Opt& b, int64_t groups, double eps, int64_t act,
                         double act_a, double act_b) {
    return GroupNormNode::apply(x, w, b, groups, eps, act, act_a, act_b);
  });
}

}  // namespace fusednorm
