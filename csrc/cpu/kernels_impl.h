// The CPU kernel bodies. Included by kernels_{default,avx2,avx512}.cpp, each of which sets
// FN_ISA (the namespace) and the compiler's target flags first, so the same loops are
// vectorised for each instruction set. Only our own inline functions and compiler
// builtins are used in here: an inline function from a shared header compiled with AVX
// flags could otherwise be picked by the linker for callers on older CPUs. (libm's
// functions, which norm_math.h calls for double and for log1p / erf, are not inline.)
//
// Loops are written for the auto-vectoriser: the activation is a template parameter (no
// branch inside the loop), reductions keep per-lane partial sums (lane_sums), and 16-bit types are
// converted with plain bit operations or _Float16 casts.
#if !defined(FN_ISA) || !defined(FN_VECTOR_BYTES)
#error "define FN_ISA and FN_VECTOR_BYTES before including kernels_impl.h"
#endif

#include "../common/norm_math.h"
#include "kernels.h"

namespace fusednorm {
namespace cpu {
namespace FN_ISA {
namespace {

// The per-element lambdas handed to store_all and lane_sums are forced inline: with a
// large activation in the body (SiLU's derivative) GCC kept one as a call per element, and
// the loop around it stayed scalar.
#define FN_INLINE __attribute__((always_inline))

// ---- loads and stores in the accumulation type --------------------------------------
inline float load(float v) { return v; }
inline double load(double v) { return v; }
inline float as_float(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
}
inline uint32_t as_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof(u));
  return u;
}
inline float load(bf16_t v) { return as_float(uint32_t(v.bits) << 16); }
inline float load(half_t v) {
  // Move exponent and mantissa into float position and rescale the exponent bias by
  // 2^112 (exact, and it turns half subnormals into float normals); inf/NaN get the
  // full float exponent back.
  const uint32_t h = v.bits;
  const float magnitude = as_float((h & 0x7fffu) << 13) * 0x1p112f;
  const uint32_t bits = as_bits(magnitude) | ((h & 0x7c00u) == 0x7c00u ? 0x7f800000u : 0u);
  return as_float(bits | ((h & 0x8000u) << 16));
}
inline void store(float* p, float v) { *p = v; }
inline void store(double* p, double v) { *p = v; }
inline void store(half_t* p, float v) {
  // Round to nearest even, as c10::Half. Three ranges, chosen without branches so the
  // loop vectorises: overflow/inf/NaN, subnormal (rounded by adding a magic constant whose
  // ulp is the half subnormal step), normal (bias change + rounding on the low 13 bits).
  const uint32_t u = as_bits(v);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  const uint32_t inf_nan = 0x7c00u | (uint32_t(a > 0x7f800000u) << 9);  // NaN: 0x7e00
  const uint32_t subnormal = as_bits(as_float(a) + 0.5f) - as_bits(0.5f);
  const uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;
  // All-ones masks instead of nested ?: (which the vectoriser gives up on for AVX2).
  const uint32_t big = 0u - uint32_t(a >= 0x47800000u);
  const uint32_t small = 0u - uint32_t(a < 0x38800000u);
  const uint32_t h = (inf_nan & big) | (subnormal & small) | (normal & ~(big | small));
  p->bits = static_cast<uint16_t>(h | sign);
}
inline void store(bf16_t* p, float v) {
  // Round to nearest even, NaN kept quiet: what c10::BFloat16 does. The NaN test as an
  // all-ones integer mask on the 32-bit lanes, not a float compare selecting among the
  // narrowed values: GCC's AVX-512 code then unpacked three masks per 32 outputs, on the
  // port the compares also need (bfloat16 eval BatchNorm+ReLU: store-bound).
  const uint32_t u = as_bits(v);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = 0u - uint32_t((u & 0x7fffffffu) > 0x7f800000u);
  p->bits = static_cast<uint16_t>((rounded & ~nan) | (0x7fc0u & nan));
}

// ---- writing outputs while prefetching the next block (struct Ahead) --------------------
constexpr int64_t kLineBytes = 64;

template <typename T>
inline void prefetch_some(Ahead<T>& a, int64_t m) {
  const int64_t k = m < a.n ? m : a.n;
  for (int64_t q = 0; q < k; q += kLineBytes / int64_t(sizeof(T))) {
    __builtin_prefetch(a.x + q, 0, 3);
    if (a.dy) __builtin_prefetch(a.dy + q, 0, 3);
  }
  a.x += k;
  if (a.dy) a.dy += k;
  a.n -= k;
}

// out[i] = value(i) for i in [0, n); with elements ahead, in 1 KiB pieces each followed by
// prefetches of as many elements of `ahead`.
template <typename T, typename F>
inline void store_all(T* out, int64_t n, Ahead<T>& ahead, F&& value) {
  if (ahead.n <= 0) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) store(out + i, value(i));
    return;
  }
  constexpr int64_t kPiece = 1024 / sizeof(T);
  for (int64_t i0 = 0; i0 < n; i0 += kPiece) {
    const int64_t m = n - i0 < kPiece ? n - i0 : kPiece;
#pragma omp simd
    for (int64_t i = i0; i < i0 + m; ++i) store(out + i, value(i));
    prefetch_some(ahead, m);
  }
}

// Calls f(tag) with tag.value the activation: a compile-time constant (ActTag), so each
// activation gets its own loop, vectorised with the activation inlined; or, where one
// loop per activation would cost more build time than it saves run time (double and
// float16 storage, the baseline instruction set), a run-time value (RuntimeAct) for all
// but the cheapest activations: one loop with the activation's switch inside, not vectorised.
template <int64_t ACT>
struct ActTag {
  static constexpr int64_t value = ACT;
};
struct RuntimeAct {
  int64_t value;
};
// f(ActTag<act>{}) if act is one of Codes; false if it is none of them.
template <typename F, int64_t... Codes>
inline bool with_constant_activation(int64_t act, F& f, std::integer_sequence<int64_t, Codes...>) {
  return ((act == Codes && (f(ActTag<Codes>{}), true)) || ...);
}
template <typename T, typename F>
inline void with_activation(int64_t act, F&& f) {
  constexpr bool every = FN_VECTOR_BYTES >= 32 && !std::is_same<T, double>::value &&
                         !std::is_same<T, half_t>::value;
  constexpr int64_t constant_codes = every ? kNumActivations : kLeakyRelu + 1;  // codes 0 .. n-1
  if (!with_constant_activation(act, f, std::make_integer_sequence<int64_t, constant_codes>{}))
    f(RuntimeAct{act});
}
// The same for the residual add's loops, whose activations are none, ReLU and LeakyReLU
// only (BatchNorm's act(bn(x) + z): the backward reads the derivative off the output).
template <typename F>
inline void with_residual_activation(int64_t act, F&& f) {
  if (!with_constant_activation(act, f, std::make_integer_sequence<int64_t, kLeakyRelu + 1>{}))
    f(RuntimeAct{act});
}

// Elements handled per two-pass chunk: small enough that the second read hits L1.
constexpr int64_t kChunk = 2048;

// Sums kept per lane: four vector registers' worth per sum, so consecutive vector adds go
// to different registers and pipeline instead of waiting on one accumulator's latency
// (an `omp simd reduction` keeps one register and is latency-bound). Each lane adds its
// elements in order and the lanes are folded pairwise: deterministic.
template <typename A>
constexpr int64_t kLanes = 4 * FN_VECTOR_BYTES / sizeof(A);

// l[0] = the sum of l[0..W), added pairwise: halves of fixed length, each one vector loop.
template <int64_t W, typename A>
inline void fold_lanes(A* l) {
  if constexpr (W > 1) {
#pragma omp simd
    for (int64_t j = 0; j < W / 2; ++j) l[j] += l[j + W / 2];
    fold_lanes<W / 2>(l);
  }
}

// The K sums over i in [0, n) of the terms that add(i, lanes, j) adds into lanes[k][j].
template <int K, typename A, typename F>
inline void lane_sums(int64_t n, F&& add, A (&out)[K]) {
  constexpr int64_t W = kLanes<A>;
  // Zeroed and folded with vector loops of fixed length: `= {}` became a `rep stos` and
  // the fold a loop of scalar adds, a large share of the time of short rows (perf).
  A lanes[K][W];
  for (int k = 0; k < K; ++k)
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) lanes[k][j] = A(0);
  const int64_t body = n - n % W;
  for (int64_t i0 = 0; i0 < body; i0 += W)
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) add(i0 + j, lanes, j);
  for (int64_t i = body; i < n; ++i) add(i, lanes, i - body);
  for (int k = 0; k < K; ++k) {
    fold_lanes<W>(lanes[k]);
    out[k] = lanes[k][0];
  }
}

// Corrected two-pass moments of a chunk that sits in cache.
template <typename T, typename A>
inline Moments<A> chunk_moments(const T* x, int64_t n) {
  constexpr int64_t W = kLanes<A>;
  A s[1];
  lane_sums<1, A>(n, [&](int64_t i, A (&l)[1][W], int64_t j) FN_INLINE { l[0][j] += A(load(x[i])); }, s);
  const A m = s[0] / A(n);
  A qd[2];
  lane_sums<2, A>(n, [&](int64_t i, A (&l)[2][W], int64_t j) FN_INLINE {
    const A v = A(load(x[i])) - m;
    l[0][j] += v * v;
    l[1][j] += v;
  }, qd);
  const A q = qd[0], d = qd[1];
  // d is the rounding error of m times n: correct the mean and M2 for it.
  return {A(n), m + d / A(n), q - d * d / A(n)};
}

template <typename T, typename A>
void moments_rows(const T* x, int64_t rows, int64_t S, A* mean, A* m2) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * S;
    // Chunks merged in double: in float, the merges' roundings add up over long rows (a
    // 65,536-element row's mean was 3 ulps off, tripling the output error).
    Moments<double> acc{0, 0, 0};
    for (int64_t off = 0; off < S; off += kChunk) {
      int64_t n = S - off < kChunk ? S - off : kChunk;
      const Moments<A> c = chunk_moments<T, A>(xr + off, n);
      acc = merge(acc, Moments<double>{double(c.count), double(c.mean), double(c.m2)});
    }
    mean[r] = A(acc.mean);
    m2[r] = A(acc.m2);
  }
}

// Channels per register block of the column sums (moments_cols, grad_sums_cols): two
// vectors' worth per sum.
template <typename A>
constexpr int64_t kColBlock = 2 * FN_VECTOR_BYTES / sizeof(A);

// Corrected two-pass moments of columns [c0, c0 + w) of a (b, C) block that sits in cache,
// merged into (count, mean, m2). The block's sums stay in registers for w == kColBlock:
// summed into memory row by row, each row waited on the previous row's store of the same
// sums (store-to-load forwarding plus the add), which made the channels_last kernels
// latency-bound. Each column still adds its rows in order.
template <int64_t W, typename T, typename A>
inline void column_block_moments(const T* xb, int64_t b, int64_t C, int64_t c0, int64_t w,
                                 A count, A* mean, A* m2) {
  A s[W], q[W], d[W];
  for (int64_t j = 0; j < W; ++j) s[j] = q[j] = d[j] = A(0);
  for (int64_t i = 0; i < b; ++i) {
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) s[j] += A(load(xb[i * C + c0 + j]));
  }
  const A inv_b = A(1) / A(b);
  for (int64_t j = 0; j < w; ++j) s[j] *= inv_b;  // now the block mean
  for (int64_t i = 0; i < b; ++i) {
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) {
      A v = A(load(xb[i * C + c0 + j])) - s[j];
      q[j] += v * v;
      d[j] += v;
    }
  }
  for (int64_t j = 0; j < w; ++j) {
    Moments<A> blk{A(b), s[j] + d[j] * inv_b, q[j] - d[j] * d[j] * inv_b};
    Moments<A> m = merge(Moments<A>{count, mean[c0 + j], m2[c0 + j]}, blk);
    mean[c0 + j] = m.mean;
    m2[c0 + j] = m.m2;
  }
}

template <typename T, typename A>
void moments_cols(const T* x, int64_t rows, int64_t C, A count, A* mean, A* m2) {
  constexpr int64_t W = kColBlock<A>;
  const int64_t block = C < kChunk ? kChunk / (C > 0 ? C : 1) : 1;
  for (int64_t r0 = 0; r0 < rows; r0 += block) {
    const int64_t b = rows - r0 < block ? rows - r0 : block;
    const T* xb = x + r0 * C;
    int64_t c0 = 0;
    for (; c0 + W <= C; c0 += W) column_block_moments<W>(xb, b, C, c0, W, count, mean, m2);
    if (c0 < C)  // the last C % W columns
      column_block_moments<W>(xb, b, C, c0, C - c0, count, mean, m2);
    count += A(b);
  }
}

// v, plus z[i] with BatchNorm's residual (RES): the pre-activation of act(bn(x) + z).
template <bool RES, typename T, typename A>
inline A plus_residual(A v, const T* z, int64_t i) {
  if constexpr (RES) return v + A(load(z[i]));
  return v;
}

// Calls f(tag, residual), residual a std::bool_constant of z != nullptr: every activation
// without a residual (with_activation), the residual add's with one.
template <typename T, typename F>
inline void with_apply_variant(const T* z, int64_t act, F&& f) {
  if (z != nullptr) with_residual_activation(act, [&](auto tag) { f(tag, std::true_type{}); });
  else with_activation<T>(act, [&](auto tag) { f(tag, std::false_type{}); });
}

template <typename T, typename A>
void apply_rows(const T* x, const T* z, T* y, int64_t rows, int64_t S, const A* mean, const A* alpha,
                const A* bias, int64_t act, ActParams<A> ap, Ahead<T> ahead) {
  with_apply_variant(z, act, [&](auto tag, auto residual) {
    const int64_t ACT = tag.value;
    constexpr bool RES = decltype(residual)::value;
    for (int64_t r = 0; r < rows; ++r) {
      const A m = mean[r], a = alpha[r], b = bias[r];
      const T* xr = x + r * S;
      const T* zr = RES ? z + r * S : nullptr;
      store_all(y + r * S, S, ahead, [&](int64_t i) FN_INLINE {
        return activate<A>(plus_residual<RES>(pre_activation<A>(A(load(xr[i])), m, a, b), zr, i), ACT, ap);
      });
    }
  });
}

template <typename T, typename A>
void apply_cols(const T* x, const T* z, T* y, int64_t rows, int64_t C, const A* mean, const A* alpha,
                const A* bias, int64_t act, ActParams<A> ap) {
  with_apply_variant(z, act, [&](auto tag, auto residual) {
    const int64_t ACT = tag.value;
    constexpr bool RES = decltype(residual)::value;
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = x + r * C;
      const T* zr = RES ? z + r * C : nullptr;
      T* yr = y + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c)
        store(yr + c, activate<A>(plus_residual<RES>(pre_activation<A>(A(load(xr[c])), mean[c], alpha[c], bias[c]),
                                                     zr, c), ACT, ap));
    }
  });
}

template <typename T, typename A>
void grad_sums_rows(const T* x, const T* dy, int64_t rows, int64_t S, const A* mean,
                    const A* alpha, const A* bias, int64_t act, ActParams<A> ap, A* sum_dy,
                    A* sum_dy_xmu, T* dyhat) {
  with_activation<T>(act, [&](auto tag) {
    const int64_t ACT = tag.value;
    for (int64_t r = 0; r < rows; ++r) {
      const A a = ACT == kNone ? A(0) : alpha[r], b = ACT == kNone ? A(0) : bias[r];
      const A m = mean[r];
      const T* xr = x + r * S;
      const T* gr = dy + r * S;
      const auto dyhat_at = [&](int64_t i) FN_INLINE {
        const A g = A(load(gr[i]));
        return ACT != kNone ? activation_backward<A>(g, pre_activation<A>(A(load(xr[i])), m, a, b), ACT, ap) : g;
      };
      A sums[2];
      const auto row_sums = [&](auto g_at) {  // g_at(i): element i's dyhat
        lane_sums<2, A>(S, [&](int64_t i, A (&l)[2][kLanes<A>], int64_t j) FN_INLINE {
          const A g = g_at(i);
          l[0][j] += g;
          l[1][j] += g * (A(load(xr[i])) - m);
        }, sums);
      };
      if (dyhat) {
        // dyhat stored first, then summed from there (the row is in cache): with the store
        // in the summing loop, GCC left GELU's loop scalar. The same values, summed in the
        // same order.
        T* hr = dyhat + r * S;
        Ahead<T> none;
        store_all(hr, S, none, dyhat_at);
        row_sums([&](int64_t i) FN_INLINE { return A(load(hr[i])); });
      } else {
        row_sums(dyhat_at);
      }
      sum_dy[r] = sums[0];
      sum_dy_xmu[r] = sums[1];
    }
  });
}

// Gradient sums of columns [c0, c0 + w) over rows [r0, r1) of a (rows, C) matrix, added
// to sum_dy / sum_dy_xmu. As in column_block_moments, the sums stay in registers for
// w == kColBlock over the block of rows and go to memory once; each column adds its rows
// in order.
template <int64_t W, typename Tag, typename T, typename A>
inline void column_block_grad_sums(Tag tag, const T* x, const T* dy, int64_t r0, int64_t r1,
                                   int64_t C, int64_t c0, int64_t w, const A* mean,
                                   const A* alpha, const A* bias, ActParams<A> ap, A* sum_dy,
                                   A* sum_dy_xmu) {
  const int64_t ACT = tag.value;
  A s1[W], s2[W], a[W], b[W], m[W];
  for (int64_t j = 0; j < w; ++j) {
    s1[j] = sum_dy[c0 + j];
    s2[j] = sum_dy_xmu[c0 + j];
    a[j] = alpha[c0 + j];
    b[j] = bias[c0 + j];
    m[j] = mean[c0 + j];
  }
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * C + c0;
    const T* gr = dy + r * C + c0;
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) {
      const A xv = A(load(xr[j]));
      A g = A(load(gr[j]));
      if (ACT != kNone) g = activation_backward<A>(g, pre_activation<A>(xv, m[j], a[j], b[j]), ACT, ap);
      s1[j] += g;
      s2[j] += g * (xv - m[j]);
    }
  }
  for (int64_t j = 0; j < w; ++j) {
    sum_dy[c0 + j] = s1[j];
    sum_dy_xmu[c0 + j] = s2[j];
  }
}

// Per-column gradient sums over a (rows, C) matrix, in L1-sized blocks of rows (x and dy of
// a block stay cached while each block of columns passes over it).
template <typename T, typename A>
void grad_sums_cols(const T* x, const T* dy, int64_t rows, int64_t C, const A* mean,
                    const A* alpha, const A* bias, int64_t act, ActParams<A> ap, A* sum_dy,
                    A* sum_dy_xmu) {
  with_activation<T>(act, [&](auto tag) {
    constexpr int64_t W = kColBlock<A>;
    const int64_t block = 1 + 16384 / (2 * (C > 0 ? C : 1) * int64_t(sizeof(T)));
    for (int64_t r0 = 0; r0 < rows; r0 += block) {
      const int64_t r1 = rows - r0 < block ? rows : r0 + block;
      int64_t c0 = 0;
      for (; c0 + W <= C; c0 += W)
        column_block_grad_sums<W>(tag, x, dy, r0, r1, C, c0, W, mean, alpha, bias, ap, sum_dy,
                                  sum_dy_xmu);
      if (c0 < C)  // the last C % W columns
        column_block_grad_sums<W>(tag, x, dy, r0, r1, C, c0, C - c0, mean, alpha, bias, ap,
                                  sum_dy, sum_dy_xmu);
    }
  });
}

template <typename T, typename A>
void input_grad_rows(const T* x, const T* dy, T* dx, int64_t rows, int64_t S, const A* mean,
                     const A* alpha, const A* bias, const A* cA, const A* cB, const A* cC,
                     int64_t act, ActParams<A> ap, Ahead<T> ahead) {
  with_activation<T>(act, [&](auto tag) {
    const int64_t ACT = tag.value;
    for (int64_t r = 0; r < rows; ++r) {
      const A m = mean[r];
      const A a = ACT == kNone ? A(0) : alpha[r], b = ACT == kNone ? A(0) : bias[r];
      const A ka = cA[r], kb = cB[r], kc = cC[r];
      const T* xr = x + r * S;
      const T* gr = dy + r * S;
      store_all(dx + r * S, S, ahead, [&](int64_t i) FN_INLINE {
        const A xv = A(load(xr[i]));
        A g = A(load(gr[i]));
        if (ACT != kNone) g = activation_backward<A>(g, pre_activation<A>(xv, m, a, b), ACT, ap);
        return ka * g + kb * (xv - m) + kc;
      });
    }
  });
}

template <typename T, typename A>
void input_grad_cols(const T* x, const T* dy, T* dx, int64_t rows, int64_t C, const A* mean,
                     const A* alpha, const A* bias, const A* cA, const A* cB, const A* cC,
                     int64_t act, ActParams<A> ap) {
  with_activation<T>(act, [&](auto tag) {
    const int64_t ACT = tag.value;
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = x + r * C;
      const T* gr = dy + r * C;
      T* dr = dx + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const A xv = A(load(xr[c]));
        A g = A(load(gr[c]));
        if (ACT != kNone)
          g = activation_backward<A>(g, pre_activation<A>(xv, mean[c], alpha[c], bias[c]), ACT, ap);
        store(dr + c, cA[c] * g + cB[c] * (xv - mean[c]) + cC[c]);
      }
    }
  });
}

template <typename T, typename A>
void layer_norm_apply(const T* x, T* y, int64_t rows, int64_t L, const A* mean, const A* rstd,
                      const A* gamma, const A* beta, int64_t act, ActParams<A> ap, Ahead<T> ahead) {
  with_activation<T>(act, [&](auto tag) {
    const int64_t ACT = tag.value;
    for (int64_t r = 0; r < rows; ++r) {
      const A m = mean[r], rs = rstd[r];
      const T* xr = x + r * L;
      store_all(y + r * L, L, ahead, [&](int64_t i) FN_INLINE {
        return activate<A>(pre_activation<A>(A(load(xr[i])), m, rs * gamma[i], beta[i]), ACT, ap);
      });
    }
  });
}

template <typename T, typename A>
void layer_norm_backward(const T* x, const T* dy, const T* dres, T* dx, int64_t rows, int64_t L,
                         const A* mean, const A* rstd, const A* gamma, const A* beta, bool rms,
                         int64_t act, ActParams<A> ap, A* dgamma, A* dbeta) {
  const auto rows_backward = [&](auto tag, auto keep) {
    const int64_t ACT = tag.value;
    constexpr bool KEEP = decltype(keep)::value;  // dyhat kept in dx between the passes
    const A inv_l = A(1) / A(L);
    for (int64_t r = 0; r < rows; ++r) {
      const A m = mean[r], rs = rstd[r];
      const T* xr = x + r * L;
      const T* gr = dy + r * L;
      T* dr = dx ? dx + r * L : nullptr;
      const auto dyhat_at = [&](int64_t i) FN_INLINE {
        const A g = A(load(gr[i]));
        return ACT != kNone ? activation_backward<A>(g, pre_activation<A>(A(load(xr[i])), m, rs * gamma[i], beta[i]),
                                                     ACT, ap)
                            : g;
      };
      // As grad_sums_rows: dyhat stored in a loop of its own (the row is in cache).
      if (KEEP) {
        Ahead<T> none;
        store_all(dr, L, none, dyhat_at);
      }
      // Pass 1 (row in cache afterwards): parameter-gradient partials and the row's sums.
      A sums[2];
      lane_sums<2, A>(L, [&](int64_t i, A (&l)[2][kLanes<A>], int64_t j) FN_INLINE {
        const A xh = (A(load(xr[i])) - m) * rs;
        const A g = KEEP ? A(load(dr[i])) : dyhat_at(i);
        dgamma[i] += g * xh;
        dbeta[i] += g;
        const A gg = g * gamma[i];
        l[0][j] += gg;
        l[1][j] += gg * xh;
      }, sums);
      if (dx == nullptr) continue;
      // Pass 2: dx = rstd * (g*gamma - mean(g*gamma) - xhat * mean(g*gamma*xhat)) (RMSNorm:
      // no mean, so no mean(g*gamma) term), plus the residual's gradient: one loop each way.
      const A ms = rms ? A(0) : sums[0] * inv_l, msx = sums[1] * inv_l;
      const auto dx_at = [&](int64_t i) FN_INLINE {
        const A xh = (A(load(xr[i])) - m) * rs;
        const A g = KEEP ? A(load(dr[i])) : dyhat_at(i);
        return rs * (g * gamma[i] - ms - xh * msx);
      };
      if (dres != nullptr) {
        const T* rr = dres + r * L;
#pragma omp simd
        for (int64_t i = 0; i < L; ++i) store(dr + i, dx_at(i) + A(load(rr[i])));
      } else {
#pragma omp simd
        for (int64_t i = 0; i < L; ++i) store(dr + i, dx_at(i));
      }
    }
  };
  with_activation<T>(act, [&](auto tag) {
    // Only where keeps_dyhat can hold (storage type = accumulation type) is the KEEP
    // variant compiled.
    if constexpr (std::is_same<T, A>::value) {
      if (dx != nullptr && keeps_dyhat<T>(act)) return rows_backward(tag, std::true_type{});
    }
    rows_backward(tag, std::false_type{});
  });
}

template <typename T, typename A>
void add(const T* x, const T* r, T* s, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) store(s + i, A(load(x[i])) + A(load(r[i])));
}

template <typename T>
void add_to_float(const T* x, const float* r, float* s, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) s[i] = float(load(x[i])) + r[i];
}

template <typename T>
void from_float(const float* v, T* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) store(out + i, v[i]);
}

template <typename T>
KernelTable<T, acc_t<T>> make_table() {
  using A = acc_t<T>;
  KernelTable<T, A> t;
  t.moments_rows = &moments_rows<T, A>;
  t.moments_cols = &moments_cols<T, A>;
  t.apply_rows = &apply_rows<T, A>;
  t.apply_cols = &apply_cols<T, A>;
  t.grad_sums_rows = &grad_sums_rows<T, A>;
  t.grad_sums_cols = &grad_sums_cols<T, A>;
  t.input_grad_rows = &input_grad_rows<T, A>;
  t.input_grad_cols = &input_grad_cols<T, A>;
  t.layer_norm_apply = &layer_norm_apply<T, A>;
  t.layer_norm_backward = &layer_norm_backward<T, A>;
  t.add = &add<T, A>;
  t.add_to_float = &add_to_float<T>;
  t.from_float = &from_float<T>;
  return t;
}

}  // namespace

void fill(AllKernels* k) {
  k->f32 = make_table<float>();
  k->f64 = make_table<double>();
  k->bf16 = make_table<bf16_t>();
  k->f16 = make_table<half_t>();
}

}  // namespace FN_ISA
}  // namespace cpu
}  // namespace fusednorm
