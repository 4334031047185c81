// How BatchNorm's input reaches the kernels, decided once for every backend:
//   rows (NCHW): N*C rows of S contiguous spatial elements;
//   cols (NHWC): channels_last input, or S == 1, seen as an (N*S, C) matrix.
// Other strided inputs are made contiguous (NCHW) first.
#pragma once
#include <ATen/core/Tensor.h>

namespace fusednorm {

struct BnLayout {
  at::Tensor x;  // the input in the layout the kernels read
  int64_t N, C, S;
  bool cols;
};

inline BnLayout bn_layout(const at::Tensor& input) {
  BnLayout l;
  l.N = input.size(0);
  l.C = input.size(1);
  l.S = 1;
  for (int64_t d = 2; d < input.dim(); ++d) l.S *= input.size(d);
  const bool cl = (input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                  (input.dim() == 5 && input.is_contiguous(at::MemoryFormat::ChannelsLast3d));
  if (input.is_contiguous()) {
    l.x = input;
    l.cols = l.S == 1;
  } else if (cl) {
    l.x = input;
    l.cols = true;
  } else {
    l.x = input.contiguous();
    l.cols = l.S == 1;
  }
  return l;
}

// The gradient in the same memory layout as the input the kernels read.
inline at::Tensor like_layout(const at::Tensor& g, const BnLayout& l) {
  if (l.cols && l.S != 1) {
    auto mf = l.x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
    return g.contiguous(mf);
  }
  return g.contiguous();
}

}  // namespace fusednorm
