// LayerNorm, GroupNorm and InstanceNorm on the CPU: statistics per contiguous row.
//   LayerNorm: a row is the trailing normalized_shape (L elements), affine per element.
//   GroupNorm: a row is one (sample, group): C/G channels of S spatial elements, affine per
//              channel. InstanceNorm is GroupNorm with G = C.
// Rows are processed in small blocks (statistics, then normalise) so the second read of a
// block comes from cache: one pass over memory forward, one pass backward.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/norm_math.h"
#include "cpu_utils.h"

namespace fusednorm {
namespace cpu {
namespace {

// Rows per cache block: about 64 KiB of float input.
inline int64_t block_rows(int64_t row_len) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_len, 1));
}

// Runs f(begin, end) over [0, rows) in parallel, in cache-sized blocks.
template <typename F>
void for_row_blocks(int64_t rows, int64_t row_len, F&& f) {
  const int64_t blk = block_rows(row_len);
  parallel_chunks(rows, num_chunks(rows, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(row_len, 1))),
                  [&](int64_t, int64_t b, int64_t e) {
                    for (int64_t r = b; r < e; r += blk) f(r, std::min(e, r + blk));
                  });
}

// ---- LayerNorm -----------------------------------------------------------------------

int64_t check_layer_norm(const at::Tensor& input, at::IntArrayRef shape,
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(
    const at::Tensor& input, at::IntArrayRef shape, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps, int64_t act, double slope) {
  const int64_t L = check_layer_norm(input, shape, weight, bias);
  const at::Tensor x = input.contiguous();
  const int64_t R = L == 0 ? 0 : x.numel() / L;
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor mean_t = at::empty({R}, x.options().dtype(acc_dtype(x)));
  at::Tensor rstd_t = at::empty({R}, x.options().dtype(acc_dtype(x)));
  if (R == 0 || L == 0) return {y, mean_t, rstd_t};
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
      for (int64_t r = b; r < e; ++r) rstd[r] = rstd_from_m2<A>(rstd[r], A(L), A(eps));
      k.layer_norm_apply(xp + b * L, yp + b * L, e - b, L, mean + b, rstd + b, gamma.data(),
                         beta.data(), act, A(slope));
    });
  });
  return {y, mean_t, rstd_t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, at::IntArrayRef shape,
    const at::Tensor& mean_t, const at::Tensor& rstd_t, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, int64_t act, double slope, std::array<bool, 3> mask) {
  const int64_t L = check_layer_norm(input, shape, weight, bias);
  const at::Tensor x = input.contiguous();
  const at::Tensor dy = grad_out.to(x.scalar_type()).contiguous();
  const int64_t R = L == 0 ? 0 : x.numel() / L;
  at::Tensor dx = mask[0] ? at::empty_like(x, at::MemoryFormat::Contiguous) : at::empty({0}, x.options());
  at::Tensor dweight, dbias;
  dispatch_storage(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const auto& k = table<T>();
    std::vector<A> gamma = to_acc_vector<A>(weight, L, A(1));
    std::vector<A> beta = to_acc_vector<A>(bias, L, A(0));
    const at::Tensor mean_c = mean_t.to(c10::CppTypeToScalarType<A>::value).contiguous();
    const at::Tensor rstd_c = rstd_t.to(c10::CppTypeToScalarType<A>::value).contiguous();
    const int64_t chunks = num_chunks(R, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(L, 1)));
    // One dgamma/dbeta partial per chunk, summed in chunk order.
    std::vector<A> pg(std::max<int64_t>(chunks, 1) * L, A(0)), pb(std::max<int64_t>(chunks, 1) * L, A(0));
    const T* xp = ptr<T>(x);
    const T* gp = ptr<T>(dy);
    T* dp = mask[0] ? ptr<T>(dx) : nullptr;
    parallel_chunks(R, chunks, [&](int64_t ch, int64_t b, int64_t e) {
      k.layer_norm_backward(xp + b * L, gp + b * L, dp ? dp + b * L : nullptr, e - b, L,
                            mean_c.data_ptr<A>() + b, rstd_c.data_ptr<A>() + b, gamma.data(),
                            beta.data(), act, A(slope), &pg[ch * L], &pb[ch * L]);
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
  auto empty = at::empty({0}, x.options());
  return {dx, dweight.defined() ? dweight : empty, dbias.defined() ? dbias : empty};
}

// ---- GroupNorm / InstanceNorm ---------------------------------------------------------

struct GnShape {
  int64_t N, C, G, S;
  int64_t cg() const { return C / G; }
  int64_t row_len() const { return cg() * S; }
};

GnShape check_group_norm(const at::Tensor& input, int64_t G,
                         const c10::optional<at::Tensor>& weight,
                         const c10::optional<at::Tensor>& bias, const char* op) {
  TORCH_CHECK(input.dim() >= 2, "Expected at least 2 dimensions for input tensor but received ",
              input.dim());
  GnShape s{input.size(0), input.size(1), G, 1};
  for (int64_t d = 2; d < input.dim(); ++d) s.S *= input.size(d);
  TORCH_CHECK(G > 0 && s.C % G == 0,
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

// GroupNorm forward on a contiguous x into contiguous y. Writes mean/rstd per (n, g) and,
// if m2 is given, the rows' M2 (InstanceNorm's running variance needs it).
template <typename T, typename A>
void group_norm_forward(const GnShape& s, const T* x, T* y, const std::vector<A>& gamma,
                        const std::vector<A>& beta, A eps, int64_t act, A slope, A* mean,
                        A* rstd, A* m2) {
  const auto& k = table<T>();
  const int64_t Cg = s.cg(), S = s.S, L = s.row_len(), G = s.G;
  for_row_blocks(s.N * G, L, [&](int64_t b, int64_t e) {
    k.moments_rows(x + b * L, e - b, L, mean + b, rstd + b);
    A alpha[64], shift[64];  // per-channel fold, in batches of 64 channels
    for (int64_t r = b; r < e; ++r) {
      if (m2) m2[r] = rstd[r];
      rstd[r] = rstd_from_m2<A>(rstd[r], A(L), eps);
      const int64_t c0 = (r % G) * Cg;
      for (int64_t j0 = 0; j0 < Cg; j0 += 64) {
        const int64_t nj = std::min<int64_t>(64, Cg - j0);
        for (int64_t j = 0; j < nj; ++j)
          fold_affine(mean[r], rstd[r], gamma[c0 + j0 + j], beta[c0 + j0 + j], &alpha[j], &shift[j]);
        const int64_t off = r * L + j0 * S;
        k.apply_rows(x + off, y + off, nj, S, alpha, shift, act, slope);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_impl(
    const at::Tensor& input, const GnShape& s, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps, int64_t act, double slope,
    bool keep_channels_last, std::vector<double>* m2_out) {
  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor mean_t = at::empty({s.N, s.G}, x.options().dtype(acc_dtype(x)));
  at::Tensor rstd_t = at::empty({s.N, s.G}, x.options().dtype(acc_dtype(x)));
  if (x.numel() > 0) {
    dispatch_storage(x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      using A = acc_t<T>;
      std::vector<A> gamma = to_acc_vector<A>(weight, s.C, A(1));
      std::vector<A> beta = to_acc_vector<A>(bias, s.C, A(0));
      std::vector<A> m2(m2_out ? s.N * s.G : 0);
      group_norm_forward<T, A>(s, ptr<T>(x), ptr<T>(y), gamma, beta, A(eps), act, A(slope),
                               mean_t.data_ptr<A>(), rstd_t.data_ptr<A>(),
                               m2_out ? m2.data() : nullptr);
      if (m2_out) m2_out->assign(m2.begin(), m2.end());
    });
  }
  if (keep_channels_last) y = y.contiguous(input.suggest_memory_format());
  return {y, mean_t, rstd_t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_fwd_cpu(
    const at::Tensor& input, int64_t G, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps, int64_t act, double slope) {
  check_input_dtype(input, "group_norm");
  const GnShape s = check_group_norm(input, G, weight, bias, "group_norm");
  return group_norm_impl(input, s, weight, bias, eps, act, slope, /*keep_channels_last=*/true,
                         nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_norm_fwd_cpu(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, double momentum, double eps, int64_t act,
    double slope) {
  check_input_dtype_not_implemented(input, "instance_norm");
  TORCH_CHECK(input.dim() >= 2, "instance_norm: expected at least 2D input (got ", input.dim(),
              "D input)");
  const int64_t C = input.size(1);
  check_param(running_mean, input, "running_mean", C, "instance_norm");
  check_param(running_var, input, "running_var", C, "instance_norm");
  const GnShape s = check_group_norm(input, C, weight, bias, "instance_norm");
  const bool update = has(running_mean) || has(running_var);
  std::vector<double> m2;
  // torch.nn.InstanceNorm returns a contiguous output whatever the input's layout.
  auto out = group_norm_impl(input, s, weight, bias, eps, act, slope, false, update ? &m2 : nullptr);
  if (update && s.N > 0 && s.S > 0) {
    // Running statistics follow the batch average of the per-instance statistics, the
    // variance unbiased per instance (what torch's instance_norm does).
    const at::Tensor mean = std::get<1>(out).to(at::kDouble).contiguous();
    const double* mp = mean.data_ptr<double>();
    std::vector<double> fresh_mean(C, 0.0), fresh_var(C, 0.0);
    for (int64_t n = 0; n < s.N; ++n)
      for (int64_t c = 0; c < C; ++c) {
        fresh_mean[c] += mp[n * C + c] / double(s.N);
        fresh_var[c] += m2[n * C + c] / double(s.S - 1) / double(s.N);
      }
    for (auto [p, fresh] : {std::pair{&running_mean, &fresh_mean}, std::pair{&running_var, &fresh_var}}) {
      if (!has(*p)) continue;
      at::Tensor r = **p;
      at::Tensor cur = r.to(at::kDouble).contiguous();
      double* q = cur.data_ptr<double>();
      for (int64_t c = 0; c < C; ++c) q[c] = (1.0 - momentum) * q[c] + momentum * (*fresh)[c];
      r.copy_(cur);
    }
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, int64_t G, const at::Tensor& mean_t,
    const at::Tensor& rstd_t, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, int64_t act, double slope, std::array<bool, 3> mask) {
  check_input_dtype(input, "group_norm");
  const GnShape s = check_group_norm(input, G, weight, bias, "group_norm");
  const at::Tensor x = input.contiguous();
  const at::Tensor dy = grad_out.to(x.scalar_type()).contiguous();
  at::Tensor dx = mask[0] ? at::empty_like(x, at::MemoryFormat::Contiguous) : at::empty({0}, x.options());
  at::Tensor dweight, dbias;
  dispatch_storage(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const auto& k = table<T>();
    const int64_t C = s.C, Cg = s.cg(), S = s.S, L = s.row_len();
    std::vector<A> gamma = to_acc_vector<A>(weight, C, A(1));
    std::vector<A> beta = to_acc_vector<A>(bias, C, A(0));
    const at::Tensor mean_c = mean_t.to(c10::CppTypeToScalarType<A>::value).contiguous();
    const at::Tensor rstd_c = rstd_t.to(c10::CppTypeToScalarType<A>::value).contiguous();
    const A* mean = mean_c.data_ptr<A>();
    const A* rstd = rstd_c.data_ptr<A>();
    // Per (n, c) row: folded affine, the row's mean, and the gradient sums.
    const int64_t R = s.N * C;
    std::vector<A> alpha(R), shift(R), rmean(R), sdy(R), sdx(R), cA(R), cB(R), cC(R);
    const T* xp = ptr<T>(x);
    const T* gp = ptr<T>(dy);
    T* dp = mask[0] ? ptr<T>(dx) : nullptr;
    if (x.numel() > 0) {
      for_row_blocks(s.N * G, L, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r)
          for (int64_t j = 0; j < Cg; ++j) {
            const int64_t c = (r % G) * Cg + j, row = r * Cg + j;
            fold_affine(mean[r], rstd[r], gamma[c], beta[c], &alpha[row], &shift[row]);
            rmean[row] = mean[r];
          }
        const int64_t rb = b * Cg, re = e * Cg;
        k.grad_sums_rows(xp + rb * S, gp + rb * S, re - rb, S, &alpha[rb], &shift[rb], &rmean[rb],
                         act, A(slope), &sdy[rb], &sdx[rb]);
        if (!dp) return;
        for (int64_t r = b; r < e; ++r) {
          A a = 0, bsum = 0;
          for (int64_t j = 0; j < Cg; ++j) {
            const int64_t c = (r % G) * Cg + j, row = r * Cg + j;
            a += gamma[c] * sdy[row];
            bsum += gamma[c] * sdx[row] * rstd[r];
          }
          for (int64_t j = 0; j < Cg; ++j) {
            const int64_t c = (r % G) * Cg + j, row = r * Cg + j;
            input_grad_coefficients<A>(mean[r], rstd[r], gamma[c], a, bsum, A(L), &cA[row],
                                       &cB[row], &cC[row]);
          }
        }
        k.input_grad_rows(xp + rb * S, gp + rb * S, dp + rb * S, re - rb, S, &alpha[rb],
                          &shift[rb], &cA[rb], &cB[rb], &cC[rb], act, A(slope));
      });
    }
    // dgamma_c = sum_n sum(dyhat * xhat), dbeta_c = sum_n sum(dyhat).
    std::vector<A> dw(C, A(0)), db(C, A(0));
    for (int64_t n = 0; n < s.N; ++n)
      for (int64_t c = 0; c < C; ++c) {
        dw[c] += sdx[n * C + c] * rstd[n * G + c / Cg];
        db[c] += sdy[n * C + c];
      }
    if (mask[1] && has(weight)) dweight = from_acc_vector(dw, weight->scalar_type());
    if (mask[2] && has(bias)) dbias = from_acc_vector(db, bias->scalar_type());
  });
  auto empty = at::empty({0}, x.options());
  return {dx, dweight.defined() ? dweight : empty, dbias.defined() ? dbias : empty};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusednorm, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
  m.impl("group_norm_fwd", &group_norm_fwd_cpu);
  m.impl("group_norm_bwd", &group_norm_bwd_cpu);
  m.impl("instance_norm_fwd", &instance_norm_fwd_cpu);
}

}  // namespace cpu
}  // namespace fusednorm
