// GroupNorm and InstanceNorm (GroupNorm with one group per channel) on the CPU.
// Statistics per (sample n, group g) over C/G channels x S spatial elements; affine per
// channel. Two layouts:
//   NCHW: group (n, g) is one contiguous row of (C/G)*S elements; processed per
//         cache-sized block of rows (statistics, then normalise: one pass over memory).
//   channels_last (GroupNorm whose output torch gives channels_last, layout.h; InstanceNorm
//         always reads and returns NCHW): sample n is an (S, C) matrix; per-channel
//         column statistics merged over each group's channels, per sample.
// Backward, in either layout: per-(n, c) sums of dyhat and dyhat*(x - mean), the group's
// totals, then dx = A*dyhat + B*(x - mean) + C with per-(n, c) coefficients.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "../common/checks.h"
#include "../common/layout.h"
#include "../common/norm_math.h"
#include "cpu_utils.h"

namespace fusednorm {
namespace cpu {
namespace {

// The group statistics of sample n, group g, from its channels' column moments (CL).
template <typename A>
Moments<A> merge_channels(const A* cmean, const A* cm2, int64_t c0, int64_t cg, int64_t S) {
  Moments<A> acc{0, 0, 0};
  for (int64_t j = 0; j < cg; ++j) acc = merge(acc, Moments<A>{A(S), cmean[c0 + j], cm2[c0 + j]});
  return acc;
}

// Channels_last: row chunks per sample, so that a batch with fewer samples than threads
// still uses every thread (1 when each thread has a sample, or a chunk would be small).
inline int64_t sample_splits(const GnShape& s) {
  const int64_t threads = at::get_num_threads();
  if (s.N <= 0 || s.N >= threads) return 1;
  return std::max<int64_t>(1, std::min((threads + s.N - 1) / s.N, num_chunks(s.S, grain(s.C))));
}

// Task t of N*P: rows [s0, s1) of sample n, chunk t % P of sample t / P.
struct SampleChunk {
  int64_t n, s0, s1;
};
inline SampleChunk sample_chunk(int64_t S, int64_t P, int64_t t) {
  const int64_t n = t / P, p = t % P;
  return {n, p * S / P, (p + 1) * S / P};
}

// Forward. Writes mean/rstd per (n, g) and, if m2 is given, each group's M2 (InstanceNorm's
// running variance needs it).
template <typename T, typename A>
void group_norm_forward(const GnShape& s, const T* x, T* y, const std::vector<A>& gamma,
                        const std::vector<A>& bias, A eps, int64_t act, ActParams<A> ap, A* mean,
                        A* rstd, A* m2) {
  const auto& k = table<T>();
  const int64_t C = s.C, Cg = s.cg(), S = s.S, L = s.row_len(), G = s.G;
  // Channels_last: sample n's group statistics from its per-channel column moments;
  // fills the sample's per-channel mean and rstd*gamma.
  const auto finish_sample = [&](int64_t n, const A* cmean, const A* cm2, A* gmean, A* alpha) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t r = n * G + g;
      const Moments<A> st = merge_channels(cmean, cm2, g * Cg, Cg, S);
      mean[r] = st.mean;
      rstd[r] = rstd_from_m2<A>(st.m2, L, eps);
      if (m2) m2[r] = st.m2;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        gmean[c] = mean[r];
        alpha[c] = rstd[r] * gamma[c];
      }
    }
  };
  const int64_t P = s.channels_last ? sample_splits(s) : 1;
  if (s.channels_last && P > 1) {
    // Fewer samples than threads: each sample's S rows in P chunks (column moments per
    // chunk, merged per channel in chunk order), then the output chunk by chunk.
    const int64_t tasks = s.N * P;
    std::vector<A> pm(tasks * C, A(0)), pq(tasks * C, A(0)), gmean(s.N * C), alpha(s.N * C);
    parallel_chunks(tasks, tasks, [&](int64_t t, int64_t, int64_t) {
      const auto [n, s0, s1] = sample_chunk(S, P, t);
      k.moments_cols(x + (n * S + s0) * C, s1 - s0, C, A(0), &pm[t * C], &pq[t * C]);
    });
    std::vector<A> cmean(C), cm2(C);
    std::vector<int64_t> rows(P);  // every sample's chunks have the same row counts
    for (int64_t p = 0; p < P; ++p) {
      const SampleChunk ch = sample_chunk(S, P, p);
      rows[p] = ch.s1 - ch.s0;
    }
    for (int64_t n = 0; n < s.N; ++n) {
      merge_column_chunks(&pm[n * P * C], &pq[n * P * C], rows.data(), P, C, cmean.data(), cm2.data());
      finish_sample(n, cmean.data(), cm2.data(), &gmean[n * C], &alpha[n * C]);
    }
    parallel_chunks(tasks, tasks, [&](int64_t t, int64_t, int64_t) {
      const auto [n, s0, s1] = sample_chunk(S, P, t);
      k.apply_cols(x + (n * S + s0) * C, nullptr, y + (n * S + s0) * C, s1 - s0, C, &gmean[n * C],
                   &alpha[n * C], bias.data(), act, ap);
    });
    return;
  }
  if (s.channels_last) {  // a sample per task: its statistics, then its output from cache
    parallel_chunks(s.N, num_chunks(s.N, grain(S * C)),
                    [&](int64_t, int64_t b, int64_t e) {
      std::vector<A> cmean(C), cm2(C), alpha(C), gmean(C);
      for (int64_t n = b; n < e; ++n) {
        const T* xn = x + n * S * C;
        std::fill(cmean.begin(), cmean.end(), A(0));
        std::fill(cm2.begin(), cm2.end(), A(0));
        k.moments_cols(xn, S, C, A(0), cmean.data(), cm2.data());
        finish_sample(n, cmean.data(), cm2.data(), gmean.data(), alpha.data());
        k.apply_cols(xn, nullptr, y + n * S * C, S, C, gmean.data(), alpha.data(), bias.data(), act, ap);
      }
    });
    return;
  }
  for_row_blocks(s.N * G, L, [&](int64_t b, int64_t e) {
    k.moments_rows(x + b * L, e - b, L, mean + b, rstd + b);
    A gmean[64], alpha[64];  // per channel, in batches of 64 channels
    for (int64_t r = b; r < e; ++r) {
      if (m2) m2[r] = rstd[r];
      rstd[r] = rstd_from_m2<A>(rstd[r], L, eps);
      const int64_t c0 = (r % G) * Cg;
      for (int64_t j0 = 0; j0 < Cg; j0 += 64) {
        const int64_t nj = std::min<int64_t>(64, Cg - j0);
        for (int64_t j = 0; j < nj; ++j) {
          gmean[j] = mean[r];
          alpha[j] = rstd[r] * gamma[c0 + j0 + j];
        }
        const int64_t off = r * L + j0 * S;
        k.apply_rows(x + off, nullptr, y + off, nj, S, gmean, alpha, &bias[c0 + j0], act, ap,
                     next_block<T>(x, nullptr, off, nj * S, (e - b) * L, s.N * G * L));
      }
    }
  });
}

// Backward coefficients of sample n, group g, from the per-(n, c) sums:
// dx = A*dyhat + B*(x - mean) + C.
template <typename A>
void group_coefficients(const GnShape& s, int64_t r, const A* mean, const A* rstd,
                        const std::vector<A>& gamma, const A* sdy, const A* sdx, A* cA, A* cB,
                        A* cC) {
  const int64_t Cg = s.cg(), c0 = (r % s.G) * Cg;
  A a = 0, bsum = 0;
  for (int64_t j = 0; j < Cg; ++j) {
    a += (rstd[r] * gamma[c0 + j]) * sdy[j];
    bsum += gamma[c0 + j] * sdx[j] * rstd[r];
  }
  for (int64_t j = 0; j < Cg; ++j)
    input_grad_coefficients<A>(rstd[r], gamma[c0 + j], a, bsum, s.row_len(), &cA[j], &cB[j],
                               &cC[j]);
}

// Backward. sdy/sdx: per-(n, c) sums of dyhat and dyhat*(x - mean), written here; dx if
// non-null.
template <typename T, typename A>
void group_norm_backward(const GnShape& s, const T* x, const T* g, T* dx,
                         const std::vector<A>& gamma, const std::vector<A>& bias, const A* mean,
                         const A* rstd, int64_t act, ActParams<A> ap, A* sdy, A* sdx) {
  const auto& k = table<T>();
  const int64_t C = s.C, Cg = s.cg(), S = s.S, L = s.row_len(), G = s.G;
  // Channels_last: sample n's per-channel mean and rstd*gamma; its coefficients from its
  // per-channel sums.
  const auto sample_params = [&](int64_t n, A* cmean, A* alpha) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t r = n * G + c / Cg;
      alpha[c] = rstd[r] * gamma[c];
      cmean[c] = mean[r];
    }
  };
  const auto sample_coefficients = [&](int64_t n, const A* sdy_n, const A* sdx_n, A* cA, A* cB, A* cC) {
    for (int64_t gr = 0; gr < G; ++gr)
      group_coefficients(s, n * G + gr, mean, rstd, gamma, sdy_n + gr * Cg, sdx_n + gr * Cg, &cA[gr * Cg],
                         &cB[gr * Cg], &cC[gr * Cg]);
  };
  const int64_t P = s.channels_last ? sample_splits(s) : 1;
  if (s.channels_last && P > 1) {
    // Fewer samples than threads: each sample's S rows in P chunks; per-chunk sums added
    // in chunk order, then dx chunk by chunk.
    const int64_t tasks = s.N * P;
    std::vector<A> cmean(s.N * C), alpha(s.N * C), cA(s.N * C), cB(s.N * C), cC(s.N * C);
    std::vector<A> psy(tasks * C, A(0)), psx(tasks * C, A(0));
    for (int64_t n = 0; n < s.N; ++n) sample_params(n, &cmean[n * C], &alpha[n * C]);
    parallel_chunks(tasks, tasks, [&](int64_t t, int64_t, int64_t) {
      const auto [n, s0, s1] = sample_chunk(S, P, t);
      k.grad_sums_cols(x + (n * S + s0) * C, g + (n * S + s0) * C, s1 - s0, C, &cmean[n * C], &alpha[n * C],
                       bias.data(), act, ap, &psy[t * C], &psx[t * C]);
    });
    for (int64_t n = 0; n < s.N; ++n) {
      A* sdy_n = sdy + n * C;
      A* sdx_n = sdx + n * C;
      for (int64_t c = 0; c < C; ++c) {
        A a = 0, b = 0;
        for (int64_t p = 0; p < P; ++p) {
          a += psy[(n * P + p) * C + c];
          b += psx[(n * P + p) * C + c];
        }
        sdy_n[c] = a;
        sdx_n[c] = b;
      }
      if (dx) sample_coefficients(n, sdy_n, sdx_n, &cA[n * C], &cB[n * C], &cC[n * C]);
    }
    if (!dx) return;
    parallel_chunks(tasks, tasks, [&](int64_t t, int64_t, int64_t) {
      const auto [n, s0, s1] = sample_chunk(S, P, t);
      const int64_t off = (n * S + s0) * C;
      k.input_grad_cols(x + off, g + off, dx + off, s1 - s0, C, &cmean[n * C], &alpha[n * C], bias.data(),
                        &cA[n * C], &cB[n * C], &cC[n * C], act, ap);
    });
    return;
  }
  if (s.channels_last) {  // a sample per task
    parallel_chunks(s.N, num_chunks(s.N, grain(S * C)),
                    [&](int64_t, int64_t b, int64_t e) {
      std::vector<A> alpha(C), cmean(C), cA(C), cB(C), cC(C);
      for (int64_t n = b; n < e; ++n) {
        sample_params(n, cmean.data(), alpha.data());
        A* sdy_n = sdy + n * C;
        A* sdx_n = sdx + n * C;
        std::fill(sdy_n, sdy_n + C, A(0));
        std::fill(sdx_n, sdx_n + C, A(0));
        const int64_t off = n * S * C;
        k.grad_sums_cols(x + off, g + off, S, C, cmean.data(), alpha.data(), bias.data(), act,
                         ap, sdy_n, sdx_n);
        if (!dx) continue;
        sample_coefficients(n, sdy_n, sdx_n, cA.data(), cB.data(), cC.data());
        k.input_grad_cols(x + off, g + off, dx + off, S, C, cmean.data(), alpha.data(),
                          bias.data(), cA.data(), cB.data(), cC.data(), act, ap);
      }
    });
    return;
  }
  // NCHW: per (n, c) row of S elements; row mean/alpha/bias/coefficients per row.
  const int64_t R = s.N * C;
  const bool keep = dx != nullptr && keeps_dyhat<T>(act);  // dyhat in dx between the passes
  std::vector<A> alpha(R), rbias(R), rmean(R), cA(R), cB(R), cC(R);
  for_row_blocks(s.N * G, L, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      for (int64_t j = 0; j < Cg; ++j) {
        const int64_t c = (r % G) * Cg + j, row = r * Cg + j;
        alpha[row] = rstd[r] * gamma[c];
        rbias[row] = bias[c];
        rmean[row] = mean[r];
      }
    const int64_t rb = b * Cg, re = e * Cg;
    k.grad_sums_rows(x + rb * S, g + rb * S, re - rb, S, &rmean[rb], &alpha[rb], &rbias[rb], act,
                     ap, &sdy[rb], &sdx[rb], keep ? dx + rb * S : nullptr);
    if (!dx) return;
    for (int64_t r = b; r < e; ++r)
      group_coefficients(s, r, mean, rstd, gamma, &sdy[r * Cg], &sdx[r * Cg], &cA[r * Cg],
                         &cB[r * Cg], &cC[r * Cg]);
    k.input_grad_rows(x + rb * S, keep ? dx + rb * S : g + rb * S, dx + rb * S, re - rb, S, &rmean[rb],
                      &alpha[rb], &rbias[rb], &cA[rb], &cB[rb], &cC[rb], keep ? kNone : act, ap,
                      next_block<T>(x, g, b * L, (e - b) * L, (e - b) * L, s.N * G * L));
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_impl(
    const at::Tensor& input, GnShape s, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps, int64_t act, double act_a, double act_b,
    bool allow_channels_last, std::vector<double>* m2_out) {
  const at::MemoryFormat fmt =
      allow_channels_last ? group_norm_format(input) : at::MemoryFormat::Contiguous;
  s.channels_last = fmt != at::MemoryFormat::Contiguous;
  const at::Tensor x = input.contiguous(fmt);
  at::Tensor y = empty_output_like(x, fmt);
  at::Tensor mean_t = at::empty({s.N, s.G}, x.options().dtype(acc_dtype(x)));
  at::Tensor rstd_t = at::empty({s.N, s.G}, x.options().dtype(acc_dtype(x)));
  if (x.numel() == 0) return {y, mean_t.zero_(), rstd_t.zero_()};  // no statistics to take
  dispatch_storage(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    std::vector<A> gamma = to_acc_vector<A>(weight, s.C, A(1));
    std::vector<A> beta = to_acc_vector<A>(bias, s.C, A(0));
    std::vector<A> m2(m2_out ? s.N * s.G : 0);
    group_norm_forward<T, A>(s, ptr<T>(x), ptr<T>(y), gamma, beta, A(eps), act, act_params<A>(act_a, act_b),
                             mean_t.data_ptr<A>(), rstd_t.data_ptr<A>(),
                             m2_out ? m2.data() : nullptr);
    if (m2_out) m2_out->assign(m2.begin(), m2.end());
  });
  return {y, mean_t, rstd_t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_fwd_cpu(
    const at::Tensor& input, int64_t G, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps, int64_t act, double act_a, double act_b) {
  check_activation(act);
  check_input_dtype(input, "group_norm");
  const GnShape s = check_group_norm(input, G, weight, bias, "group_norm");
  check_group_norm_sizes(s);
  return group_norm_impl(input, s, weight, bias, eps, act, act_a, act_b, /*allow_channels_last=*/true,
                         nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_norm_fwd_cpu(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, double momentum, double eps, int64_t act,
    double act_a, double act_b) {
  check_activation(act);
  const GnShape s = check_instance_norm(input, weight, bias, running_mean, running_var);
  const int64_t C = s.C;
  const bool update = has(running_mean) || has(running_var);
  std::vector<double> m2;
  // torch.nn.InstanceNorm returns a contiguous output whatever the input's layout.
  auto out = group_norm_impl(input, s, weight, bias, eps, act, act_a, act_b,
                             /*allow_channels_last=*/false, update ? &m2 : nullptr);
  if (update && s.N == 0) {
    // torch sets them to the average over no instances: NaN.
    for (const auto* r : {&running_mean, &running_var})
      if (has(*r)) (*r)->fill_(std::numeric_limits<double>::quiet_NaN());
  } else if (update && s.S > 0) {  // (no spatial elements: no statistics, untouched)
    // Running statistics follow the batch average of the per-instance statistics, the
    // variance unbiased per instance (what torch's instance_norm does).
    const at::Tensor mean = std::get<1>(out).to(at::kDouble).contiguous();
    const double* mp = mean.data_ptr<double>();
    std::vector<double> fresh_mean(C, 0.0), fresh_var(C, 0.0);
    for (int64_t n = 0; n < s.N; ++n)
      for (int64_t c = 0; c < C; ++c) {
        fresh_mean[c] += mp[n * C + c] / double(s.N);
        fresh_var[c] += unbiased_var<double>(m2[n * C + c], double(s.S)) / double(s.N);
      }
    if (has(running_mean)) {
      at::Tensor rm = *running_mean;
      update_running(rm, fresh_mean, momentum);
    }
    if (has(running_var)) {
      at::Tensor rv = *running_var;
      update_running(rv, fresh_var, momentum);
    }
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, int64_t G, const at::Tensor& mean_t,
    const at::Tensor& rstd_t, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, int64_t act, double act_a, double act_b, std::array<bool, 3> mask) {
  check_activation(act);
  check_input_dtype(input, "group_norm");
  GnShape s = check_group_norm(input, G, weight, bias, "group_norm");
  check_backward_args(grad_out, input, mean_t, rstd_t, s.N * G, "group_norm_bwd");
  const at::MemoryFormat fmt = group_norm_format(input);
  s.channels_last = fmt != at::MemoryFormat::Contiguous;
  const at::Tensor x = input.contiguous(fmt);
  const at::Tensor dy = grad_out.to(x.scalar_type()).contiguous(fmt);
  at::Tensor dx = mask[0] ? empty_output_like(x, fmt) : at::empty({0}, x.options());
  at::Tensor dweight, dbias;
  dispatch_storage(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const int64_t C = s.C;
    std::vector<A> gamma = to_acc_vector<A>(weight, C, A(1));
    std::vector<A> beta = to_acc_vector<A>(bias, C, A(0));
    const at::Tensor mean_c = mean_t.to(c10::CppTypeToScalarType<A>::value).contiguous();
    const at::Tensor rstd_c = rstd_t.to(c10::CppTypeToScalarType<A>::value).contiguous();
    const A* mean = mean_c.data_ptr<A>();
    const A* rstd = rstd_c.data_ptr<A>();
    std::vector<A> sdy(s.N * C, A(0)), sdx(s.N * C, A(0));
    if (x.numel() > 0)
      group_norm_backward<T, A>(s, ptr<T>(x), ptr<T>(dy), mask[0] ? ptr<T>(dx) : nullptr, gamma,
                                beta, mean, rstd, act, act_params<A>(act_a, act_b), sdy.data(), sdx.data());
    // dgamma_c = sum_n sum(dyhat * xhat), dbeta_c = sum_n sum(dyhat).
    std::vector<A> dw(C, A(0)), db(C, A(0));
    for (int64_t n = 0; n < s.N; ++n)
      for (int64_t c = 0; c < C; ++c) {
        dw[c] += sdx[n * C + c] * rstd[n * G + c / s.cg()];
        db[c] += sdy[n * C + c];
      }
    if (mask[1] && has(weight)) dweight = from_acc_vector(dw, weight->scalar_type());
    if (mask[2] && has(bias)) dbias = from_acc_vector(db, bias->scalar_type());
  });
  return {dx, or_empty(dweight, x.options()), or_empty(dbias, x.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusednorm, CPU, m) {
  m.impl("group_norm_fwd", &group_norm_fwd_cpu);
  m.impl("group_norm_bwd", &group_norm_bwd_cpu);
  m.impl("instance_norm_fwd", &instance_norm_fwd_cpu);
}

}  // namespace cpu
}  // namespace fusednorm
