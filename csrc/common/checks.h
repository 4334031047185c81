// Argument checks shared by every backend's bindings, with torch.nn's exception types
// and messages (RuntimeError unless noted).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

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

inline bool has(const c10::optional<at::Tensor>& p) { return p.has_value() && p->defined(); }

// Accumulation dtype of the statistics: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType acc_dtype(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace fusednorm
