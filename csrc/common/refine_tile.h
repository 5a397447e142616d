// Tile math of the fused Refiner kernels, shared by the CPU drivers (csrc/cpu) and the
// CUDA kernels (csrc/cuda): one body, two drivers.
//
// Every stage below is a loop over a rectangle of a tile; the loop is split over
// "threads" by a parallel policy `Par` (y0()/ny() over rows, x0()/nx() over columns):
//   * SerialPar (CPU): constexpr 0/1, so the column loop is a plain contiguous loop the
//     compiler vectorises;
//   * the CUDA kernels pass a policy built from threadIdx, and put __syncthreads()
//     between stages (a stage only reads what an earlier stage wrote).
// Arithmetic type F is float (fp32/fp16/bf16 inputs) or double (CPU fp64 only).
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define RF_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// always_inline: the CPU drivers compile these into per-ISA clones (target_clones)
#define RF_HD inline __attribute__((always_inline))
#else
#define RF_HD inline
#endif

namespace refiner {

struct SerialPar {
  RF_HD constexpr int y0() const { return 0; }
  RF_HD constexpr int ny() const { return 1; }
  RF_HD constexpr int x0() const { return 0; }
  RF_HD constexpr int nx() const { return 1; }
};

template <class F> RF_HD F relu6(F x) { return x < F(0) ? F(0) : (x > F(6) ? F(6) : x); }
// d relu6(x)/dx as PyTorch's hardtanh_backward: 1 strictly inside (0, 6), else 0.
template <class F> RF_HD bool relu6_pass(F x) { return x > F(0) && x < F(6); }

RF_HD float rf_exp(float x) { return expf(x); }
RF_HD double rf_exp(double x) { return exp(x); }

// (n, mean, m2) += (n2, mean2, m22): Chan's pairwise update of a count, mean and sum of squared
// deviations (the training passes' per-channel moments).
RF_HD void chan_merge(double& n, double& mean, double& m2, double n2, double mean2, double m22) {
  if (n2 == 0) return;
  const double tot = n + n2, delta = mean2 - mean;
  mean += delta * (n2 / tot);
  m2 += m22 + delta * delta * (n * n2 / tot);
  n = tot;
}

// ---------------------------------------------------------------------------
// Softmax block: the element-wise pieces of one attention row.
// ---------------------------------------------------------------------------
// attn = softmax(s)_j + sprev * prev_j, with s already scaled; mx = max_j s_j, inv = 1/sum exp.
template <class F> RF_HD F softmax_residual(F s, F mx, F inv, F prev, F sprev) {
  return rf_exp(s - mx) * inv + sprev * prev;
}
// gradient of the scores from the gradient of P = softmax(s): P_j (gP_j - sum_i P_i gP_i).
template <class F> RF_HD F softmax_grad(F p, F gp, F dot) { return p * (gp - dot); }

// ---------------------------------------------------------------------------
// Refine tile geometry. A tile is TR x TC "centre" pixels at (r0, c0) of an N x N map.
// A buffer stores the centre plus a halo of `halo` pixels on every side; (y, x) are
// centre-relative (y in [-halo, TR + halo)).
// ---------------------------------------------------------------------------
struct Tile {
  int64_t N, r0, c0;
  int TR, TC;
  RF_HD bool inmap(int y, int x) const {
    const int64_t gy = r0 + y, gx = c0 + x;
    return gy >= 0 && gy < N && gx >= 0 && gx < N;
  }
};

template <class F> struct Buf {
  F* p;
  int halo, ld, plane;  // ld = TC + 2 halo; plane = (TR + 2 halo) * ld
  RF_HD F& at(int c, int y, int x) const {
    return p[(int64_t)c * plane + (int64_t)(y + halo) * ld + (x + halo)];
  }
  RF_HD F* row(int c, int y) const { return p + (int64_t)c * plane + (int64_t)(y + halo) * ld + halo; }
};

template <class F> RF_HD Buf<F> make_buf(F* p, const Tile& t, int halo) {
  Buf<F> b;
  b.p = p;
  b.halo = halo;
  b.ld = t.TC + 2 * halo;
  b.plane = (t.TR + 2 * halo) * b.ld;
  return b;
}
template <class F> RF_HD int64_t buf_elems(const Tile& t, int halo, int planes) {
  return (int64_t)planes * (t.TR + 2 * halo) * (t.TC + 2 * halo);
}

// Load planes [0, C) of an (C, N, N) map (one batch item) into buf over its whole
// extent (centre + halo), zero outside the map.
template <class F, class T, class Par>
RF_HD void load_tile(const Par& par, const T* src, int C, const Tile& t, const Buf<F>& b) {
  const int h = b.halo;
  for (int c = 0; c < C; ++c)
    for (int y = -h + par.y0(); y < t.TR + h; y += par.ny()) {
      const int64_t gy = t.r0 + y;
      const bool rowin = gy >= 0 && gy < t.N;
      F* dst = b.row(c, y);
      const T* s = src + ((int64_t)c * t.N + (rowin ? gy : 0)) * t.N + t.c0;
      for (int x = -h + par.x0(); x < t.TC + h; x += par.nx()) {
        const int64_t gx = t.c0 + x;
        dst[x] = (rowin && gx >= 0 && gx < t.N) ? static_cast<F>(s[x]) : F(0);
      }
    }
}

// The reverse of load_tile: the centre of planes [0, C) of buf into an (C, N, N) map, the
// pixels inside the map only.
template <class F, class Par>
RF_HD void store_tile(const Par& par, F* dst, int C, const Tile& t, const Buf<F>& b) {
  for (int c = 0; c < C; ++c)
    for (int y = par.y0(); y < t.TR && t.r0 + y < t.N; y += par.ny()) {
      F* d = dst + ((int64_t)c * t.N + t.r0 + y) * t.N + t.c0;
      const F* s = b.row(c, y);
      for (int x = par.x0(); x < t.TC && t.c0 + x < t.N; x += par.nx()) d[x] = s[x];
    }
}

// E_c = relu6(sum_h w_exp[c,h] A_h + b_exp[c]) over the region of halo `eh`, zero outside
// the map (the depthwise conv pads E with zeros, not with relu6(b_exp)).
template <class F, class Par>
RF_HD void expand_channel(const Par& par, int c, int H, const F* w_exp, const F* b_exp,
                          const Tile& t, const Buf<F>& A, const Buf<F>& E, int eh) {
  const F* w = w_exp + (int64_t)c * H;
  const F bias = b_exp[c];
  for (int y = -eh + par.y0(); y < t.TR + eh; y += par.ny()) {
    F* e = E.row(0, y);
    for (int x = -eh + par.x0(); x < t.TC + eh; x += par.nx()) e[x] = bias;
    for (int h = 0; h < H; ++h) {
      const F wh = w[h];
      const F* a = A.row(h, y);
      for (int x = -eh + par.x0(); x < t.TC + eh; x += par.nx()) e[x] += wh * a[x];
    }
    for (int x = -eh + par.x0(); x < t.TC + eh; x += par.nx())
      e[x] = t.inmap(y, x) ? relu6(e[x]) : F(0);
  }
}

// Pre-activation of E_c at one pixel (for the relu6 mask in the backward pass).
template <class F>
RF_HD F expand_pre(int c, int H, const F* w_exp, const F* b_exp, const Buf<F>& A, int y, int x) {
  const F* w = w_exp + (int64_t)c * H;
  F u = b_exp[c];
  for (int h = 0; h < H; ++h) u += w[h] * A.at(h, y, x);
  return u;
}

// k x k depthwise correlation of plane E at (y, x) (PyTorch conv2d = cross-correlation).
template <class F>
RF_HD F dw_point(const Buf<F>& E, int ce, const F* w, int k, int y, int x) {
  const int p = k / 2;
  F acc = F(0);
  for (int i = 0; i < k; ++i) {
    const F* e = E.row(ce, y + i - p);
    for (int j = 0; j < k; ++j) acc += w[i * k + j] * e[x + j - p];
  }
  return acc;
}

// Forward, per expanded channel c: D = relu6(dw(E_c) + b_dw[c]) on the centre (0 outside the
// map), and P_h += w_pro[h, c] D for every head h.  w_pro is (H, rH). drow: scratch of one
// centre row (TC values; on CUDA one row per thread-row, indexed by the same x).
template <class F, class Par>
RF_HD void dw_pro_channel(const Par& par, int c, int H, int rH, const F* w_dw, const F* b_dw,
                          const F* w_pro, int k, const Tile& t, const Buf<F>& E, int ce,
                          const Buf<F>& P, F* drow) {
  const int p = k / 2;
  const F* w = w_dw + (int64_t)c * k * k;
  const F bias = b_dw[c];
  for (int y = par.y0(); y < t.TR; y += par.ny()) {
    for (int x = par.x0(); x < t.TC; x += par.nx()) drow[x] = bias;
    for (int i = 0; i < k; ++i)
      for (int j = 0; j < k; ++j) {
        const F wij = w[i * k + j];
        const F* e = E.row(ce, y + i - p) + (j - p);
        for (int x = par.x0(); x < t.TC; x += par.nx()) drow[x] += wij * e[x];
      }
    for (int x = par.x0(); x < t.TC; x += par.nx()) drow[x] = t.inmap(y, x) ? relu6(drow[x]) : F(0);
    for (int h = 0; h < H; ++h) {
      const F wp = w_pro[(int64_t)h * rH + c];
      F* pr = P.row(h, y);
      for (int x = par.x0(); x < t.TC; x += par.nx()) pr[x] += wp * drow[x];
    }
  }
}

// R_h = alpha_h (A_h + P_h + b_pro_h) + beta_h on the centre, in place in P (0 outside the map).
template <class F, class Par>
RF_HD void finish_r(const Par& par, int H, const F* b_pro, const F* alpha, const F* beta,
                    const Tile& t, const Buf<F>& A, const Buf<F>& P) {
  for (int h = 0; h < H; ++h)
    for (int y = par.y0(); y < t.TR; y += par.ny()) {
      F* pr = P.row(h, y);
      const F* ar = A.row(h, y);
      for (int x = par.x0(); x < t.TC; x += par.nx())
        pr[x] = t.inmap(y, x) ? alpha[h] * (ar[x] + pr[x] + b_pro[h]) + beta[h] : F(0);
    }
}

// ---------------------------------------------------------------------------
// Backward of the eval refine map, per expanded channel c. Inputs: A (halo 2p),
// gR (halo p, the gradient of R), E_c (halo 2p). Produces:
//   gY_c (halo p): gradient of dw(E_c) (zero outside the map and where relu6 is flat),
//   D_c (centre), P_h += w_pro[h,c] D_c (centre), gA_h (centre) += the expansion path.
// ---------------------------------------------------------------------------
template <class F, class Par>
RF_HD void bwd_dy_channel(const Par& par, int c, int H, int rH, const F* w_dw, const F* b_dw,
                          const F* w_pro, const F* alpha, int k, const Tile& t, const Buf<F>& E,
                          int ce, const Buf<F>& GR, const Buf<F>& GY, const Buf<F>& D,
                          const Buf<F>& P) {
  const int p = k / 2;
  const F* w = w_dw + (int64_t)c * k * k;
  const F bias = b_dw[c];
  for (int y = -p + par.y0(); y < t.TR + p; y += par.ny()) {
    for (int x = -p + par.x0(); x < t.TC + p; x += par.nx()) {
      const F pre = dw_point(E, ce, w, k, y, x) + bias;
      F gd = F(0);
      for (int h = 0; h < H; ++h) gd += w_pro[(int64_t)h * rH + c] * alpha[h] * GR.at(h, y, x);
      const bool in = t.inmap(y, x);
      GY.at(0, y, x) = (in && relu6_pass(pre)) ? gd : F(0);
      if (y >= 0 && y < t.TR && x >= 0 && x < t.TC) {
        const F dv = in ? relu6(pre) : F(0);
        D.at(0, y, x) = dv;
        for (int h = 0; h < H; ++h) P.at(h, y, x) += w_pro[(int64_t)h * rH + c] * dv;
      }
    }
  }
}

// gE_c = dw^T(gY_c) on the centre, then through the expansion into gA (and gU for reductions).
template <class F, class Par>
RF_HD void bwd_de_channel(const Par& par, int c, int H, const F* w_exp, const F* b_exp,
                          const F* w_dw, int k, bool expand, const Tile& t, const Buf<F>& A,
                          const Buf<F>& GY, const Buf<F>& GU, const Buf<F>& GA) {
  const int p = k / 2;
  const F* w = w_dw + (int64_t)c * k * k;
  for (int y = par.y0(); y < t.TR; y += par.ny())
    for (int x = par.x0(); x < t.TC; x += par.nx()) {
      F ge = F(0);
      for (int i = 0; i < k; ++i)
        for (int j = 0; j < k; ++j) ge += w[i * k + j] * GY.at(0, y - (i - p), x - (j - p));
      if (!t.inmap(y, x)) ge = F(0);
      if (expand) {
        const F u = expand_pre(c, H, w_exp, b_exp, A, y, x);
        const F gu = relu6_pass(u) ? ge : F(0);
        GU.at(0, y, x) = gu;
        const F* we = w_exp + (int64_t)c * H;
        for (int h = 0; h < H; ++h) GA.at(h, y, x) += we[h] * gu;
      } else {
        GA.at(c, y, x) += ge;
      }
    }
}

// Per-channel weight-gradient reductions over the tile centre. Item layout (per channel c):
//   [0, k*k)              gw_dw[c, tap]
//   k*k                   gb_dw[c]
//   k*k+1 + h (h < H)     gw_pro[h, c]     (= sum alpha_h gR_h D_c)
//   k*k+1+H + h           gw_exp[c, h]     (expand only)
//   k*k+1+2H              gb_exp[c]        (expand only)
RF_HD int bwd_channel_items(int H, int k, bool expand) { return k * k + 1 + H + (expand ? H + 1 : 0); }

// The item's sum over the centre pixels [q0, q1) in row-major order (q = y * TC + x), in fp64
// (one sequential sum: fp32 would lose ~sqrt(TR TC) ulps). The CPU sums a whole tile at once; the
// CUDA kernel splits an item's pixels over a few threads and adds their fp64 partials in order.
template <class F>
RF_HD double bwd_channel_item(int item, int H, const F* alpha, int k, const Tile& t, const Buf<F>& A,
                              const Buf<F>& E, int ce, const Buf<F>& GR, const Buf<F>& GY,
                              const Buf<F>& D, const Buf<F>& GU, int q0, int q1) {
  const int p = k / 2;
  double acc = 0;
  int y = q0 / t.TC, x = q0 % t.TC;
  const int kind = item < k * k ? 0 : item == k * k ? 1 : item < k * k + 1 + H ? 2 : item < k * k + 1 + 2 * H ? 3 : 4;
  const int di = item / k - p, dj = item % k - p;               // kind 0: the tap
  const int h = kind == 2 ? item - k * k - 1 : item - k * k - 1 - H;  // kinds 2, 3: the head
  for (int q = q0; q < q1; ++q) {
    switch (kind) {
      case 0: acc += double(GY.at(0, y, x)) * E.at(ce, y + di, x + dj); break;
      case 1: acc += GY.at(0, y, x); break;
      case 2: acc += double(GR.at(h, y, x)) * D.at(0, y, x); break;
      case 3: acc += double(GU.at(0, y, x)) * A.at(h, y, x); break;
      default: acc += GU.at(0, y, x);
    }
    if (++x == t.TC) x = 0, ++y;
  }
  return kind == 2 ? acc * alpha[h] : acc;
}

// After all channels: gA_h += alpha_h gR_h (the residual path).
template <class F, class Par>
RF_HD void bwd_residual(const Par& par, int H, const F* alpha, const Tile& t, const Buf<F>& GR,
                        const Buf<F>& GA) {
  for (int h = 0; h < H; ++h)
    for (int y = par.y0(); y < t.TR; y += par.ny())
      for (int x = par.x0(); x < t.TC; x += par.nx())
        GA.at(h, y, x) += t.inmap(y, x) ? alpha[h] * GR.at(h, y, x) : F(0);
}

// Final per-head reductions, items [0, H): galpha_h = sum gR_h (A_h + P_h + b_pro_h);
// [H, 2H): gbeta_h = sum gR_h.  (gb_pro = alpha * gbeta.)
template <class F>
RF_HD F bwd_head_item(int item, int H, const F* b_pro, const Tile& t, const Buf<F>& A,
                      const Buf<F>& GR, const Buf<F>& P) {
  double acc = 0;  // fp64, as bwd_channel_item
  const int h = item < H ? item : item - H;
  for (int y = 0; y < t.TR; ++y)
    for (int x = 0; x < t.TC; ++x)
      if (t.inmap(y, x))
        acc += item < H ? double(GR.at(h, y, x)) * (A.at(h, y, x) + P.at(h, y, x) + b_pro[h]) : GR.at(h, y, x);
  return F(acc);
}

// ---------------------------------------------------------------------------
// Row helpers of the CPU fast paths (csrc/cpu): map membership per row and column range, so
// the loops split a row instead of testing every pixel and the column loops vectorise.
// ---------------------------------------------------------------------------
// Columns [lo, hi) of a buffer row with halo h that lie inside the map.
RF_HD int map_col_lo(const Tile& t, int h) { return t.c0 - h >= 0 ? -h : (int)-t.c0; }
RF_HD int map_col_hi(const Tile& t, int h) {
  return t.c0 + t.TC + h <= t.N ? t.TC + h : (int)(t.N - t.c0);
}
RF_HD bool map_row(const Tile& t, int y) { return t.r0 + y >= 0 && t.r0 + y < t.N; }

// Zero the columns of row r (halo h) outside [lo, hi), or all of it when the row is off the map.
template <class F, class Par>
RF_HD void zero_off_map(const Par& par, F* r, int h, int TC, bool rin, int lo, int hi) {
  const int a = rin ? lo : TC + h;
  for (int x = -h + par.x0(); x < a; x += par.nx()) r[x] = F(0);
  if (rin)
    for (int x = hi + par.x0(); x < TC + h; x += par.nx()) r[x] = F(0);
}

// load_tile's result, row by row: zero the off-map columns, convert the in-map range (a plain
// contiguous loop the CPU vectorises; load_tile tests every pixel).
template <class F, class T, class Par>
RF_HD void load_tile_rows(const Par& par, const T* src, int C, const Tile& t, const Buf<F>& b) {
  const int h = b.halo, lo = map_col_lo(t, h), hi = map_col_hi(t, h);
  for (int c = 0; c < C; ++c)
    for (int y = -h + par.y0(); y < t.TR + h; y += par.ny()) {
      F* dst = b.row(c, y);
      const bool rin = map_row(t, y);
      zero_off_map(par, dst, h, t.TC, rin, lo, hi);
      if (!rin) continue;
      const T* s = src + ((int64_t)c * t.N + t.r0 + y) * t.N + t.c0;
      for (int x = lo + par.x0(); x < hi; x += par.nx()) dst[x] = static_cast<F>(s[x]);
    }
}

// ---------------------------------------------------------------------------
// Building block: k x k depthwise conv of one (N, M) map in global memory, zero padding.
// transpose=false: y(r,c) = sum_ij w[i,j] x(r+i-p, c+j-p)   (PyTorch conv2d)
// transpose=true:  y(r,c) = sum_ij w[i,j] x(r-i+p, c-j+p)   (its adjoint: grad of the input)
// ---------------------------------------------------------------------------
template <class F>
RF_HD F dw_global(const F* x, int64_t N, int64_t M, const F* w, int k, int64_t r, int64_t c, bool transpose) {
  const int p = k / 2;
  F acc = F(0);
  for (int i = 0; i < k; ++i) {
    const int64_t rr = transpose ? r - i + p : r + i - p;
    if (rr < 0 || rr >= N) continue;
    for (int j = 0; j < k; ++j) {
      const int64_t cc = transpose ? c - j + p : c + j - p;
      if (cc < 0 || cc >= M) continue;
      acc += w[i * k + j] * x[rr * M + cc];
    }
  }
  return acc;
}

// One term of the weight gradient of tap `tap` at output pixel (r, c): g(r,c) x(r+i-p, c+j-p).
template <class F>
RF_HD F dw_wgrad_term(const F* g, const F* x, int64_t N, int64_t M, int k, int tap, int64_t r, int64_t c) {
  const int p = k / 2;
  const int64_t rr = r + tap / k - p, cc = c + tap % k - p;
  return (rr >= 0 && rr < N && cc >= 0 && cc < M) ? g[r * M + c] * x[rr * M + cc] : F(0);
}

template <class F>
RF_HD F dw_weight_grad(const F* g, const F* x, int64_t N, int64_t M, int k, int tap) {
  F acc = F(0);
  for (int64_t r = 0; r < N; ++r)
    for (int64_t c = 0; c < M; ++c) acc += dw_wgrad_term(g, x, N, M, k, tap, r, c);
  return acc;
}

}  // namespace refiner
