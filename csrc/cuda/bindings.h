// The GPU ops' bodies: checks, allocation, dtype dispatch and the calls into launch.h.
// Compiled by nvcc for the CUDA backend (ops_cuda.cu) and, with FN_EMULATE, by the C++
// compiler for the emulation tests (tests/emulation/emulated_ops.cpp) on CPU tensors: the
// code under test is the code that runs on a GPU.
#pragma once
#include <ATen/ATen.h>

#include "../common/checks.h"
#include "../common/layout.h"
#include "launch.h"

#ifdef FN_EMULATE
#define FN_DEVICE_GUARD(t)
#define FN_STREAM() nullptr
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
// Every entry point: the input's device and that device's current stream.
#define FN_DEVICE_GUARD(t) c10::cuda::CUDAGuard fn_device_guard_((t).device())
#define FN_STREAM() c10::cuda::getCurrentCUDAStream().stream()
#endif

namespace fusednorm {
namespace cuda {

using TensorList3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using TensorList4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename A>
A* aptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<A>() : nullptr;
}

// A parameter as a contiguous accumulation-type vector, or `fill` repeated.
inline at::Tensor acc_param(const c10::optional<at::Tensor>& p, int64_t n, double fill,
                            const at::Tensor& like) {
  auto opts = like.options().dtype(acc_dtype(like));
  if (has(p)) return p->detach().to(opts.dtype()).contiguous();
  return at::full({n}, fill, opts);
}

inline void update_running(const c10::optional<at::Tensor>& running, const at::Tensor& fresh,
                           double momentum) {
  if (!has(running)) return;
  at::Tensor r = *running;
  r.mul_(1.0 - momentum).add_(fresh.to(r.scalar_type()), momentum);
}

inline at::Tensor empty_result(const at::Tensor& like) { return at::empty({0}, like.options()); }

// A channel reduction (launch.h) of x (and dy) laid out as NCHW (N, C, S) or NHWC (N*S, C).
template <typename T, typename Op>
void run_channel_reduce(bool nhwc, int64_t N, int64_t C, int64_t S, const Op& op, const at::Tensor& x,
                        const at::Tensor* dy) {
  using State = typename Op::State;
  using A = typename Acc<T>::type;
  constexpr int K = sizeof(State) / sizeof(A);
  const T* xp = x.data_ptr<T>();
  const T* dyp = dy ? dy->data_ptr<T>() : nullptr;
  const ChannelPlan plan = plan_channels(nhwc, N, C, S, channel_pack<T>(nhwc, C, S, xp, dyp));
  at::Tensor partials = at::empty({plan.partials() * K}, x.options().dtype(c10::CppTypeToScalarType<A>::value));
  at::Tensor tickets = at::zeros({plan.groups()}, x.options().dtype(at::kInt));
  channel_reduce<T, Op>(plan, op, xp, dyp, reinterpret_cast<State*>(partials.data_ptr<A>()),
                        tickets.data_ptr<int>(), FN_STREAM());
}

// ---- BatchNorm ----------------------------------------------------------------------------
// Per-channel (mean, M2, rstd) of a non-empty batch, with a grid-level reduction.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_moments(const BnLayout& l, double eps) {
  const auto acc = l.x.options().dtype(acc_dtype(l.x));
  at::Tensor mean = at::empty({l.C}, acc), m2 = at::empty({l.C}, acc), rstd = at::empty({l.C}, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, l.x.scalar_type(), "channel_moments", [&] {
    using A = typename Acc<scalar_t>::type;
    MomentsOp<A> op{aptr<A>(mean), aptr<A>(rstd), aptr<A>(m2), A(eps), l.N * l.S};
    run_channel_reduce<scalar_t>(l.cols, l.N, l.C, l.S, op, l.x, nullptr);
  });
  return {mean, m2, rstd};
}

inline std::tuple<at::Tensor, at::Tensor> batch_norm_stats(const at::Tensor& input) {
  check_bn_args(input, c10::nullopt, c10::nullopt, c10::nullopt, c10::nullopt);
  FN_DEVICE_GUARD(input);
  const BnLayout l = bn_layout(input);
  if (l.x.numel() == 0) {
    const auto acc = input.options().dtype(acc_dtype(input));
    return {at::zeros({l.C}, acc), at::zeros({l.C}, acc)};
  }
  auto [mean, m2, rstd] = channel_moments(l, 0.0);
  return {mean, m2};
}

inline TensorList3 batch_norm_fwd(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                                  const c10::optional<at::Tensor>& bias,
                                  const c10::optional<at::Tensor>& running_mean,
                                  const c10::optional<at::Tensor>& running_var, bool training,
                                  double momentum, double eps, int64_t act, double act_a, double act_b,
                                  const c10::optional<at::Tensor>& residual) {
  check_activation(act);
  check_bn_args(input, weight, bias, running_mean, running_var);
  check_bn_residual(input, residual, act);
  TORCH_CHECK(training || (has(running_mean) && has(running_var)),
              "running_mean must be defined in evaluation mode");
  FN_DEVICE_GUARD(input);
  const BnLayout l = bn_layout(input);
  const at::Tensor z = has(residual) ? like_layout(*residual, l) : at::Tensor();  // laid out as x
  const int64_t C = l.C, M = l.N * l.S;
  const auto acc = input.options().dtype(acc_dtype(input));
  at::Tensor y = at::empty_like(l.x, l.format);
  at::Tensor gamma = acc_param(weight, C, 1.0, input), beta = acc_param(bias, C, 0.0, input);
  at::Tensor mean, rstd;
  if (!training) {
    mean = running_mean->to(acc.dtype());
    rstd = (running_var->to(acc.dtype()) + eps).rsqrt();
  } else if (M * C == 0) {  // empty batch (or no channel): running statistics untouched
    mean = at::zeros({C}, acc);
    rstd = at::full({C}, 1.0 / std::sqrt(eps), acc);
  } else {
    at::Tensor m2;
    std::tie(mean, m2, rstd) = channel_moments(l, eps);
    update_running(running_mean, mean, momentum);
    // Unbiased, NaN for a single value (norm_math.h's unbiased_var, as torch).
    update_running(running_var, M > 1 ? m2 / double(M - 1) : at::full_like(m2, NAN), momentum);
  }
  if (M * C > 0) {
    const at::Tensor alpha = rstd * gamma;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_apply", [&] {
      using A = typename Acc<scalar_t>::type;
      apply<scalar_t>(l.x.data_ptr<scalar_t>(), z.defined() ? z.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(),
                      l.x.numel(), C, l.S, l.cols,
                      aptr<A>(mean), aptr<A>(alpha), aptr<A>(beta), act, act_params<A>(act_a, act_b), FN_STREAM());
    });
  }
  return {y, mean, rstd};
}

inline TensorList3 batch_norm_bwd(const at::Tensor& grad_out, const at::Tensor& input,
                                  const c10::optional<at::Tensor>& weight,
                                  const c10::optional<at::Tensor>& bias, const at::Tensor& mean_in,
                                  const at::Tensor& rstd_in, bool training, int64_t act,
                                  double act_a, double act_b, std::array<bool, 3> mask) {
  check_activation(act);
  check_bn_args(input, weight, bias, c10::nullopt, c10::nullopt);
  check_backward_args(grad_out, input, mean_in, rstd_in, input.size(1), "batch_norm_bwd");
  FN_DEVICE_GUARD(input);
  const BnLayout l = bn_layout(input);
  const int64_t C = l.C, M = l.N * l.S;
  const auto acc = input.options().dtype(acc_dtype(input));
  const at::Tensor dy = like_layout(grad_out.to(input.scalar_type()), l);
  const at::Tensor mean = mean_in.to(acc.dtype()).contiguous(), rstd = rstd_in.to(acc.dtype()).contiguous();
  at::Tensor gamma = acc_param(weight, C, 1.0, input), beta = acc_param(bias, C, 0.0, input);
  at::Tensor dx = mask[0] ? at::empty_like(l.x, l.format) : empty_result(input);
  at::Tensor dgamma = at::zeros({C}, acc), dbeta = at::zeros({C}, acc);
  at::Tensor cA = at::empty({C}, acc), cB = at::zeros({C}, acc), cC = at::zeros({C}, acc);
  const bool need_sums = mask[1] || mask[2] || (training && mask[0]);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_bwd", [&] {
    using scalar = scalar_t;
    using A = typename Acc<scalar>::type;
    if (need_sums && M * C > 0) {
      GradSumsOp<A> op{aptr<A>(mean), aptr<A>(rstd), aptr<A>(gamma), aptr<A>(beta), 0, 1, act, act_params<A>(act_a, act_b),
                       aptr<A>(dgamma), aptr<A>(dbeta),
                       mask[0] ? aptr<A>(cA) : nullptr, aptr<A>(cB), aptr<A>(cC), training, M};
      run_channel_reduce<scalar>(l.cols, l.N, C, l.S, op, l.x, &dy);
    }
    if (mask[0] && M * C > 0) {
      const at::Tensor alpha = rstd * gamma;
      if (!training) cA.copy_(alpha);  // eval: dx = alpha * dyhat
      input_grad<scalar>(l.x.data_ptr<scalar>(), dy.data_ptr<scalar>(), dx.data_ptr<scalar>(),
                         l.x.numel(), C, l.S, l.cols, aptr<A>(mean), aptr<A>(alpha), aptr<A>(beta), aptr<A>(cA),
                         aptr<A>(cB), aptr<A>(cC), act, act_params<A>(act_a, act_b), FN_STREAM());
    }
  });
  return {dx, mask[1] && has(weight) ? dgamma.to(weight->scalar_type()) : empty_result(input),
          mask[2] && has(bias) ? dbeta.to(bias->scalar_type()) : empty_result(input)};
}

// ---- row norms: LayerNorm, RMSNorm, GroupNorm, InstanceNorm ---------------------------------
// How the parameter-gradient reduction sees the rows: NHWC (N*S, C) or NCHW (N, C, S).
struct ChannelView {
  bool nhwc;
  int64_t N, C, S;
};

template <typename A>
RowParams<A> row_params(const at::Tensor& gamma, const at::Tensor& beta, int64_t act, double act_a, double act_b,
                        bool rms) {
  return RowParams<A>{aptr<A>(gamma), aptr<A>(beta), act, act_params<A>(act_a, act_b), rms};
}

template <typename T>
const T* tptr(const at::Tensor* t) {
  return t ? t->data_ptr<T>() : nullptr;
}

// Forward of R rows (statistics and apply); m2 (optional) receives each row's M2. With
// `residual` (x's dtype), sum = x + residual is written and normalised.
inline void rows_forward(const at::Tensor& x, at::Tensor& y, RowShape sh, const at::Tensor& gamma,
                         const at::Tensor& beta, double eps, int64_t act, double act_a, double act_b,
                         at::Tensor& mean, at::Tensor& rstd, at::Tensor* m2, bool rms = false,
                         const at::Tensor* residual = nullptr, at::Tensor* sum = nullptr) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rows_forward", [&] {
    using A = typename Acc<scalar_t>::type;
    RowResidual<scalar_t> res;
    res.r = tptr<scalar_t>(residual);
    res.sum = sum ? sum->data_ptr<scalar_t>() : nullptr;
    row_forward<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), sh,
                          row_params<A>(gamma, beta, act, act_a, act_b, rms), A(eps), aptr<A>(mean), aptr<A>(rstd),
                          m2 ? aptr<A>(*m2) : nullptr, FN_STREAM(), res);
  });
}

// Backward of R rows: dx (if wanted; plus dres, x's dtype, if given), then dgamma/dbeta
// with a channel reduction whose statistics are looked up per row (LayerNorm: NHWC view of
// (R, L)) or per group (GroupNorm: NCHW view (N, C, S)).
inline TensorList3 rows_backward(const at::Tensor& grad_out, const at::Tensor& x, RowShape sh,
                                 const at::Tensor& mean_in, const at::Tensor& rstd_in,
                                 const c10::optional<at::Tensor>& weight,
                                 const c10::optional<at::Tensor>& bias, int64_t nparams,
                                 const ChannelView& view, int64_t stat_outer, int64_t stat_div,
                                 int64_t act, double act_a, double act_b, std::array<bool, 3> mask,
                                 bool rms = false, const at::Tensor* dres = nullptr) {
  const auto acc = x.options().dtype(acc_dtype(x));
  const at::Tensor dy = grad_out.to(x.scalar_type()).contiguous();
  const at::Tensor mean = mean_in.to(acc.dtype()).contiguous(), rstd = rstd_in.to(acc.dtype()).contiguous();
  at::Tensor gamma = acc_param(weight, nparams, 1.0, x), beta = acc_param(bias, nparams, 0.0, x);
  at::Tensor dx = mask[0] ? at::empty_like(x) : empty_result(x);
  at::Tensor dgamma = at::zeros({nparams}, acc), dbeta = at::zeros({nparams}, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rows_backward", [&] {
    using scalar = scalar_t;
    using A = typename Acc<scalar>::type;
    RowResidual<scalar> res;
    res.dres = tptr<scalar>(dres);
    if (mask[0])
      row_backward<scalar>(x.data_ptr<scalar>(), dy.data_ptr<scalar>(), dx.data_ptr<scalar>(), sh,
                           row_params<A>(gamma, beta, act, act_a, act_b, rms), aptr<A>(mean), aptr<A>(rstd),
                           FN_STREAM(), res);
    if ((mask[1] || mask[2]) && x.numel() > 0) {
      GradSumsOp<A> op{aptr<A>(mean), aptr<A>(rstd), aptr<A>(gamma), aptr<A>(beta), stat_outer, stat_div,
                       act, act_params<A>(act_a, act_b), aptr<A>(dgamma), aptr<A>(dbeta), nullptr, nullptr, nullptr, false, 0};
      run_channel_reduce<scalar>(view.nhwc, view.N, view.C, view.S, op, x, &dy);
    }
  });
  return {dx, mask[1] && has(weight) ? dgamma.to(weight->scalar_type()) : empty_result(x),
          mask[2] && has(bias) ? dbeta.to(bias->scalar_type()) : empty_result(x)};
}

// LayerNorm/RMSNorm of input + residual (csrc/schemas.h). A residual in the input's dtype
// summed in that dtype is fused into the row kernels; the other dtype combinations are
// summed by ATen first (in float32, float64 for a float64 input; rounded once), normalised
// in the sum's dtype and the output rounded to the input's.
inline TensorList4 add_norm_fwd(const at::Tensor& input, const c10::optional<at::Tensor>& residual,
                                at::IntArrayRef shape, const c10::optional<at::Tensor>& weight,
                                const c10::optional<at::Tensor>& bias, double eps, bool rms,
                                bool residual_in_fp32, int64_t act, double act_a, double act_b) {
  check_activation(act);
  const int64_t L = check_add_norm(input, residual, shape, weight, bias, rms, "add_norm_fwd");
  FN_DEVICE_GUARD(input);
  const at::Tensor x = input.contiguous();
  const int64_t R = layer_norm_rows(x, shape);
  const at::ScalarType sum_type = has(residual) ? residual_dtype(x, residual_in_fp32) : x.scalar_type();
  const bool fused = has(residual) && residual->scalar_type() == x.scalar_type() && sum_type == x.scalar_type();
  const at::ScalarType wide = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor r = fused ? residual->contiguous() : at::Tensor();
  at::Tensor sum = !has(residual) ? empty_result(x)
                   : fused        ? at::empty_like(x)
                                  : at::add(x.to(wide), residual->to(wide)).to(sum_type).contiguous();
  const at::Tensor& normalised = has(residual) && !fused ? sum : x;
  const auto acc = x.options().dtype(acc_dtype(normalised));
  at::Tensor y = at::empty_like(normalised), mean = at::empty({R}, acc), rstd = at::empty({R}, acc);
  if (L == 0) {  // empty rows: no statistics
    mean.zero_();
    rstd.zero_();
  } else {
    rows_forward(normalised, y, RowShape{R, L, 1, L, 1}, acc_param(weight, L, 1.0, normalised).view(-1),
                 acc_param(bias, L, 0.0, normalised).view(-1), eps, act, act_a, act_b, mean, rstd, nullptr, rms,
                 fused ? &r : nullptr, fused ? &sum : nullptr);
  }
  return {y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type()), sum, mean, rstd};
}

inline TensorList3 add_norm_bwd(const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_residual,
                                const at::Tensor& input, at::IntArrayRef shape, const at::Tensor& mean,
                                const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
                                const c10::optional<at::Tensor>& bias, bool rms, int64_t act, double act_a,
                                double act_b, std::array<bool, 3> mask) {
  check_activation(act);
  const int64_t L = check_add_norm(input, grad_residual, shape, weight, bias, rms, "add_norm_bwd");
  check_backward_args(grad_out, input, mean, rstd, layer_norm_rows(input, shape), "add_norm_bwd");
  const int64_t R = L == 0 ? 0 : input.numel() / L;  // rows with elements to differentiate
  FN_DEVICE_GUARD(input);
  const at::Tensor x = input.contiguous();
  const bool add = mask[0] && has(grad_residual);
  const at::Tensor dres = add ? grad_residual->to(x.scalar_type()).contiguous() : at::Tensor();
  auto [dx, dw, db] = rows_backward(grad_out, x, RowShape{R, L, 1, L, 1}, mean, rstd,
                                    weight.has_value() ? c10::optional<at::Tensor>(weight->view(-1)) : weight,
                                    bias.has_value() ? c10::optional<at::Tensor>(bias->view(-1)) : bias,
                                    L, ChannelView{true, R, L, 1}, 1, std::max<int64_t>(L, 1), act, act_a, act_b, mask,
                                    rms, add ? &dres : nullptr);
  // (a normalized_shape holding a 0 has empty parameter gradients of that shape)
  return {dx, mask[1] && has(weight) ? dw.view(shape) : dw, mask[2] && has(bias) ? db.view(shape) : db};
}

inline TensorList3 layer_norm_fwd(const at::Tensor& input, at::IntArrayRef shape,
                                  const c10::optional<at::Tensor>& weight,
                                  const c10::optional<at::Tensor>& bias, double eps, int64_t act,
                                  double act_a, double act_b) {
  auto [y, sum, mean, rstd] = add_norm_fwd(input, c10::nullopt, shape, weight, bias, eps, false, false, act,
                                           act_a, act_b);
  return {y, mean, rstd};
}

inline TensorList3 layer_norm_bwd(const at::Tensor& grad_out, const at::Tensor& input,
                                  at::IntArrayRef shape, const at::Tensor& mean,
                                  const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
                                  const c10::optional<at::Tensor>& bias, int64_t act, double act_a, double act_b,
                                  std::array<bool, 3> mask) {
  return add_norm_bwd(grad_out, c10::nullopt, input, shape, mean, rstd, weight, bias, false, act, act_a, act_b,
                      mask);
}

// GroupNorm/InstanceNorm rows too few to fill the GPU one block each, long, and made of
// planes long enough to stream: each row is split over blocks, as BatchNorm's channels are
// (statistics by a channel reduction over the rows, gradient sums over the (n, c) planes),
// and normalised by BatchNorm's elementwise kernels with per-plane coefficients. Same
// passes over the tensor as the row kernels' long tier.
inline bool split_rows(const GnShape& s) {
  const Limits& lim = limits();
  return s.N * s.G < sm_count() && s.row_len() >= lim.elements_per_split && s.S >= lim.split_plane_min;
}

// group_norm_bwd of split rows (split_rows): per-plane sums of dyhat and dyhat*xhat, from
// which the parameter gradients (summed over the batch) and the input gradient's
// coefficients follow.
inline TensorList3 split_rows_backward(const at::Tensor& grad_out, const at::Tensor& x, const GnShape& s,
                                       const at::Tensor& mean_in, const at::Tensor& rstd_in,
                                       const c10::optional<at::Tensor>& weight,
                                       const c10::optional<at::Tensor>& bias, int64_t act, double act_a,
                                       double act_b, std::array<bool, 3> mask) {
  const auto acc = x.options().dtype(acc_dtype(x));
  const at::Tensor dy = grad_out.to(x.scalar_type()).contiguous();
  const at::Tensor mean = mean_in.to(acc.dtype()).contiguous(), rstd = rstd_in.to(acc.dtype()).contiguous();
  const at::Tensor gamma = acc_param(weight, s.C, 1.0, x), beta = acc_param(bias, s.C, 0.0, x);
  const int64_t planes = s.N * s.C;
  // The sums' pre-activation takes each plane's parameters (GradSumsOp indexes them by plane).
  const at::Tensor gamma_p = gamma.repeat({s.N}), beta_p = beta.repeat({s.N});
  at::Tensor sum_g = at::zeros({planes}, acc), sum_gx = at::zeros({planes}, acc);
  at::Tensor dx = mask[0] ? at::empty_like(x) : empty_result(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "split_rows_backward", [&] {
    using scalar = scalar_t;
    using A = typename Acc<scalar>::type;
    // statistics of plane p: row p / cg (= n*G + c/cg)
    GradSumsOp<A> op{aptr<A>(mean), aptr<A>(rstd), aptr<A>(gamma_p), aptr<A>(beta_p), 0, s.cg(),
                     act, act_params<A>(act_a, act_b), aptr<A>(sum_gx), aptr<A>(sum_g), nullptr, nullptr, nullptr, false, 0};
    run_channel_reduce<scalar>(false, 1, planes, s.S, op, x, &dy);
    if (mask[0]) {
      at::Tensor mean_p = at::empty({planes}, acc), alpha_p = at::empty_like(mean_p), beta_pp = at::empty_like(mean_p);
      at::Tensor cA = at::empty_like(mean_p), cB = at::empty_like(mean_p), cC = at::empty_like(mean_p);
      plane_coefficients<A>(aptr<A>(mean), aptr<A>(rstd), aptr<A>(gamma), aptr<A>(beta), s.N, s.C, s.G, s.row_len(),
                            aptr<A>(sum_g), aptr<A>(sum_gx), aptr<A>(mean_p), aptr<A>(alpha_p), aptr<A>(beta_pp),
                            aptr<A>(cA), aptr<A>(cB), aptr<A>(cC), FN_STREAM());
      input_grad<scalar>(x.data_ptr<scalar>(), dy.data_ptr<scalar>(), dx.data_ptr<scalar>(), x.numel(), planes, s.S,
                         false, aptr<A>(mean_p), aptr<A>(alpha_p), aptr<A>(beta_pp), aptr<A>(cA), aptr<A>(cB),
                         aptr<A>(cC), act, act_params<A>(act_a, act_b), FN_STREAM());
    }
  });
  return {dx, mask[1] && has(weight) ? sum_gx.view({s.N, s.C}).sum(0).to(weight->scalar_type()) : empty_result(x),
          mask[2] && has(bias) ? sum_g.view({s.N, s.C}).sum(0).to(bias->scalar_type()) : empty_result(x)};
}

// GroupNorm-shaped forward (GroupNorm, and InstanceNorm with G = C). The input is
// normalised as a contiguous copy; GroupNorm's output then takes the format torch gives it
// (layout.h), InstanceNorm's stays contiguous (as torch's).
inline TensorList3 groups_forward(const at::Tensor& input, const GnShape& s,
                                  const c10::optional<at::Tensor>& weight,
                                  const c10::optional<at::Tensor>& bias, double eps, int64_t act,
                                  double act_a, double act_b, bool keep_channels_last, at::Tensor* m2) {
  const at::Tensor x = input.contiguous();
  const auto acc = x.options().dtype(acc_dtype(x));
  at::Tensor y = at::empty_like(x), mean = at::zeros({s.N, s.G}, acc), rstd = at::zeros({s.N, s.G}, acc);
  if (m2) *m2 = at::zeros({s.N, s.G}, acc);
  const at::Tensor gamma = acc_param(weight, s.C, 1.0, x), beta = acc_param(bias, s.C, 0.0, x);
  if (x.numel() > 0 && split_rows(s)) {
    const at::Tensor row_m2 = m2 ? *m2 : at::empty({s.N, s.G}, acc);
    at::Tensor mean_p = at::empty({s.N * s.C}, acc), alpha_p = at::empty_like(mean_p), beta_p = at::empty_like(mean_p);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "groups_forward", [&] {
      using A = typename Acc<scalar_t>::type;
      MomentsOp<A> op{aptr<A>(mean), aptr<A>(rstd), aptr<A>(row_m2), A(eps), s.row_len()};
      run_channel_reduce<scalar_t>(false, 1, s.N * s.G, s.row_len(), op, x, nullptr);
      plane_coefficients<A>(aptr<A>(mean), aptr<A>(rstd), aptr<A>(gamma), aptr<A>(beta), s.N, s.C, s.G, s.row_len(),
                            nullptr, nullptr, aptr<A>(mean_p), aptr<A>(alpha_p), aptr<A>(beta_p), nullptr, nullptr,
                            nullptr, FN_STREAM());
      apply<scalar_t>(x.data_ptr<scalar_t>(), nullptr, y.data_ptr<scalar_t>(), x.numel(), s.N * s.C, s.S, false,
                      aptr<A>(mean_p), aptr<A>(alpha_p), aptr<A>(beta_p), act, act_params<A>(act_a, act_b),
                      FN_STREAM());
    });
  } else if (x.numel() > 0) {
    rows_forward(x, y, RowShape{s.N * s.G, s.cg() * s.S, s.G, s.cg(), s.S}, gamma, beta, eps, act, act_a, act_b,
                 mean, rstd, m2);
  }
  if (keep_channels_last) y = y.contiguous(group_norm_format(input));
  return {y, mean, rstd};
}

inline TensorList3 group_norm_fwd(const at::Tensor& input, int64_t G,
                                  const c10::optional<at::Tensor>& weight,
                                  const c10::optional<at::Tensor>& bias, double eps, int64_t act,
                                  double act_a, double act_b) {
  check_activation(act);
  check_input_dtype(input, "group_norm");
  const GnShape s = check_group_norm(input, G, weight, bias, "group_norm");
  check_group_norm_sizes(s);
  FN_DEVICE_GUARD(input);
  return groups_forward(input, s, weight, bias, eps, act, act_a, act_b, true, nullptr);
}

inline TensorList3 instance_norm_fwd(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                                     const c10::optional<at::Tensor>& bias,
                                     const c10::optional<at::Tensor>& running_mean,
                                     const c10::optional<at::Tensor>& running_var, double momentum,
                                     double eps, int64_t act, double act_a, double act_b) {
  check_activation(act);
  const GnShape s = check_instance_norm(input, weight, bias, running_mean, running_var);
  FN_DEVICE_GUARD(input);
  at::Tensor m2;
  auto out = groups_forward(input, s, weight, bias, eps, act, act_a, act_b, false, &m2);
  const bool update = has(running_mean) || has(running_var);
  if (update && s.N == 0) {  // torch's average over no instances: NaN
    for (const auto* r : {&running_mean, &running_var})
      if (has(*r)) (*r)->fill_(NAN);
  } else if (update && s.S > 0) {  // (no spatial elements: no statistics, untouched)
    // Batch average of the per-instance statistics, variance unbiased per instance (NaN
    // for one element, norm_math.h's unbiased_var).
    update_running(running_mean, std::get<1>(out).mean(0), momentum);
    update_running(running_var, s.S > 1 ? (m2 / double(s.S - 1)).mean(0) : at::full({s.C}, NAN, m2.options()), momentum);
  }
  return out;
}

inline TensorList3 group_norm_bwd(const at::Tensor& grad_out, const at::Tensor& input, int64_t G,
                                  const at::Tensor& mean, const at::Tensor& rstd,
                                  const c10::optional<at::Tensor>& weight,
                                  const c10::optional<at::Tensor>& bias, int64_t act, double act_a, double act_b,
                                  std::array<bool, 3> mask) {
  check_activation(act);
  check_input_dtype(input, "group_norm");
  const GnShape s = check_group_norm(input, G, weight, bias, "group_norm");
  check_backward_args(grad_out, input, mean, rstd, s.N * G, "group_norm_bwd");
  FN_DEVICE_GUARD(input);
  const at::Tensor x = input.contiguous();
  auto out = x.numel() > 0 && split_rows(s)
                 ? split_rows_backward(grad_out, x, s, mean, rstd, weight, bias, act, act_a, act_b, mask)
                 : rows_backward(grad_out, x, RowShape{s.N * G, s.cg() * s.S, G, s.cg(), s.S}, mean, rstd, weight,
                                 bias, s.C, ChannelView{false, s.N, s.C, s.S}, G, s.cg(), act, act_a, act_b, mask);
  if (mask[0])  // the layout the CPU kernels return (layout.h)
    std::get<0>(out) = std::get<0>(out).contiguous(group_norm_format(input));
  return out;
}

}  // namespace cuda
}  // namespace fusednorm

// Registers the ops above for a dispatch key of a library namespace.
#define FN_REGISTER_GPU_OPS(ns, key)                          \
  TORCH_LIBRARY_IMPL(ns, key, m) {                            \
    m.impl("batch_norm_fwd", &fusednorm::cuda::batch_norm_fwd); \
    m.impl("batch_norm_bwd", &fusednorm::cuda::batch_norm_bwd); \
    m.impl("batch_norm_stats", &fusednorm::cuda::batch_norm_stats); \
    m.impl("layer_norm_fwd", &fusednorm::cuda::layer_norm_fwd); \
    m.impl("layer_norm_bwd", &fusednorm::cuda::layer_norm_bwd); \
    m.impl("add_norm_fwd", &fusednorm::cuda::add_norm_fwd);     \
    m.impl("add_norm_bwd", &fusednorm::cuda::add_norm_bwd);     \
    m.impl("group_norm_fwd", &fusednorm::cuda::group_norm_fwd); \
    m.impl("group_norm_bwd", &fusednorm::cuda::group_norm_bwd); \
    m.impl("instance_norm_fwd", &fusednorm::cuda::instance_norm_fwd); \
  }
