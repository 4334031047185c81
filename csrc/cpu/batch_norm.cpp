// BatchNorm on the CPU: per-channel statistics over (N, spatial).
// Two layouts reach the kernels:
//   rows: NCHW-contiguous input, N*C rows of S spatial elements (row r is channel r % C);
//   cols: channels_last input, or S == 1, seen as an (N*S, C) matrix.
// Forward (training): one read for statistics, one read+write for act(x*alpha + beta).
// Backward: one read of (x, dy) for the per-channel sums, one more to write dx.
// NCHW tensors whose channels fit the L2 cache go channel by channel (by_channel), so
// that the second read of each channel comes from cache; NCHW tensors with short rows take
// their statistics and gradient sums channel by channel from gathered rows (short_rows).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <unistd.h>

#include "../common/checks.h"
#include "../common/layout.h"
#include "../common/norm_math.h"
#include "cpu_utils.h"

namespace fusednorm {
namespace cpu {
namespace {

// Channel c's (mean, m2) from the moments of its N rows of S elements, row(n, &mean, &m2)
// giving row n's: merged in double in row order, as the kernels merge their chunks. Both
// schedules (two-pass and by_channel) merge here, so their statistics are bit-identical.
template <typename A, typename Row>
void merge_channel_rows(int64_t N, int64_t S, Row&& row, A* mean, A* m2) {
  Moments<double> acc{0, 0, 0};
  for (int64_t n = 0; n < N; ++n) {
    A rm, rq;
    row(n, &rm, &rq);
    acc = merge(acc, Moments<double>{double(S), double(rm), double(rq)});
  }
  *mean = A(acc.mean);
  *m2 = A(acc.m2);
}

// Training-mode dx = A*dyhat + B*(x - mean) + C of one channel from its sums of dyhat and
// dyhat*(x - mean), gamma folded in here; both backward schedules use it.
template <typename A>
void training_coefficients(A rstd, A gamma, A sum_dy, A sum_dy_xmu, int64_t count, A* cA, A* cB,
                           A* cC) {
  input_grad_coefficients<A>(rstd, gamma, (rstd * gamma) * sum_dy, gamma * sum_dy_xmu * rstd, count,
                             cA, cB, cC);
}

// NCHW with short rows (a small spatial size, e.g. 7x7): a channel's N rows lie C*S
// elements apart, and the row kernels paid a whole vector reduction (and, for moments, a
// merge) per row, so a 7x7 row cost as much as hundreds of elements. The statistics and
// gradient sums of such channels go channel by channel instead: the channel's rows are
// copied into contiguous chunks of up to kGatherElements and the kernels run on each chunk
// as on one row. The outputs stay row by row, in memory order: computing them from
// whole-channel buffers and scattering them back was slower (strided writes;
// docs/benchmarks.md). Below 2 KiB a row, so never where by_channel is taken (3 KiB rows
// and longer).
constexpr int64_t kGatherElements = 2048;

inline bool short_rows(const BnLayout& l, int64_t elem_bytes) {
  return !l.cols && l.S * elem_bytes < 2048;
}

// Rows [n0, n0 + rows) of channel c of src (laid out as l) into dst, contiguous.
template <typename T>
void gather_rows(const BnLayout& l, int64_t c, int64_t n0, int64_t rows, const T* src, T* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = src + ((n0 + r) * l.C + c) * l.S;
    std::copy(row, row + l.S, dst + r * l.S);
  }
}

// Runs f(c, buf) for every channel, in parallel, with a per-thread buffer of `len`
// elements.
template <typename T, typename F>
void for_channels(const BnLayout& l, int64_t len, F&& f) {
  parallel_chunks(l.C, num_chunks(l.C, grain(l.N * l.S)), [&](int64_t, int64_t cb, int64_t ce) {
    std::vector<T> buf(len);
    for (int64_t c = cb; c < ce; ++c) f(c, buf.data());
  });
}

// Channel c's rows of x (and of g when given) gathered kGatherElements at most at a time
// into bx (bg), with f(elements) called on each chunk; the rows keep their order.
template <typename T, typename F>
void for_gathered_chunks(const BnLayout& l, int64_t c, const T* x, const T* g, T* bx, T* bg, F&& f) {
  const int64_t per_chunk = std::max<int64_t>(1, kGatherElements / std::max<int64_t>(l.S, 1));
  for (int64_t n0 = 0; n0 < l.N; n0 += per_chunk) {
    const int64_t rows = std::min(per_chunk, l.N - n0);
    gather_rows(l, c, n0, rows, x, bx);
    if (g) gather_rows(l, c, n0, rows, g, bg);
    f(rows * l.S);
  }
}

// Per-channel sums over the whole batch: moments (training forward) or gradient sums.
template <typename T, typename A>
void channel_moments(const BnLayout& l, std::vector<A>& mean, std::vector<A>& m2) {
  const auto& k = table<T>();
  const T* x = ptr<T>(l.x);
  const int64_t C = l.C;
  if (l.cols) {
    const int64_t M = l.N * l.S;
    const int64_t chunks = num_chunks(M, grain(C));
    std::vector<A> pm(chunks * C, A(0)), pq(chunks * C, A(0));
    std::vector<int64_t> rows(chunks, 0);
    parallel_chunks(M, chunks, [&](int64_t ch, int64_t b, int64_t e) {
      k.moments_cols(x + b * C, e - b, C, A(0), &pm[ch * C], &pq[ch * C]);
      rows[ch] = e - b;
    });
    merge_column_chunks(pm.data(), pq.data(), rows.data(), chunks, C, mean.data(), m2.data());
  } else if (short_rows(l, sizeof(T))) {
    for_channels<T>(l, kGatherElements, [&](int64_t c, T* bx) {
      Moments<double> acc{0, 0, 0};  // chunks merged in double, as moments_rows merges a row's
      for_gathered_chunks<T>(l, c, x, nullptr, bx, nullptr, [&](int64_t n) {
        A m, q;
        k.moments_rows(bx, 1, n, &m, &q);
        acc = merge(acc, Moments<double>{double(n), double(m), double(q)});
      });
      mean[c] = A(acc.mean);
      m2[c] = A(acc.m2);
    });
  } else {
    const int64_t R = l.N * C, S = l.S;
    std::vector<A> rm(R), rq(R);
    parallel_chunks(R, num_chunks(R, grain(S)),
                    [&](int64_t, int64_t b, int64_t e) {
                      k.moments_rows(x + b * S, e - b, S, &rm[b], &rq[b]);
                    });
    for (int64_t c = 0; c < C; ++c)
      merge_channel_rows<A>(l.N, S, [&](int64_t n, A* m, A* q) {
        *m = rm[n * C + c];
        *q = rq[n * C + c];
      }, &mean[c], &m2[c]);
  }
}

// An output (y or dx) in the layout of l's input (layout.h); an empty input's strides are
// kept (Preserve), which the output allocator does not take.
inline at::Tensor bn_output(const BnLayout& l) {
  if (l.format == at::MemoryFormat::Preserve) return at::empty_like(l.x);
  return empty_output_like(l.x, l.format);
}

// alpha = rstd * gamma per channel: the scale of the pre-activation (norm_math.h).
template <typename A>
std::vector<A> alphas(const std::vector<A>& rstd, const std::vector<A>& gamma) {
  std::vector<A> alpha(rstd.size());
  for (size_t c = 0; c < rstd.size(); ++c) alpha[c] = rstd[c] * gamma[c];
  return alpha;
}

// Repeats a per-channel vector for every (n, c) row of the rows layout.
template <typename A>
std::vector<A> per_row(const std::vector<A>& v, int64_t N) {
  std::vector<A> out(v.size() * N);
  for (int64_t n = 0; n < N; ++n) std::copy(v.begin(), v.end(), out.begin() + n * v.size());
  return out;
}

// NCHW training, channel by channel. The two-pass path reads all of x for the statistics
// and then all of it again for the output; a tensor larger than the caches comes from
// memory twice. Channel by channel, one channel's rows are still in this core's L2 cache
// when its output pass starts: memory reads x once (dy and x once in backward). The
// per-row kernels and the order of every sum and merge are the two-pass path's, so the
// results are bit-identical.
//
// Taken when a channel's inputs fit the L2 cache, there are enough channels to share out
// between the threads (each thread takes whole channels), and rows are long: a channel's
// rows lie C rows apart, and short ones are read at memory latency, not bandwidth.
// Measured on the 2-core VM (1 MiB L2), module forward+backward step / training forward,
// float32, same process: 32x64x56x56 1.15x / 1.12x faster, 32x128x28x28 1.16x / 1.07x;
// with rows of 576 floats level, 400 floats 1.13x slower forward, 256 floats 1.3x slower
// (a prefetch of the next row recovered half of that), hence rows of 3 KiB or more.
inline bool by_channel(const BnLayout& l, int64_t inputs, int64_t elem_bytes) {
  static const int64_t l2_bytes = [] {
    long v = 0;
#ifdef _SC_LEVEL2_CACHE_SIZE
    v = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return v > 0 ? int64_t(v) : int64_t(1) << 20;
  }();
  return !l.cols && l.S * elem_bytes >= 3072 && l.C >= 4 * at::get_num_threads() &&
         inputs * l.N * l.S * elem_bytes <= l2_bytes;
}

// Training forward channel by channel (by_channel): statistics of channel c's N rows,
// then its output from cache. (Prefetching the next channel meanwhile was slower: three
// channels' worth of lines do not fit a 1 MiB L2.)
template <typename T, typename A>
void forward_by_channel(const BnLayout& l, const T* x, const T* z, T* out, const std::vector<A>& gamma,
                        const std::vector<A>& bias, A eps, int64_t act, ActParams<A> ap,
                        std::vector<A>& mean, std::vector<A>& m2, std::vector<A>& rstd) {
  const auto& k = table<T>();
  const int64_t C = l.C, S = l.S, N = l.N;
  parallel_chunks(C, num_chunks(C, 1), [&](int64_t, int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      merge_channel_rows<A>(N, S, [&](int64_t n, A* m, A* q) {
        k.moments_rows(x + (n * C + c) * S, 1, S, m, q);
      }, &mean[c], &m2[c]);
      rstd[c] = rstd_from_m2<A>(m2[c], N * S, eps);
      const A alpha = rstd[c] * gamma[c];
      for (int64_t n = 0; n < N; ++n) {
        const int64_t row = (n * C + c) * S;
        k.apply_rows(x + row, z ? z + row : nullptr, out + row, 1, S, &mean[c], &alpha, &bias[c], act, ap,
                     Ahead<T>{});
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_fwd_cpu(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double momentum, double eps,
    int64_t act, double act_a, double act_b, const c10::optional<at::Tensor>& residual) {
  check_activation(act);
  check_bn_args(input, weight, bias, running_mean, running_var);
  check_bn_residual(input, residual, act);
  TORCH_CHECK(training || (has(running_mean) && has(running_var)),
              "running_mean must be defined in evaluation mode");
  const BnLayout l = bn_layout(input);
  const at::Tensor z = has(residual) ? like_layout(*residual, l) : at::Tensor();  // laid out as x
  const int64_t C = l.C, M = l.N * l.S;
  at::Tensor y = bn_output(l);
  at::Tensor mean_t = at::empty({C}, input.options().dtype(acc_dtype(input)));
  at::Tensor rstd_t = at::empty({C}, input.options().dtype(acc_dtype(input)));

  dispatch_storage(input.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const auto& k = table<T>();
    const T* x = ptr<T>(l.x);
    const T* zp = z.defined() ? ptr<T>(z) : nullptr;
    T* out = ptr<T>(y);
    std::vector<A> gamma = to_acc_vector<A>(weight, C, A(1));
    std::vector<A> beta = to_acc_vector<A>(bias, C, A(0));
    std::vector<A> mean(C), rstd(C);
    bool written = false;  // y already written (the channel-by-channel path)
    if (training) {
      if (M * C == 0) {  // empty (no sample, no channel): running statistics untouched
        std::fill(mean.begin(), mean.end(), A(0));
        std::fill(rstd.begin(), rstd.end(), A(1) / std::sqrt(A(eps)));
      } else {
        std::vector<A> m2(C);
        if (by_channel(l, 1, sizeof(T))) {
          forward_by_channel<T, A>(l, x, zp, out, gamma, beta, A(eps), act, act_params<A>(act_a, act_b), mean, m2,
                                   rstd);
          written = true;
        } else {
          channel_moments<T, A>(l, mean, m2);
          for (int64_t c = 0; c < C; ++c) rstd[c] = rstd_from_m2<A>(m2[c], M, A(eps));
        }
        std::vector<double> unbiased(C), fresh_mean(C);
        for (int64_t c = 0; c < C; ++c) {
          fresh_mean[c] = mean[c];
          unbiased[c] = unbiased_var<double>(m2[c], double(M));
        }
        if (has(running_mean)) {
          at::Tensor rm = *running_mean;
          update_running(rm, fresh_mean, momentum);
        }
        if (has(running_var)) {
          at::Tensor rv = *running_var;
          update_running(rv, unbiased, momentum);
        }
      }
    } else {
      std::vector<A> rv = to_acc_vector<A>(running_var, C, A(1));
      mean = to_acc_vector<A>(running_mean, C, A(0));
      for (int64_t c = 0; c < C; ++c) rstd[c] = A(1) / std::sqrt(rv[c] + A(eps));
    }
    std::copy(mean.begin(), mean.end(), mean_t.data_ptr<A>());
    std::copy(rstd.begin(), rstd.end(), rstd_t.data_ptr<A>());
    if (M * C == 0 || written) return;

    const std::vector<A> alpha = alphas(rstd, gamma);
    if (l.cols) {
      parallel_chunks(M, num_chunks(M, grain(C)),
                      [&](int64_t, int64_t b, int64_t e) {
                        k.apply_cols(x + b * C, zp ? zp + b * C : nullptr, out + b * C, e - b, C, mean.data(),
                                     alpha.data(),
                                     beta.data(), act, act_params<A>(act_a, act_b));
                      });
    } else {
      const int64_t R = l.N * C, S = l.S;
      std::vector<A> rm = per_row(mean, l.N), ra = per_row(alpha, l.N), rb = per_row(beta, l.N);
      parallel_chunks(R, num_chunks(R, grain(S)),
                      [&](int64_t, int64_t b, int64_t e) {
                        k.apply_rows(x + b * S, zp ? zp + b * S : nullptr, out + b * S, e - b, S, &rm[b], &ra[b],
                                     &rb[b], act,
                                     act_params<A>(act_a, act_b), Ahead<T>{});
                      });
    }
  });
  return {y, mean_t, rstd_t};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cpu(const at::Tensor& input) {
  check_bn_args(input, c10::nullopt, c10::nullopt, c10::nullopt, c10::nullopt);
  const BnLayout l = bn_layout(input);
  at::Tensor mean_t = at::zeros({l.C}, input.options().dtype(acc_dtype(input)));
  at::Tensor m2_t = at::zeros({l.C}, input.options().dtype(acc_dtype(input)));
  if (l.x.numel() == 0) return {mean_t, m2_t};
  dispatch_storage(input.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    std::vector<A> mean(l.C), m2(l.C);
    channel_moments<T, A>(l, mean, m2);
    std::copy(mean.begin(), mean.end(), mean_t.data_ptr<A>());
    std::copy(m2.begin(), m2.end(), m2_t.data_ptr<A>());
  });
  return {mean_t, m2_t};
}

// Training input gradient channel by channel (by_channel, x and dy both): channel c's
// gradient sums, then its dx from cache. Fills sum_dy/sum_dy_xmu for dweight/dbias.
template <typename T, typename A>
void input_grad_by_channel(const BnLayout& l, const T* x, const T* g, T* dx,
                           const std::vector<A>& mean, const std::vector<A>& rstd,
                           const std::vector<A>& gamma, const std::vector<A>& alpha,
                           const std::vector<A>& bias, int64_t act, ActParams<A> ap,
                           std::vector<A>& sum_dy, std::vector<A>& sum_dy_xmu) {
  const auto& k = table<T>();
  const int64_t C = l.C, S = l.S, N = l.N;
  const bool keep = dx != nullptr && keeps_dyhat<T>(act);  // dyhat in dx between the passes
  parallel_chunks(C, num_chunks(C, 1), [&](int64_t, int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      A s = A(0), sx = A(0);  // summed over n in the two-pass path's order
      for (int64_t n = 0; n < N; ++n) {
        const int64_t row = (n * C + c) * S;
        A rs, rx;
        k.grad_sums_rows(x + row, g + row, 1, S, &mean[c], &alpha[c], &bias[c], act, ap,
                         &rs, &rx, keep ? dx + row : nullptr);
        s += rs;
        sx += rx;
      }
      sum_dy[c] = s;
      sum_dy_xmu[c] = sx;
      A cA, cB, cC;
      training_coefficients<A>(rstd[c], gamma[c], s, sx, N * S, &cA, &cB, &cC);
      for (int64_t n = 0; n < N; ++n) {
        const int64_t row = (n * C + c) * S;
        k.input_grad_rows(x + row, keep ? dx + row : g + row, dx + row, 1, S, &mean[c], &alpha[c],
                          &bias[c], &cA, &cB, &cC, keep ? kNone : act, ap, Ahead<T>{});
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean_t, const at::Tensor& rstd_t,
    bool training, int64_t act, double act_a, double act_b, std::array<bool, 3> mask) {
  check_activation(act);
  check_bn_args(input, weight, bias, c10::nullopt, c10::nullopt);
  check_backward_args(grad_out, input, mean_t, rstd_t, input.size(1), "batch_norm_bwd");
  const BnLayout l = bn_layout(input);
  const int64_t C = l.C, M = l.N * l.S;
  const at::Tensor dy = like_layout(grad_out.to(input.scalar_type()), l);
  at::Tensor dx = mask[0] ? bn_output(l) : at::empty({0}, input.options());
  at::Tensor dweight, dbias;

  dispatch_storage(input.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const auto& k = table<T>();
    const at::Tensor mean_c = mean_t.to(c10::CppTypeToScalarType<A>::value).contiguous();
    const at::Tensor rstd_c = rstd_t.to(c10::CppTypeToScalarType<A>::value).contiguous();
    std::vector<A> mean(mean_c.data_ptr<A>(), mean_c.data_ptr<A>() + C);
    std::vector<A> rstd(rstd_c.data_ptr<A>(), rstd_c.data_ptr<A>() + C);
    std::vector<A> gamma = to_acc_vector<A>(weight, C, A(1));
    std::vector<A> beta = to_acc_vector<A>(bias, C, A(0));
    const std::vector<A> alpha = alphas(rstd, gamma);

    const T* x = ptr<T>(l.x);
    const T* g = ptr<T>(dy);
    const int64_t R = l.N * C, S = l.S;
    const int64_t col_chunks = num_chunks(M, grain(C));
    const int64_t row_chunks = num_chunks(R, grain(S));

    // Pass 1: per-channel sum(dyhat) and sum(dyhat * (x - mean)).
    std::vector<A> sum_dy(C, A(0)), sum_dy_xmu(C, A(0));
    const bool need_sums = training ? (mask[0] || mask[1] || mask[2]) : (mask[1] || mask[2]);
    const bool one_pass = training && mask[0] && M * C > 0 && by_channel(l, 2, sizeof(T));
    T* d = mask[0] ? ptr<T>(dx) : nullptr;
    if (one_pass) {
      input_grad_by_channel<T, A>(l, x, g, d, mean, rstd, gamma, alpha, beta, act, act_params<A>(act_a, act_b),
                                  sum_dy, sum_dy_xmu);
    } else if (need_sums && M * C > 0) {
      if (l.cols) {
        std::vector<A> ps(col_chunks * C, A(0)), px(col_chunks * C, A(0));
        parallel_chunks(M, col_chunks, [&](int64_t ch, int64_t b, int64_t e) {
          k.grad_sums_cols(x + b * C, g + b * C, e - b, C, mean.data(), alpha.data(),
                           beta.data(), act, act_params<A>(act_a, act_b), &ps[ch * C], &px[ch * C]);
        });
        for (int64_t ch = 0; ch < col_chunks; ++ch)
          for (int64_t c = 0; c < C; ++c) {
            sum_dy[c] += ps[ch * C + c];
            sum_dy_xmu[c] += px[ch * C + c];
          }
      } else if (short_rows(l, sizeof(T))) {
        const ActParams<A> ap = act_params<A>(act_a, act_b);
        for_channels<T>(l, 2 * kGatherElements, [&](int64_t c, T* buf) {
          T* bx = buf;
          T* bg = buf + kGatherElements;
          for_gathered_chunks<T>(l, c, x, g, bx, bg, [&](int64_t n) {
            A rs, rx;
            k.grad_sums_rows(bx, bg, 1, n, &mean[c], &alpha[c], &beta[c], act, ap, &rs, &rx, nullptr);
            sum_dy[c] += rs;
            sum_dy_xmu[c] += rx;
          });
        });
      } else {
        std::vector<A> ra = per_row(alpha, l.N), rb = per_row(beta, l.N), rm = per_row(mean, l.N);
        std::vector<A> rs(R), rx(R);
        parallel_chunks(R, row_chunks, [&](int64_t, int64_t b, int64_t e) {
          k.grad_sums_rows(x + b * S, g + b * S, e - b, S, &rm[b], &ra[b], &rb[b], act,
                           act_params<A>(act_a, act_b), &rs[b], &rx[b], nullptr);
        });
        for (int64_t n = 0; n < l.N; ++n)
          for (int64_t c = 0; c < C; ++c) {
            sum_dy[c] += rs[n * C + c];
            sum_dy_xmu[c] += rx[n * C + c];
          }
      }
    }
    // dweight = sum(dyhat * xhat), dbias = sum(dyhat).
    if (mask[1] && has(weight)) {
      std::vector<A> dw(C);
      for (int64_t c = 0; c < C; ++c) dw[c] = sum_dy_xmu[c] * rstd[c];
      dweight = from_acc_vector(dw, weight->scalar_type());
    }
    if (mask[2] && has(bias)) dbias = from_acc_vector(sum_dy, bias->scalar_type());

    // Pass 2: dx = A*dyhat + B*x + C per channel.
    if (!mask[0] || M * C == 0 || one_pass) return;
    std::vector<A> cA(C), cB(C), cC(C);
    for (int64_t c = 0; c < C; ++c) {
      if (training) {
        training_coefficients<A>(rstd[c], gamma[c], sum_dy[c], sum_dy_xmu[c], M, &cA[c], &cB[c],
                                 &cC[c]);
      } else {  // eval: the statistics are constants, dx = alpha * dyhat
        cA[c] = alpha[c];
        cB[c] = cC[c] = A(0);
      }
    }
    if (l.cols) {
      parallel_chunks(M, col_chunks, [&](int64_t, int64_t b, int64_t e) {
        k.input_grad_cols(x + b * C, g + b * C, d + b * C, e - b, C, mean.data(), alpha.data(),
                          beta.data(), cA.data(), cB.data(), cC.data(), act, act_params<A>(act_a, act_b));
      });
    } else {
      std::vector<A> rm = per_row(mean, l.N), ra = per_row(alpha, l.N), rb = per_row(beta, l.N);
      std::vector<A> rA = per_row(cA, l.N), rB = per_row(cB, l.N), rC = per_row(cC, l.N);
      parallel_chunks(R, row_chunks, [&](int64_t, int64_t b, int64_t e) {
        k.input_grad_rows(x + b * S, g + b * S, d + b * S, e - b, S, &rm[b], &ra[b], &rb[b], &rA[b],
                          &rB[b], &rC[b], act, act_params<A>(act_a, act_b), Ahead<T>{});
      });
    }
  });
  return {dx, or_empty(dweight, input.options()), or_empty(dbias, input.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusednorm, CPU, m) {
  m.impl("batch_norm_fwd", &batch_norm_fwd_cpu);
  m.impl("batch_norm_bwd", &batch_norm_bwd_cpu);
  m.impl("batch_norm_stats", &batch_norm_stats_cpu);
}

}  // namespace cpu
}  // namespace fusednorm
