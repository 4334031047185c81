// The op schemas, written once; csrc/ops.cpp defines them in the fusednorm namespace and
// the CUDA emulation tests in their own (fusednorm_emu).
#pragma once
#include <torch/library.h>

namespace fusednorm {

inline void define_schemas(torch::Library& m) {
  // activation: norm_math.h's code; act_a, act_b: its parameters (negative_slope, alpha,
  // min_val/max_val, beta/threshold), unused by the others.
  // BatchNorm: statistics per channel (dim 1) over batch and spatial dims. In eval
  // (training=False) mean/rstd come from the running statistics.
  // residual: z of act(bn(x) + z) (ResNet tails), shaped and typed as the input; the
  // activation is then none, relu or leaky_relu.
  m.def(
      "batch_norm_fwd(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps, int activation, "
      "float act_a, float act_b, Tensor? residual=None) -> (Tensor, Tensor, Tensor)");
  // Per-channel batch statistics only: mean and M2 = sum((x - mean)^2) (SyncBatchNorm
  // merges them across processes).
  m.def("batch_norm_stats(Tensor input) -> (Tensor, Tensor)");
  m.def(
      "batch_norm_bwd(Tensor grad_out, Tensor input, Tensor? weight, Tensor? bias, Tensor mean, "
      "Tensor rstd, bool training, int activation, float act_a, float act_b, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
  // LayerNorm over the trailing normalized_shape dims; mean/rstd have one entry per row.
  m.def(
      "layer_norm_fwd(Tensor input, int[] normalized_shape, Tensor? weight, Tensor? bias, "
      "float eps, int activation, float act_a, float act_b) -> (Tensor, Tensor, Tensor)");
  m.def(
      "layer_norm_bwd(Tensor grad_out, Tensor input, int[] normalized_shape, Tensor mean, "
      "Tensor rstd, Tensor? weight, Tensor? bias, int activation, float act_a, float act_b, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // LayerNorm, or RMSNorm (rms: no mean, no bias; mean is returned as zeros), of
  // input + residual: returns (y, residual_out, mean, rstd), residual_out = input + residual
  // in float32 if residual_in_fp32, else in the input's dtype (an empty tensor without a
  // residual), y = act(norm(residual_out)) in the input's dtype.
  m.def(
      "add_norm_fwd(Tensor input, Tensor? residual, int[] normalized_shape, Tensor? weight, "
      "Tensor? bias, float eps, bool rms, bool residual_in_fp32, int activation, float act_a, "
      "float act_b) -> (Tensor, Tensor, Tensor, Tensor)");
  // Its backward, from the normalised tensor (residual_out, or the input without a
  // residual): dx = the norm's input gradient + grad_residual (the gradient residual_out
  // receives directly), in `input`'s dtype.
  m.def(
      "add_norm_bwd(Tensor grad_out, Tensor? grad_residual, Tensor input, int[] normalized_shape, "
      "Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias, bool rms, int activation, "
      "float act_a, float act_b, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // GroupNorm: statistics per (sample, group); mean/rstd are (N, num_groups).
  m.def(
      "group_norm_fwd(Tensor input, int num_groups, Tensor? weight, Tensor? bias, float eps, "
      "int activation, float act_a, float act_b) -> (Tensor, Tensor, Tensor)");
  m.def(
      "group_norm_bwd(Tensor grad_out, Tensor input, int num_groups, Tensor mean, Tensor rstd, "
      "Tensor? weight, Tensor? bias, int activation, float act_a, float act_b, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
  // InstanceNorm with input statistics: GroupNorm with one group per channel, plus the
  // running statistics' update from the batch average of the per-instance statistics.
  // Its backward is group_norm_bwd with num_groups = C.
  m.def(
      "instance_norm_fwd(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, float momentum, float eps, int activation, "
      "float act_a, float act_b) -> (Tensor, Tensor, Tensor)");
}

}  // namespace fusednorm
