// Argument checks shared by every backend's bindings, with torch.nn's exception types
// and messages (RuntimeError unless noted).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include "norm_math.h"

#include <string>
#include <utility>

namespace fusednorm {

inline bool is_reduced_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16;
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || is_reduced_float(t);
}

// BatchNorm / InstanceNorm raise NotImplementedError for non-float inputs, as torch does.
inline void check_input_dtype_not_implemented(const at::Tensor& input, const char* op) {
  TORCH_CHECK_NOT_IMPLEMENTED(is_supported_float(input.scalar_type()), "\"", op,
                              "\" not implemented for '", input.scalar_type(), "'");
}

inline void check_input_dtype(const at::Tensor& input, const char* op) {
  TORCH_CHECK(is_supported_float(input.scalar_type()), op,
              ": expected a floating-point input (float32, float64, bfloat16 or float16), got ",
              input.scalar_type());
}

// Parameters share the input's dtype, or are float32 beside a half/bfloat16 input.
inline void check_param(const c10::optional<at::Tensor>& p, const at::Tensor& input,
                        const char* what, int64_t numel, const char* op) {
  if (!p.has_value() || !p->defined()) return;
  TORCH_CHECK(p->device() == input.device(), op, ": ", what, " is on ", p->device(),
              " but the input is on ", input.device());
  const auto t = p->scalar_type();
  TORCH_CHECK(t == input.scalar_type() || (is_reduced_float(input.scalar_type()) && t == at::kFloat),
              "mixed dtype (", op, "): ", what, " has dtype ", t, " but the input has dtype ",
              input.scalar_type(), "; all inputs must share the same dtype (float32 "
              "parameters are allowed with bfloat16/float16 inputs)");
  TORCH_CHECK(p->numel() == numel, op, ": ", what, " should contain ", numel,
              " elements not ", p->numel());
}

// The activation code the ops take (norm_math.h's Activation); Python maps names and
// torch.nn modules to it, so another value is a caller's bug: ValueError, not a silent
// identity.
inline void check_activation(int64_t act) {
  TORCH_CHECK_VALUE(act >= 0 && act < kNumActivations, "fusednorm: unknown activation code ", act,
                    " (expected 0 to ", kNumActivations - 1, ")");
}

inline bool has(const c10::optional<at::Tensor>& p) { return p.has_value() && p->defined(); }

// A backward op's own arguments: grad_out shaped as the input, and the forward's saved
// statistics, `count` of each (one per channel, row or (sample, group)), all on the input's
// device. The kernels index them by the input's shape: wrong ones would be read out of
// bounds, a silently wrong gradient or a crash.
inline void check_backward_args(const at::Tensor& grad_out, const at::Tensor& input,
                                const at::Tensor& mean, const at::Tensor& rstd, int64_t count,
                                const char* op) {
  TORCH_CHECK(grad_out.sizes() == input.sizes(), op, ": grad_out has shape ", grad_out.sizes(),
              " but the input has shape ", input.sizes());
  const std::pair<const at::Tensor*, const char*> args[] = {
      {&grad_out, "grad_out"}, {&mean, "mean"}, {&rstd, "rstd"}};
  for (const auto& [t, what] : args) {
    TORCH_CHECK(t->device() == input.device(), op, ": ", what, " is on ", t->device(),
                " but the input is on ", input.device());
    if (t != &grad_out)
      TORCH_CHECK(t->numel() == count, op, ": ", what, " should contain ", count,
                  " elements (the forward's statistics for this input) not ", t->numel());
  }
}

// Accumulation dtype of the statistics: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType acc_dtype(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// torch's batch_norm returns an empty input's output as input * weight[0] + bias[0], and
// its instance_norm normalises through batch_norm with the parameters repeated N times:
// with no channel (no sample, for InstanceNorm) to index, an IndexError.
inline void check_empty_affine(const at::Tensor& input, int64_t channels,
                               const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias) {
  if (input.numel() != 0 || channels != 0) return;
  TORCH_CHECK_INDEX(!has(weight) && !has(bias),
                    "select(): index 0 out of range for tensor of size [0] at dimension 0");
}

inline void check_bn_args(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                   const c10::optional<at::Tensor>& bias,
                   const c10::optional<at::Tensor>& running_mean,
                   const c10::optional<at::Tensor>& running_var) {
  check_input_dtype_not_implemented(input, "batch_norm");
  TORCH_CHECK(input.dim() >= 2, "batch_norm: expected at least 2D input (got ", input.dim(),
              "D input)");
  const int64_t C = input.size(1);
  check_empty_affine(input, C, weight, bias);
  check_param(running_mean, input, "running_mean", C, "batch_norm");
  check_param(running_var, input, "running_var", C, "batch_norm");
  check_param(weight, input, "weight", C, "batch_norm");
  check_param(bias, input, "bias", C, "batch_norm");
}

// A residual added to a norm (or its gradient): shaped like the input, on its device, in
// its dtype (or float32 where allow_float32).
inline void check_residual(const at::Tensor& input, const c10::optional<at::Tensor>& residual, const char* op,
                           bool allow_float32) {
  if (!has(residual)) return;
  TORCH_CHECK(residual->sizes() == input.sizes(), op, ": the residual has shape ", residual->sizes(),
              " but the input has shape ", input.sizes());
  TORCH_CHECK(residual->device() == input.device(), op, ": the residual is on ", residual->device(),
              " but the input is on ", input.device());
  const auto t = residual->scalar_type();
  TORCH_CHECK(t == input.scalar_type() || (allow_float32 && t == at::kFloat), op, ": the residual has dtype ", t,
              " but the input has dtype ", input.scalar_type(),
              allow_float32 ? " (float32 residuals are allowed with any input)" : "");
}

// BatchNorm's residual z of act(bn(x) + z): in the input's dtype; the activation none, ReLU
// or LeakyReLU (the backward reads the derivative off the output).
inline void check_bn_residual(const at::Tensor& input, const c10::optional<at::Tensor>& residual, int64_t act) {
  check_residual(input, residual, "batch_norm", false);
  TORCH_CHECK_VALUE(!has(residual) || act == kNone || act == kRelu || act == kLeakyRelu,
                    "batch_norm with a residual: the activation must be none, relu or leaky_relu, not code ", act);
}

// LayerNorm: checks the shapes, returns the normalised size L.
inline int64_t check_layer_norm(const at::Tensor& input, at::IntArrayRef shape,
                         const c10::optional<at::Tensor>& weight,
                         const c10::optional<at::Tensor>& bias) {
  check_input_dtype(input, "layer_norm");
  const int64_t k = shape.size();
  TORCH_CHECK(k >= 1, "Expected normalized_shape to be at least 1-dimensional, i.e., containing at "
              "least one element, but got normalized_shape = ", shape);
  bool ok = input.dim() >= k;
  for (int64_t i = 0; ok && i < k; ++i) ok = input.size(input.dim() - k + i) == shape[i];
  TORCH_CHECK(ok, "Given normalized_shape=", shape, ", expected input with shape [*",
              [&] { std::string s; for (auto v : shape) s += ", " + std::to_string(v); return s; }(),
              "], but got input of size", input.sizes());
  int64_t L = 1;
  for (auto v : shape) L *= v;
  for (const auto* p : {&weight, &bias}) {
    if (has(*p))
      TORCH_CHECK((*p)->sizes() == shape, "Expected ", p == &weight ? "weight" : "bias",
                  " to be of same shape as normalized_shape, but got ",
                  p == &weight ? "weight" : "bias", " of shape ", (*p)->sizes(),
                  " and normalized_shape = ", shape);
  }
  check_param(weight, input, "weight", L, "layer_norm");
  check_param(bias, input, "bias", L, "layer_norm");
  return L;
}

// add_norm_fwd/bwd: LayerNorm's checks, no bias for RMSNorm, and a residual (or its
// gradient) in the input's dtype or float32.
inline int64_t check_add_norm(const at::Tensor& input, const c10::optional<at::Tensor>& residual,
                              at::IntArrayRef shape, const c10::optional<at::Tensor>& weight,
                              const c10::optional<at::Tensor>& bias, bool rms, const char* op) {
  const int64_t L = check_layer_norm(input, shape, weight, bias);
  TORCH_CHECK(!rms || !has(bias), op, ": RMSNorm has no bias");
  check_residual(input, residual, op, true);
  return L;
}

// The dtype of add_norm_fwd's residual_out, which is the tensor normalised.
inline at::ScalarType residual_dtype(const at::Tensor& input, bool residual_in_fp32) {
  return residual_in_fp32 ? at::kFloat : input.scalar_type();
}

// LayerNorm's rows, one statistic each: the product of the dims before normalized_shape
// (also when normalized_shape holds a 0, as torch and the fake kernels count them).
inline int64_t layer_norm_rows(const at::Tensor& input, at::IntArrayRef shape) {
  int64_t R = 1;
  for (int64_t d = 0; d < input.dim() - int64_t(shape.size()); ++d) R *= input.size(d);
  return R;
}

// GroupNorm shape: N samples, C channels in G groups, S spatial elements.
struct GnShape {
  int64_t N, C, G, S;
  bool channels_last;  // the kernels read it as (N, S, C)
  int64_t cg() const { return G > 0 ? C / G : 0; }  // G = C = 0: InstanceNorm of no channel
  int64_t row_len() const { return cg() * S; }
};


inline GnShape check_group_norm(const at::Tensor& input, int64_t G,
                         const c10::optional<at::Tensor>& weight,
                         const c10::optional<at::Tensor>& bias, const char* op) {
  TORCH_CHECK(input.dim() >= 2, "Expected at least 2 dimensions for input tensor but received ",
              input.dim());
  GnShape s{input.size(0), input.size(1), G, 1, false};
  for (int64_t d = 2; d < input.dim(); ++d) s.S *= input.size(d);
  TORCH_CHECK((G > 0 && s.C % G == 0) || (G == 0 && s.C == 0),
              "Expected number of channels in input to be divisible by num_groups, but got input "
              "of shape ", input.sizes(), " and num_groups=", G);
  for (const auto* p : {&weight, &bias}) {
    if (has(*p))
      TORCH_CHECK((*p)->dim() == 1 && (*p)->numel() == s.C, "Expected ",
                  p == &weight ? "weight" : "bias",
                  " to be a vector of size equal to the number of channels in input, but got ",
                  p == &weight ? "weight" : "bias", " of shape ", (*p)->sizes(),
                  " and input of shape ", input.sizes());
  }
  check_param(weight, input, "weight", s.C, op);
  check_param(bias, input, "bias", s.C, op);
  return s;
}

// InstanceNorm (GroupNorm with one group per channel, plus running statistics).
inline GnShape check_instance_norm(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                                   const c10::optional<at::Tensor>& bias,
                                   const c10::optional<at::Tensor>& running_mean,
                                   const c10::optional<at::Tensor>& running_var) {
  check_input_dtype_not_implemented(input, "instance_norm");
  TORCH_CHECK(input.dim() >= 2, "instance_norm: expected at least 2D input (got ", input.dim(),
              "D input)");
  const int64_t C = input.size(1);
  check_param(running_mean, input, "running_mean", C, "instance_norm");
  check_param(running_var, input, "running_var", C, "instance_norm");
  check_empty_affine(input, input.size(0) * C, weight, bias);
  return check_group_norm(input, C, weight, bias, "instance_norm");
}

// GroupNorm's own refusals, torch's (InstanceNorm, GroupNorm with a group per channel,
// takes empty inputs).
inline void check_group_norm_sizes(const GnShape& s) {
  TORCH_CHECK(s.C > 0, "Expected number of channels to be greater than 0, got ", s.C);
  TORCH_CHECK(s.S > 0, "Expected HxW to be greater than 0, got ", s.S);
}

}  // namespace fusednorm
