// LayerNorm on the CPU: statistics per row of the trailing normalized_shape (L elements),
// affine per element. Forward does statistics and normalisation per cache-sized block of
// rows (one pass over memory); backward does both of its row passes from cache and keeps
// one dgamma/dbeta partial per thread.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/norm_math.h"
#include "cpu_utils.h"

namespace fusednorm {
namespace cpu {
namespace {

// ---- LayerNorm -----------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(
    const at::Tensor& input, at::IntArrayRef shape, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps, int64_t act, double act_a, double act_b) {
  check_activation(act);
  const int64_t L = check_layer_norm(input, shape, weight, bias);
  const at::Tensor x = input.contiguous();
  const int64_t R = layer_norm_rows(x, shape);
  at::Tensor y = empty_output_like(x);
  at::Tensor mean_t = at::empty({R}, x.options().dtype(acc_dtype(x)));
  at::Tensor rstd_t = at::empty({R}, x.options().dtype(acc_dtype(x)));
  if (R == 0 || L == 0) return {y, mean_t.zero_(), rstd_t.zero_()};  // empty rows: no statistics
  dispatch_storage(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const auto& k = table<T>();
    std::vector<A> gamma = to_acc_vector<A>(weight, L, A(1));
    std::vector<A> beta = to_acc_vector<A>(bias, L, A(0));
    const T* xp = ptr<T>(x);
    T* yp = ptr<T>(y);
    A* mean = mean_t.data_ptr<A>();
    A* rstd = rstd_t.data_ptr<A>();
    for_row_blocks(R, L, [&](int64_t b, int64_t e) {
      k.moments_rows(xp + b * L, e - b, L, mean + b, rstd + b);  // rstd holds m2 for now
      for (int64_t r = b; r < e; ++r) rstd[r] = rstd_from_m2<A>(rstd[r], L, A(eps));
      k.layer_norm_apply(xp + b * L, yp + b * L, e - b, L, mean + b, rstd + b, gamma.data(),
                         beta.data(), act, act_params<A>(act_a, act_b),
                         next_block<T>(xp, nullptr, b * L, (e - b) * L, (e - b) * L, R * L));
    });
  });
  return {y, mean_t, rstd_t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, at::IntArrayRef shape,
    const at::Tensor& mean_t, const at::Tensor& rstd_t, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, int64_t act, double act_a, double act_b, std::array<bool, 3> mask) {
  check_activation(act);
  const int64_t L = check_layer_norm(input, shape, weight, bias);
  check_backward_args(grad_out, input, mean_t, rstd_t, layer_norm_rows(input, shape),
                      "layer_norm_bwd");
  const int64_t R = L == 0 ? 0 : input.numel() / L;  // rows with elements to differentiate
  const at::Tensor x = input.contiguous();
  const at::Tensor dy = grad_out.to(x.scalar_type()).contiguous();
  at::Tensor dx = mask[0] ? empty_output_like(x) : at::empty({0}, x.options());
  at::Tensor dweight, dbias;
  dispatch_storage(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const auto& k = table<T>();
    std::vector<A> gamma = to_acc_vector<A>(weight, L, A(1));
    std::vector<A> beta = to_acc_vector<A>(bias, L, A(0));
    const at::Tensor mean_c = mean_t.to(c10::CppTypeToScalarType<A>::value).contiguous();
    const at::Tensor rstd_c = rstd_t.to(c10::CppTypeToScalarType<A>::value).contiguous();
    const int64_t chunks = num_chunks(R, grain(L));
    // One dgamma/dbeta partial per chunk, summed in chunk order.
    std::vector<A> pg(std::max<int64_t>(chunks, 1) * L, A(0)), pb(std::max<int64_t>(chunks, 1) * L, A(0));
    const T* xp = ptr<T>(x);
    const T* gp = ptr<T>(dy);
    T* dp = mask[0] ? ptr<T>(dx) : nullptr;
    parallel_chunks(R, chunks, [&](int64_t ch, int64_t b, int64_t e) {
      k.layer_norm_backward(xp + b * L, gp + b * L, dp ? dp + b * L : nullptr, e - b, L,
                            mean_c.data_ptr<A>() + b, rstd_c.data_ptr<A>() + b, gamma.data(),
                            beta.data(), act, act_params<A>(act_a, act_b), &pg[ch * L], &pb[ch * L]);
    });
    for (int64_t ch = 1; ch < chunks; ++ch)
      for (int64_t i = 0; i < L; ++i) {
        pg[i] += pg[ch * L + i];
        pb[i] += pb[ch * L + i];
      }
    pg.resize(L);
    pb.resize(L);
    if (mask[1] && has(weight)) dweight = from_acc_vector(pg, weight->scalar_type()).view(shape);
    if (mask[2] && has(bias)) dbias = from_acc_vector(pb, bias->scalar_type()).view(shape);
  });
  return {dx, or_empty(dweight, x.options()), or_empty(dbias, x.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusednorm, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
}

}  // namespace cpu
}  // namespace fusednorm
