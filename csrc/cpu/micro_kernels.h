// CPU micro-kernels on GCC vector types: the refine forward's and backward's 1x1 head mixes
// (K = H or rH, i.e. 12-96), their weight gradients and the depthwise stencil rows (also the
// depthwise building block's rows and weight-gradient sums), and the softmax block's fp32 rows
// (forward and backward).
//
// Head mixes: BLAS packs both operands on every call, which dominates at these skinny shapes (perf: half of the
// fused forward was MKL packing + kernel), and its output leaves cache before the next stage reads it.
// Here the operands are used in place: W (M x K, row-major, tiny) is broadcast, X rows are read
// 2 vectors wide, and an MR x 2 block of accumulators stays in registers (MR <= 6: 12 accumulators
// + 3 operands fit the 16 AVX2 registers). GCC vector extensions: the same source compiles to
// AVX2 in the x86-64-v3 clone and to SSE pairs in the baseline one.
#pragma once
// Everything here takes or returns 32-byte vectors, so it must be inlined into the caller (a
// target_clones body): an out-of-line copy is compiled for the baseline ISA, which passes vectors
// in memory, while the AVX2 clone passes them in registers, and the values arrive as garbage.
// Lambdas given to head_mix need RF_INLINE too (`[&](...) RF_INLINE {...}`). (GCC's -Wpsabi note
// on these definitions is about that ABI difference; it is silenced as every use is inlined.)
#define RF_INLINE __attribute__((always_inline))
// fp32 hot loops are compiled twice (AVX2+FMA and baseline x86-64) and picked at load time.
// x86-64-v3 (not arch=haswell): GCC dispatches arch=<cpu> clones on the CPU model, so AMD CPUs
// got the baseline clone; the ISA level is dispatched on the feature bits.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RF_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define RF_CLONES
#endif
#pragma GCC diagnostic ignored "-Wpsabi"

#include <cstdint>
#include <cmath>
#include <cstring>
#include <vector>

namespace refiner {
namespace cpu {

template <class F> struct Vec {
  typedef F type __attribute__((vector_size(32)));
  static constexpr int L = 32 / sizeof(F);  // lanes
};
template <class F> using vec_t = typename Vec<F>::type;

template <class F> inline RF_INLINE vec_t<F> vload(const F* p) {
  vec_t<F> v;
  std::memcpy(&v, p, sizeof v);  // unaligned load
  return v;
}
template <class F> inline RF_INLINE void vstore(F* p, vec_t<F> v) { std::memcpy(p, &v, sizeof v); }
// An fp32 constant in all 8 lanes (a macro, not a function: see RF_INLINE; a splat of a loaded
// value is built with lane inserts, hence Splat).
#define RF_SPLAT8(c) (vec_t<float>{c, c, c, c, c, c, c, c})

// Values broadcast once per call into whole vectors and then read with plain vector loads: GCC
// builds a vector from a scalar with lane inserts, not one vbroadcastss. Stored as F and read with
// vload: std::vector does not honour the vector type's 32-byte alignment (vmovaps would fault).
template <class F> struct Splat {
  std::vector<F> v;
  Splat(const F* w, int64_t n) : v(n * Vec<F>::L) {
    for (int64_t i = 0; i < n; ++i)
      for (int l = 0; l < Vec<F>::L; ++l) v[i * Vec<F>::L + l] = w[i];
  }
  const F* data() const { return v.data(); }
  inline RF_INLINE vec_t<F> operator[](int64_t i) const { return vload(v.data() + i * Vec<F>::L); }
};

// Row lengths (and strides) are padded to whole vectors: the kernels below read and write them
// whole (padding columns hold finite junk nobody reads).
template <class F> inline int64_t vec_pad(int64_t n) { return (n + Vec<F>::L - 1) / Vec<F>::L * Vec<F>::L; }

// Rows [m0, m0 + MR) of C = W X over columns [x, x + NV L); epi(m, x, v) stores one vector.
template <int MR, int NV, class F, class Epi>
inline RF_INLINE void mix_block(int m0, int K, const F* W, const F* X, int64_t ldx, int64_t x, const Epi& epi) {
  constexpr int L = Vec<F>::L;
  vec_t<F> acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = vec_t<F>{};
  const F* w = W + (int64_t)m0 * K * L;
  for (int k = 0; k < K; ++k) {
    vec_t<F> xv[NV];
    for (int j = 0; j < NV; ++j) xv[j] = vload(X + k * ldx + x + j * L);
    for (int i = 0; i < MR; ++i) {
      const vec_t<F> wi = vload(w + (i * K + k) * L);
      for (int j = 0; j < NV; ++j) acc[i][j] += wi * xv[j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) epi(m0 + i, x + j * L, acc[i][j]);
}

template <int NV, class F, class Epi>
inline RF_INLINE void mix_columns(int M, int K, const F* W, const F* X, int64_t ldx, int64_t x, const Epi& epi) {
  int m = 0;
  for (; m + 6 <= M; m += 6) mix_block<6, NV>(m, K, W, X, ldx, x, epi);
  switch (M - m) {
    case 5: mix_block<5, NV>(m, K, W, X, ldx, x, epi); break;
    case 4: mix_block<4, NV>(m, K, W, X, ldx, x, epi); break;
    case 3: mix_block<3, NV>(m, K, W, X, ldx, x, epi); break;
    case 2: mix_block<2, NV>(m, K, W, X, ldx, x, epi); break;
    case 1: mix_block<1, NV>(m, K, W, X, ldx, x, epi); break;
    default: break;
  }
}

// C = W (M x K, as Splat::data()) @ X (K x n, row stride ldx), handed to epi one vector at a time
// over columns [0, vec_pad(n)): X's rows must be readable that far. Blocks of 6 rows x 2 vectors
// (12 accumulators + 3 operands of the 16 AVX2 registers); a last single vector when that is all
// that is left.
template <class F, class Epi>
inline RF_INLINE void head_mix(int M, int K, int64_t n, const F* W, const F* X, int64_t ldx, const Epi& epi) {
  constexpr int L = Vec<F>::L;
  int64_t x = 0;
  for (; x + L < n; x += 2 * L) mix_columns<2>(M, K, W, X, ldx, x, epi);
  if (x < n) mix_columns<1>(M, K, W, X, ldx, x, epi);
}

template <class F> inline RF_INLINE vec_t<F> relu6_vec(vec_t<F> v, vec_t<F> six) {
  const vec_t<F> zero{};
  v = v < zero ? zero : v;  // NaN passes through, as relu6()
  return v > six ? six : v;
}

// One depthwise output row of one channel: epi(x, bias + sum_ij w[i K + j] rows[i][x + j]) for the
// vectors at columns x in [0, vec_pad(n)) (taps row by row: i, then j). rows[i] point at
// column -K/2 and must be readable K - 1 past vec_pad(n); w: the K*K taps as Splat::data(). The
// K^2 tap vectors stay in registers for K = 3.
template <int K, class F, class Epi>
inline RF_INLINE void dw_row_apply(const F* const* rows, const F* w, vec_t<F> bias, int64_t n, const Epi& epi) {
  constexpr int L = Vec<F>::L;
  vec_t<F> wv[K * K];
  for (int t = 0; t < K * K; ++t) wv[t] = vload(w + t * L);
  for (int64_t x = 0; x < n; x += L) {
    vec_t<F> a = bias;
    for (int i = 0; i < K; ++i)
      for (int j = 0; j < K; ++j) a += wv[i * K + j] * vload(rows[i] + x + j);
    epi(x, a);
  }
}

// dw_row_apply for a runtime kernel size (checked to be odd, 1..7).
template <class F, class Epi>
inline RF_INLINE void dw_row_apply_k(int k, const F* const* rows, const F* w, vec_t<F> bias, int64_t n,
                                     const Epi& epi) {
  switch (k) {
    case 1: return dw_row_apply<1>(rows, w, bias, n, epi);
    case 3: return dw_row_apply<3>(rows, w, bias, n, epi);
    case 5: return dw_row_apply<5>(rows, w, bias, n, epi);
    default: return dw_row_apply<7>(rows, w, bias, n, epi);
  }
}

// dr[x] = act(the stencil above), act = relu6 or identity.
template <bool Relu6, class F>
inline RF_INLINE void dw_row_k(int k, F* dr, const F* const* rows, const F* w, vec_t<F> bias, vec_t<F> six,
                               int64_t n) {
  dw_row_apply_k(k, rows, w, bias, n,
                 [&](int64_t x, vec_t<F> a) RF_INLINE { vstore(dr + x, Relu6 ? relu6_vec<F>(a, six) : a); });
}

// Weight-gradient sums of one row: acc[i K + j] += g[x] rows[i][x + j] over columns [0, vec_pad(n))
// (g zero past n; rows as in dw_row), in vector lanes.
template <int K, class F>
inline RF_INLINE void dw_wgrad_row(vec_t<F>* acc, const F* g, const F* const* rows, int64_t n) {
  constexpr int L = Vec<F>::L;
  for (int64_t x = 0; x < n; x += L) {
    const vec_t<F> gv = vload(g + x);
    for (int i = 0; i < K; ++i)
      for (int j = 0; j < K; ++j) acc[i * K + j] += gv * vload(rows[i] + x + j);
  }
}

template <class F>
inline RF_INLINE void dw_wgrad_row_k(int k, vec_t<F>* acc, const F* g, const F* const* rows, int64_t n) {
  switch (k) {
    case 1: return dw_wgrad_row<1>(acc, g, rows, n);
    case 3: return dw_wgrad_row<3>(acc, g, rows, n);
    case 5: return dw_wgrad_row<5>(acc, g, rows, n);
    default: return dw_wgrad_row<7>(acc, g, rows, n);
  }
}

// Weight gradient of a 1x1 mix over one row, in vector lanes: acc[(m C + c) L + l] += G[m][x] X[c][x]
// over columns [0, n) (n a multiple of L; G row stride ldg, X row stride ldx). Blocks of 4 x 3:
// 12 accumulators + 3 X vectors + 1 G vector in the 16 AVX2 registers, 7 loads per 12 FMAs.
template <int MR, int CR, class F>
inline RF_INLINE void wgrad_block(int m0, int c0, int C, int64_t n, const F* G, int64_t ldg, const F* X,
                                  int64_t ldx, F* acc) {
  constexpr int L = Vec<F>::L;
  vec_t<F> a[MR][CR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < CR; ++j) a[i][j] = vload(acc + ((int64_t)(m0 + i) * C + c0 + j) * L);
  for (int64_t x = 0; x < n; x += L) {
    vec_t<F> xv[CR];
    for (int j = 0; j < CR; ++j) xv[j] = vload(X + (c0 + j) * ldx + x);
    for (int i = 0; i < MR; ++i) {
      const vec_t<F> g = vload(G + (m0 + i) * ldg + x);
      for (int j = 0; j < CR; ++j) a[i][j] += g * xv[j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < CR; ++j) vstore(acc + ((int64_t)(m0 + i) * C + c0 + j) * L, a[i][j]);
}

template <int MR, class F>
inline RF_INLINE void wgrad_rows(int m0, int C, int64_t n, const F* G, int64_t ldg, const F* X, int64_t ldx,
                                 F* acc) {
  int c = 0;
  for (; c + 3 <= C; c += 3) wgrad_block<MR, 3>(m0, c, C, n, G, ldg, X, ldx, acc);
  if (C - c == 2) wgrad_block<MR, 2>(m0, c, C, n, G, ldg, X, ldx, acc);
  if (C - c == 1) wgrad_block<MR, 1>(m0, c, C, n, G, ldg, X, ldx, acc);
}

template <class F>
inline RF_INLINE void mix_wgrad_row(int M, int C, int64_t n, const F* G, int64_t ldg, const F* X, int64_t ldx,
                                    F* acc) {
  int m = 0;
  for (; m + 4 <= M; m += 4) wgrad_rows<4>(m, C, n, G, ldg, X, ldx, acc);
  switch (M - m) {
    case 3: wgrad_rows<3>(m, C, n, G, ldg, X, ldx, acc); break;
    case 2: wgrad_rows<2>(m, C, n, G, ldg, X, ldx, acc); break;
    case 1: wgrad_rows<1>(m, C, n, G, ldg, X, ldx, acc); break;
    default: break;
  }
}

// Lane sums of n accumulators: out[i] = sum_l acc[i L + l] (fixed order: deterministic).
template <class F>
inline void lane_sums(const F* acc, int64_t n, F* out) {
  for (int64_t i = 0; i < n; ++i) {
    F s = 0;
    for (int l = 0; l < Vec<F>::L; ++l) s += acc[i * Vec<F>::L + l];
    out[i] = s;
  }
}

// ---------------------------------------------------------------------------
// Softmax block: exp and one fused softmax + residual row (fp32).
// ---------------------------------------------------------------------------
typedef int32_t vec_i32 __attribute__((vector_size(32)));

// expf on 8 lanes, Cephes' polynomial after x = n ln2 + r (|r| <= ln2 / 2), 2^n added to the
// exponent bits: within 2 ulp of expf. x < -87.3 (a subnormal result) gives 0, NaN stays NaN.
inline RF_INLINE vec_t<float> exp_vec(vec_t<float> x) {
  const vec_t<float> lo = RF_SPLAT8(-87.33654f), hi = RF_SPLAT8(88.37626f);
  const vec_t<float> xc = x < lo ? lo : (x > hi ? hi : x);
  const vec_t<float> magic = RF_SPLAT8(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  const vec_t<float> t = xc * RF_SPLAT8(1.44269504088896341f) + magic;
  const vec_t<float> n = t - magic;
  const vec_t<float> r = xc - n * RF_SPLAT8(0.693359375f) - n * RF_SPLAT8(-2.12194440e-4f);
  vec_t<float> p = RF_SPLAT8(1.9875691500E-4f);
  p = p * r + RF_SPLAT8(1.3981999507E-3f);
  p = p * r + RF_SPLAT8(8.3334519073E-3f);
  p = p * r + RF_SPLAT8(4.1665795894E-2f);
  p = p * r + RF_SPLAT8(1.6666665459E-1f);
  p = p * r + RF_SPLAT8(5.0000001201E-1f);
  p = p * (r * r) + r + RF_SPLAT8(1.f);
  const vec_i32 scaled = (vec_i32)p + (((vec_i32)t - (vec_i32)magic) << 23);
  vec_t<float> y = (vec_t<float>)scaled;
  y = x < lo ? vec_t<float>{} : y;
  y = x > hi ? RF_SPLAT8(__builtin_inff()) : y;
  return x != x ? x : y;
}

// One attention row: a = softmax(s) + sprev * prev (prev may be null), s already scaled. s and a
// may be the same row.
inline RF_INLINE void softmax_residual_row(float* a, const float* s, const float* prev, int64_t n, float sprev) {
  constexpr int L = 8;
  const int64_t nv = n / L * L;
  float mx = -__builtin_inff();
  if (nv) {
    vec_t<float> m = vload(s);
    for (int64_t x = L; x < nv; x += L) {
      const vec_t<float> v = vload(s + x);
      m = v > m ? v : m;
    }
    for (int l = 0; l < L; ++l) mx = m[l] > mx ? m[l] : mx;
  }
  for (int64_t x = nv; x < n; ++x) mx = s[x] > mx ? s[x] : mx;
  const vec_t<float> mv = RF_SPLAT8(mx);
  vec_t<float> sv{};
  for (int64_t x = 0; x < nv; x += L) {
    const vec_t<float> e = exp_vec(vload(s + x) - mv);
    vstore(a + x, e);
    sv += e;
  }
  float sum = 0;
  for (int l = 0; l < L; ++l) sum += sv[l];
  for (int64_t x = nv; x < n; ++x) sum += (a[x] = std::exp(s[x] - mx));
  const float inv = 1.f / sum;
  const vec_t<float> iv = RF_SPLAT8(inv), sp = RF_SPLAT8(sprev);
  if (prev) {
    for (int64_t x = 0; x < nv; x += L) vstore(a + x, vload(a + x) * iv + sp * vload(prev + x));
    for (int64_t x = nv; x < n; ++x) a[x] = a[x] * inv + sprev * prev[x];
  } else {
    for (int64_t x = 0; x < nv; x += L) vstore(a + x, vload(a + x) * iv);
    for (int64_t x = nv; x < n; ++x) a[x] *= inv;
  }
}

// Backward of one attention row, P recomputed: gs = c p (g - dot(g, p)) with p = softmax(s) (s
// already scaled; p is the forward's softmax part of the row, same arithmetic) and g = ga + gat,
// written back to ga (the grad of A). gs may be the same row as s. Three passes over the row:
//   1. g into ga; the max of s and g_m, g at the max;
//   2. e = exp(s - max) into gs, with sum(e), dot(g, e) and dot(g - g_m, e) in vector accumulators;
//   3. gs = c (e / sum) ((g - t) - dot(g - t, e) / sum).
// t is a shift the formula is invariant to: g_m when dot(g - g_m, p) is the smaller in magnitude,
// else 0 (exactly the plain formula). In a peaked row (p_m near 1) g - dot(g, p) cancels down to
// about (1 - p_m) |g|, and the rounding of dot(g, p) (~eps |g_m|) would be its relative error; the
// shifted dot has no p_m g_m term, so this row's gS is then more accurate than the reference's.
// Exp underflow gives exact zeros (as in the forward); NaN in s or g makes the row NaN (the shifted
// dot is NaN too, so the plain formula is used, as with an inf in g).
inline RF_INLINE void softmax_grad_row(float* gs, const float* s, float* ga, const float* gat, int64_t n, float c) {
  constexpr int L = 8;
  const int64_t nv = n / L * L;
  float mx = -__builtin_inff(), gm = 0;
  {
    vec_t<float> m = RF_SPLAT8(-__builtin_inff()), gmv{};
    for (int64_t x = 0; x < nv; x += L) {
      const vec_t<float> v = vload(s + x), g = vload(ga + x) + vload(gat + x);
      vstore(ga + x, g);
      const auto sel = v > m;
      m = sel ? v : m;
      gmv = sel ? g : gmv;
    }
    for (int l = 0; l < L; ++l)
      if (m[l] > mx) mx = m[l], gm = gmv[l];
  }
  for (int64_t x = nv; x < n; ++x) {
    const float g = (ga[x] += gat[x]);
    if (s[x] > mx) mx = s[x], gm = g;
  }
  const vec_t<float> mv = RF_SPLAT8(mx), gmv = RF_SPLAT8(gm);
  vec_t<float> sv{}, dv{}, dsv{};
  for (int64_t x = 0; x < nv; x += L) {
    const vec_t<float> e = exp_vec(vload(s + x) - mv), g = vload(ga + x);
    vstore(gs + x, e);
    sv += e;
    dv += e * g;
    dsv += e * (g - gmv);
  }
  float sum = 0, dot = 0, dots = 0;
  for (int l = 0; l < L; ++l) {
    sum += sv[l];
    dot += dv[l];
    dots += dsv[l];
  }
  for (int64_t x = nv; x < n; ++x) {
    const float e = std::exp(s[x] - mx), g = ga[x];
    gs[x] = e;
    sum += e;
    dot += e * g;
    dots += e * (g - gm);
  }
  const float inv = 1.f / sum;
  dot *= inv;
  dots *= inv;
  const bool shift = std::fabs(dots) < std::fabs(dot);
  const float t = shift ? gm : 0.f, dp = shift ? dots : dot;
  const vec_t<float> iv = RF_SPLAT8(inv), tv = RF_SPLAT8(t), dpv = RF_SPLAT8(dp), cv = RF_SPLAT8(c);
  for (int64_t x = 0; x < nv; x += L)
    vstore(gs + x, cv * (vload(gs + x) * iv) * ((vload(ga + x) - tv) - dpv));
  for (int64_t x = nv; x < n; ++x) gs[x] = c * (gs[x] * inv) * ((ga[x] - t) - dp);
}

}  // namespace cpu
}  // namespace refiner
