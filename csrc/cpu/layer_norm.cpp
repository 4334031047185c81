// LayerNorm and RMSNorm on the CPU, with an optional residual add before them: statistics
// per row of the trailing normalized_shape (L elements), affine per element. Forward does
// the add, the statistics and the normalisation per cache-sized block of rows (one pass
// over memory: x and the residual read, the sum and y written); backward does both of its
// row passes from cache, adds the residual's gradient in the second, and keeps one
// dgamma/dbeta partial per thread.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/norm_math.h"
#include "cpu_utils.h"

namespace fusednorm {
namespace cpu {
namespace {

using Result3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Result4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// rstd from the moments moments_rows left in (mean, rstd) for rows [b, e); RMSNorm's
// statistics are about zero (its mean is 0).
template <typename A>
void finish_stats(A* mean, A* rstd, int64_t b, int64_t e, int64_t L, A eps, bool rms) {
  for (int64_t r = b; r < e; ++r) {
    if (rms) {
      rstd[r] = rstd_from_m2<A>(m2_about_zero<A>(rstd[r], mean[r], L), L, eps);
      mean[r] = A(0);
    } else {
      rstd[r] = rstd_from_m2<A>(rstd[r], L, eps);
    }
  }
}

// y = act(norm(x + residual)); the sum is written to residual_out, in the input's storage
// type T or in float32 (residual_in_fp32), and normalised from cache.
Result4 add_norm_fwd_cpu(const at::Tensor& input, const c10::optional<at::Tensor>& residual,
                         at::IntArrayRef shape, const c10::optional<at::Tensor>& weight,
                         const c10::optional<at::Tensor>& bias, double eps, bool rms,
                         bool residual_in_fp32, int64_t act, double act_a, double act_b) {
  check_activation(act);
  const int64_t L = check_add_norm(input, residual, shape, weight, bias, rms, "add_norm_fwd");
  const at::Tensor x = input.contiguous();
  const int64_t R = layer_norm_rows(x, shape);
  const at::ScalarType sum_type = has(residual) ? residual_dtype(x, residual_in_fp32) : x.scalar_type();
  // The kernels add x + r in float (double for double) with r in the sum's dtype (a 16-bit
  // residual into a float32 sum: converted first, exactly). The other combinations (a
  // float32 residual into a 16-bit or double sum, a double input into a float32 sum) are
  // summed by ATen in the wider type and rounded once, then only normalised.
  const bool presum = has(residual) && ((residual->scalar_type() == at::kFloat && sum_type != at::kFloat) ||
                                        (x.scalar_type() == at::kDouble && sum_type != at::kDouble));
  const bool add = has(residual) && !presum;
  const at::Tensor r = add ? residual->to(sum_type).contiguous() : at::Tensor();
  const at::ScalarType wide = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor s = presum ? at::add(x.to(wide), residual->to(wide)).to(sum_type).contiguous()
               : add    ? empty_output_like(x, sum_type)
                        : at::empty({0}, x.options());
  at::Tensor y = empty_output_like(x);
  const auto stat_options = x.options().dtype(sum_type == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor mean_t = at::empty({R}, stat_options);
  at::Tensor rstd_t = at::empty({R}, stat_options);
  if (R == 0 || L == 0) return {y, s, mean_t.zero_(), rstd_t.zero_()};  // no statistics
  dispatch_storage(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = ptr<T>(x);
    T* yp = ptr<T>(y);
    if (sum_type == x.scalar_type()) {  // normalise in T
      using A = acc_t<T>;
      const auto& k = table<T>();
      std::vector<A> gamma = to_acc_vector<A>(weight, L, A(1));
      std::vector<A> beta = to_acc_vector<A>(bias, L, A(0));
      const T* rp = add ? ptr<T>(r) : nullptr;
      T* sp = add || presum ? ptr<T>(s) : nullptr;
      A* mean = mean_t.data_ptr<A>();
      A* rstd = rstd_t.data_ptr<A>();
      for_row_blocks(R, L, [&](int64_t b, int64_t e) {
        const int64_t off = b * L, n = (e - b) * L;
        const T* src = presum ? sp + off : xp + off;
        if (add) {
          k.add(xp + off, rp + off, sp + off, n);
          src = sp + off;
        }
        k.moments_rows(src, e - b, L, mean + b, rstd + b);  // rstd holds m2 for now
        finish_stats<A>(mean, rstd, b, e, L, A(eps), rms);
        k.layer_norm_apply(src, yp + off, e - b, L, mean + b, rstd + b, gamma.data(), beta.data(), act,
                           act_params<A>(act_a, act_b), next_block<T>(xp, rp, off, n, n, R * L));
      });
    } else {  // the sum in float32: normalised in float, rounded to T from a scratch block
      const auto& kf = table<float>();
      const auto& k = table<T>();
      std::vector<float> gamma = to_acc_vector<float>(weight, L, 1.f);
      std::vector<float> beta = to_acc_vector<float>(bias, L, 0.f);
      const float* rp = add ? ptr<float>(r) : nullptr;
      float* sp = ptr<float>(s);
      float* mean = mean_t.data_ptr<float>();
      float* rstd = rstd_t.data_ptr<float>();
      for_row_blocks(R, L, [&](int64_t b, int64_t e) {
        const int64_t off = b * L, n = (e - b) * L;
        std::vector<float> scratch(n);
        if (add) k.add_to_float(xp + off, rp + off, sp + off, n);  // (presummed otherwise)
        kf.moments_rows(sp + off, e - b, L, mean + b, rstd + b);
        finish_stats<float>(mean, rstd, b, e, L, float(eps), rms);
        kf.layer_norm_apply(sp + off, scratch.data(), e - b, L, mean + b, rstd + b, gamma.data(),
                            beta.data(), act, act_params<float>(act_a, act_b), {});
        k.from_float(scratch.data(), yp + off, n);
      });
    }
  });
  return {y, s, mean_t, rstd_t};
}

// The input gradient (plus grad_residual) and parameter gradients of add_norm_fwd, from
// the normalised tensor `input` (its residual_out, or its input without a residual).
Result3 add_norm_bwd_cpu(const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_residual,
                         const at::Tensor& input, at::IntArrayRef shape, const at::Tensor& mean_t,
                         const at::Tensor& rstd_t, const c10::optional<at::Tensor>& weight,
                         const c10::optional<at::Tensor>& bias, bool rms, int64_t act, double act_a,
                         double act_b, std::array<bool, 3> mask) {
  check_activation(act);
  const int64_t L = check_add_norm(input, grad_residual, shape, weight, bias, rms, "add_norm_bwd");
  check_backward_args(grad_out, input, mean_t, rstd_t, layer_norm_rows(input, shape), "add_norm_bwd");
  const int64_t R = L == 0 ? 0 : input.numel() / L;  // rows with elements to differentiate
  const at::Tensor x = input.contiguous();
  const at::Tensor dy = grad_out.to(x.scalar_type()).contiguous();
  const bool add = mask[0] && has(grad_residual);
  const at::Tensor dres = add ? grad_residual->to(x.scalar_type()).contiguous() : at::Tensor();
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
    // One dgamma/dbeta partial per chunk, summed in chunk order, each partial apart from
    // the others (partial_stride: no shared lines, no 4K aliasing between the two the
    // kernel updates side by side).
    const int64_t stride = partial_stride<A>(L);
    std::vector<A> partials(2 * std::max<int64_t>(chunks, 1) * stride, A(0));
    A* pg = partials.data();  // chunk ch's dgamma at pg[2*ch*stride], its dbeta one stride on
    const T* xp = ptr<T>(x);
    const T* gp = ptr<T>(dy);
    const T* rp = add ? ptr<T>(dres) : nullptr;
    T* dp = mask[0] ? ptr<T>(dx) : nullptr;
    parallel_chunks(R, chunks, [&](int64_t ch, int64_t b, int64_t e) {
      k.layer_norm_backward(xp + b * L, gp + b * L, rp ? rp + b * L : nullptr, dp ? dp + b * L : nullptr,
                            e - b, L, mean_c.data_ptr<A>() + b, rstd_c.data_ptr<A>() + b, gamma.data(),
                            beta.data(), rms, act, act_params<A>(act_a, act_b), pg + 2 * ch * stride,
                            pg + (2 * ch + 1) * stride);
    });
    std::vector<A> dg(pg, pg + L), db(pg + stride, pg + stride + L);
    for (int64_t ch = 1; ch < chunks; ++ch)
      for (int64_t i = 0; i < L; ++i) {
        dg[i] += pg[2 * ch * stride + i];
        db[i] += pg[(2 * ch + 1) * stride + i];
      }
    if (mask[1] && has(weight)) dweight = from_acc_vector(dg, weight->scalar_type()).view(shape);
    if (mask[2] && has(bias)) dbias = from_acc_vector(db, bias->scalar_type()).view(shape);
  });
  return {dx, or_empty(dweight, x.options()), or_empty(dbias, x.options())};
}

// Plain LayerNorm: add_norm without a residual.
Result3 layer_norm_fwd_cpu(const at::Tensor& input, at::IntArrayRef shape,
                           const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                           double eps, int64_t act, double act_a, double act_b) {
  auto [y, s, mean, rstd] = add_norm_fwd_cpu(input, c10::nullopt, shape, weight, bias, eps, false, false,
                                             act, act_a, act_b);
  return {y, mean, rstd};
}

Result3 layer_norm_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& input, at::IntArrayRef shape,
                           const at::Tensor& mean, const at::Tensor& rstd,
                           const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                           int64_t act, double act_a, double act_b, std::array<bool, 3> mask) {
  return add_norm_bwd_cpu(grad_out, c10::nullopt, input, shape, mean, rstd, weight, bias, false, act, act_a,
                          act_b, mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusednorm, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
  m.impl("add_norm_fwd", &add_norm_fwd_cpu);
  m.impl("add_norm_bwd", &add_norm_bwd_cpu);
}

}  // namespace cpu
}  // namespace fusednorm
