// Memory layouts, decided once for every backend.
//
// Output layout: what torch.nn gives for the same input (ATen's CPU kernels), so that a
// module swap changes no strides downstream:
//   BatchNorm: a contiguous input gives a contiguous output, a dense channels_last one a
//              channels_last output, anything else follows suggest_memory_format(); an
//              empty input, an output of its own strides (torch clones it);
//   GroupNorm: suggest_memory_format() (which, for a channels_last-dense input whose size-1
//              dimensions make its strides ambiguous, can say contiguous);
//   InstanceNorm and LayerNorm: always contiguous.
// The kernels then read the input made dense in that format (no copy when it already is).
//
// How BatchNorm's input reaches the kernels:
//   rows (NCHW): N*C rows of S contiguous spatial elements;
//   cols (NHWC): channels_last input, or S == 1, seen as an (N*S, C) matrix.
#pragma once
#include <ATen/core/Tensor.h>

namespace fusednorm {

inline at::MemoryFormat channels_last_format_of_rank(int64_t dim) {
  return dim == 5 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
}

inline at::MemoryFormat batch_norm_format(const at::Tensor& input) {
  // An empty input's output keeps its strides (torch's batch_norm clones it); Preserve is
  // only ever passed to empty_like.
  if (input.numel() == 0) return at::MemoryFormat::Preserve;
  if (input.is_contiguous()) return at::MemoryFormat::Contiguous;
  if ((input.dim() == 4 || input.dim() == 5) &&
      input.is_contiguous(channels_last_format_of_rank(input.dim())))
    return channels_last_format_of_rank(input.dim());
  return input.suggest_memory_format();
}

inline at::MemoryFormat group_norm_format(const at::Tensor& input) {
  return input.suggest_memory_format();
}

struct BnLayout {
  at::Tensor x;  // the input, dense in `format`: what the kernels read
  at::MemoryFormat format;
  int64_t N, C, S;
  bool cols;
};

inline BnLayout bn_layout(const at::Tensor& input) {
  BnLayout l;
  l.N = input.size(0);
  l.C = input.size(1);
  l.S = 1;
  for (int64_t d = 2; d < input.dim(); ++d) l.S *= input.size(d);
  l.format = batch_norm_format(input);
  l.x = l.format == at::MemoryFormat::Preserve ? input : input.contiguous(l.format);
  l.cols = l.format != at::MemoryFormat::Contiguous || l.S == 1;
  return l;
}

// The gradient in the same memory layout as the input the kernels read.
inline at::Tensor like_layout(const at::Tensor& g, const BnLayout& l) {
  return l.format == at::MemoryFormat::Preserve ? g : g.contiguous(l.format);
}

}  // namespace fusednorm
