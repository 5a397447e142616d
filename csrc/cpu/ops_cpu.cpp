// CPU drivers of the refiner ops: at::parallel_for over tiles, tile math from csrc/common.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/refine_tile.h"
#include "cpu/micro_kernels.h"
#include "cpu/portable.h"
#include "cpu/small_gemm.h"
#include "validate.h"

namespace refiner {
namespace {

using at::Tensor;

#define RF_DISPATCH_F(ct, name, ...) AT_DISPATCH_FLOATING_TYPES(ct, name, __VA_ARGS__)

// detach: ATen calls made on at::parallel_for worker threads do not inherit the caller's
// below-autograd dispatch state, so they must never see tensors that require grad.
inline Tensor cc(const Tensor& t, at::ScalarType ct) { return t.detach().to(ct).contiguous(); }

}  // namespace
}  // namespace refiner

// Fortran BLAS (MKL in the x86 torch wheels exports it from libtorch_cpu). Weak: when absent the
// drivers fall back to at::mm on wrapped buffers.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
}

namespace refiner {
namespace {

inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* al,
                      const float* a, const int* lda, const float* b, const int* ldb, const float* be, float* c,
                      const int* ldc) {
  sgemm_(ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc);
}
inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* al,
                      const double* a, const int* lda, const double* b, const int* ldb, const double* be, double* c,
                      const int* ldc) {
  dgemm_(ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc);
}
template <class F> bool has_blas();
template <> bool has_blas<float>() { return sgemm_ != nullptr; }
template <> bool has_blas<double>() { return dgemm_ != nullptr; }

// Inside at::parallel_for each worker calls BLAS on its own tile: keep BLAS single-threaded there
// (nested MKL threading oversubscribes the cores badly).
struct BlasSerialGuard {
  int prev = -1;
  BlasSerialGuard() {
    if (MKL_Set_Num_Threads_Local) prev = MKL_Set_Num_Threads_Local(1);
  }
  ~BlasSerialGuard() {
    if (MKL_Set_Num_Threads_Local && prev >= 0) MKL_Set_Num_Threads_Local(prev);
  }
};

// fp32 on a CPU with AVX-512: cpu/small_gemm.h instead of BLAS (REFINER_CPU_SMALL_GEMM=0: BLAS).
// Read at every call, as the other switches are (a refine forward at B=8 makes ~700 calls).
inline bool small_gemm_on() {
  static const bool supported = cpu::small_gemm_supported();
  const char* e = std::getenv("REFINER_CPU_SMALL_GEMM");
  return supported && !(e && e[0] == '0');
}

// Row-major C(m x n) = alpha op(A) op(B) (+ C when accumulate), op(B) = B (k x n, ld ldb) or,
// with transB, B^T for B (n x k, ld ldb); likewise op(A) = A (m x k) or, with transA, A^T (k x m). Single-threaded (called per tile / per head).
template <class F>
void gemm_rm(int64_t m, int64_t n, int64_t k, const F* A, int64_t lda, const F* B, int64_t ldb, F* C, int64_t ldc,
             bool accumulate = false, bool transB = false, F alpha = F(1), bool transA = false) {
#ifdef RF_HAVE_SMALL_GEMM
  if constexpr (std::is_same<F, float>::value) {
    if (small_gemm_on()) {
      thread_local std::vector<float> bt;  // op(B) row-major when B comes transposed
      if (transB) {
        bt.resize((size_t)(k * n));
        for (int64_t j = 0; j < n; ++j)
          for (int64_t kk = 0; kk < k; ++kk) bt[kk * n + j] = B[j * ldb + kk];
      }
      cpu::small_gemm(m, n, k, A, transA ? 1 : lda, transA ? lda : 1, transB ? bt.data() : B, transB ? n : ldb, C, ldc,
                      alpha, accumulate);
      return;
    }
  }
#endif
  if (has_blas<F>()) {
    // column-major view: C^T (n x m) = op(B)^T (n x k) A^T (k x m)
    const int im = (int)n, in = (int)m, ik = (int)k, ila = (int)ldb, ilb = (int)lda, ilc = (int)ldc;
    const F beta = accumulate ? 1 : 0;
    blas_gemm(transB ? "T" : "N", transA ? "T" : "N", &im, &in, &ik, &alpha, B, &ila, A, &ilb, &beta, C, &ilc);
    return;
  }
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<F>::value);
  auto a = transA ? at::from_blob(const_cast<F*>(A), {k, m}, {lda, 1}, opt).t()
                  : at::from_blob(const_cast<F*>(A), {m, k}, {lda, 1}, opt);
  auto b = transB ? at::from_blob(const_cast<F*>(B), {n, k}, {ldb, 1}, opt).t()
                  : at::from_blob(const_cast<F*>(B), {k, n}, {ldb, 1}, opt);
  auto c = at::from_blob(C, {m, n}, {ldc, 1}, opt);
  if (accumulate) c.add_(at::mm(a, b), alpha);
  else c.copy_(at::mm(a, b).mul_(alpha));
}

}  // namespace

namespace cpu {
// REFINER_CPU_PORTABLE=1 makes the CPU drivers run the exact stage sequence / element-wise math
// of the CUDA kernels (refine: expand_channel / dw_pro_channel and the backward's per-channel
// bwd_* stages instead of the streamed micro-kernel rows; softmax block, forward and backward:
// the softmax_rows / softmax_grad row math instead of the fused vector rows (fp32) or ATen's
// softmax (fp64); refine_train and the head mixes: the ATen code of the CUDA backend instead of
// the streamed rows and CPU kernels, see cpu_kernels() in portable.h). Tests run both paths.
bool portable_path() {
  const char* e = std::getenv("REFINER_CPU_PORTABLE");
  return e && e[0] == '1';
}
}  // namespace cpu

namespace {
using cpu::portable_path;

// ----------------------------------------------------------------------------
// softmax block
// ----------------------------------------------------------------------------
RF_CLONES void softmax_residual_rows_f32(float* a, const float* s, const float* prev, int64_t rows, int64_t n,
                                         float sprev) {
  for (int64_t i = 0; i < rows; ++i)
    cpu::softmax_residual_row(a + i * n, s + i * n, prev ? prev + i * n : nullptr, n, sprev);
}
// The fused vector rows exist for fp32 only: false tells the fp64 caller to use ATen's softmax.
inline bool softmax_residual_rows_fast(float* a, const float* s, const float* prev, int64_t rows, int64_t n,
                                       float sprev) {
  softmax_residual_rows_f32(a, s, prev, rows, n, sprev);
  return true;
}
inline bool softmax_residual_rows_fast(double*, const double*, const double*, int64_t, int64_t, double) {
  return false;
}

template <class F>
void softmax_rows(F* a, const F* prev, int64_t rows, int64_t n, F scale) {
  for (int64_t i = 0; i < rows; ++i) {
    F* r = a + i * n;
    // The scores scaled and stored first: `scale * r[j] - mx` would contract (-ffp-contract=fast)
    // into an FMA of the exact product, up to half an ulp above the max (e^16 at logits ~3e8).
    F mx = -std::numeric_limits<F>::infinity();
    for (int64_t j = 0; j < n; ++j) {
      r[j] *= scale;
      mx = std::max(mx, r[j]);
    }
    F sum = 0;
    for (int64_t j = 0; j < n; ++j) {
      const F e = rf_exp(r[j] - mx);
      r[j] = e;
      sum += e;
    }
    const F inv = F(1) / sum;
    if (prev) {
      const F* pr = prev + i * n;
      for (int64_t j = 0; j < n; ++j) r[j] = r[j] * inv + scale * pr[j];
    } else {
      for (int64_t j = 0; j < n; ++j) r[j] *= inv;
    }
  }
}

std::tuple<Tensor, Tensor> softmax_block_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                             const c10::optional<Tensor>& prev, double scale) {
  validate_softmax_block(q, k, v, prev, scale);
  const auto ct = compute_type(q);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3);
  auto qf = cc(q, ct).view({B * H, N, d}), kf = cc(k, ct).view({B * H, N, d}), vf = cc(v, ct).view({B * H, N, d});
  const bool has_prev = prev.has_value() && prev->defined();
  Tensor pf = has_prev ? cc(*prev, ct).view({B * H, N, N}) : Tensor();
  auto attn = at::empty({B * H, N, N}, qf.options());
  auto out = at::empty({B * H, N, d}, qf.options());
  RF_DISPATCH_F(ct, "softmax_block_cpu", [&] {
    using F = scalar_t;
    const F* pp = has_prev ? pf.data_ptr<F>() : nullptr;
    const bool portable = portable_path();
    at::parallel_for(0, B * H, 1, [&](int64_t s, int64_t e) {
      BlasSerialGuard blas_guard;
      Tensor S = portable ? Tensor() : at::empty({N, N}, qf.options());
      for (int64_t bh = s; bh < e; ++bh) {
        auto a = attn.select(0, bh);
        if (portable) {  // the element-wise math shared with the CUDA kernel
          at::mm_out(a, qf.select(0, bh), kf.select(0, bh).t());
          softmax_rows<F>(a.data_ptr<F>(), pp ? pp + bh * N * N : nullptr, N, N, F(scale));
        } else {  // scores into a cache-resident block, then fused vector rows (fp32) or ATen's softmax (fp64)
          gemm_rm<F>(N, N, d, qf.data_ptr<F>() + bh * N * d, d, kf.data_ptr<F>() + bh * N * d, d, S.data_ptr<F>(), N,
                     false, true, F(scale));
          if (!softmax_residual_rows_fast(a.data_ptr<F>(), S.data_ptr<F>(), pp ? pp + bh * N * N : nullptr, N, N,
                                          F(scale))) {
            at::_softmax_out(a, S, -1, false);
            if (pp) a.add_(pf.select(0, bh), scale);
          }
        }
        gemm_rm<F>(N, d, N, a.data_ptr<F>(), N, vf.data_ptr<F>() + bh * N * d, d, out.data_ptr<F>() + bh * N * d, d);
      }
    });
  });
  return {out.view({B, H, N, d}).to(q.scalar_type()), attn.view({B, H, N, N}).to(q.scalar_type())};
}

// Backward rows (fp32): gs = c softmax(s) (g - rowdot(g, softmax(s))) with g = ga + gat written to
// ga; gs may be s (P is recomputed in place, no second N x N buffer). See cpu::softmax_grad_row.
RF_CLONES void softmax_grad_rows_f32(float* gs, const float* s, float* ga, const float* gat, int64_t rows, int64_t n,
                                     float c) {
  for (int64_t i = 0; i < rows; ++i)
    cpu::softmax_grad_row(gs + i * n, s + i * n, ga + i * n, gat + i * n, n, c);
}
inline void softmax_grad_rows_fast(float* gs, const float* s, float* ga, const float* gat, int64_t rows, int64_t n,
                                   float c) {
  softmax_grad_rows_f32(gs, s, ga, gat, rows, n, c);
}
// Never reached (the caller's `fast` is fp32 only); it lets the fp64 instantiation compile.
inline void softmax_grad_rows_fast(double*, const double*, double*, const double*, int64_t, int64_t, double) {}

std::tuple<Tensor, Tensor, Tensor, Tensor> softmax_block_backward_cpu(
    const Tensor& gout, const Tensor& gattn, const Tensor& q, const Tensor& k, const Tensor& v,
    const Tensor& attn, double scale) {
  validate_softmax_block(q, k, v, attn, scale);
  const char* op = "softmax_block_backward";
  validate_grad(op, "grad_out", gout, q);
  validate_grad(op, "grad_attn", gattn, attn);
  const auto ct = compute_type(q);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3);
  // cc() copies nothing for inputs already contiguous in the compute type
  auto qf = cc(q, ct).view({B * H, N, d}), kf = cc(k, ct).view({B * H, N, d}), vf = cc(v, ct).view({B * H, N, d});
  auto af = cc(attn, ct).view({B * H, N, N});
  auto gof = cc(gout, ct).view({B * H, N, d});
  auto gatf = cc(gattn, ct).view({B * H, N, N});
  auto gA = at::empty({B * H, N, N}, qf.options());
  auto gq = at::empty_like(qf), gk = at::empty_like(kf), gv = at::empty_like(vf);
  RF_DISPATCH_F(ct, "softmax_block_backward_cpu", [&] {
    using F = scalar_t;
    const F *qp = qf.data_ptr<F>(), *kp = kf.data_ptr<F>(), *vp = vf.data_ptr<F>(), *ap = af.data_ptr<F>(),
            *gop = gof.data_ptr<F>(), *gatp = gatf.data_ptr<F>();
    F *gAp = gA.data_ptr<F>(), *gqp = gq.data_ptr<F>(), *gkp = gk.data_ptr<F>(), *gvp = gv.data_ptr<F>();
    const bool portable = portable_path(), fast = !portable && std::is_same<F, float>::value;
    at::parallel_for(0, B * H, 1, [&](int64_t s, int64_t e) {
      BlasSerialGuard blas_guard;
      Tensor S = at::empty({N, N}, qf.options()), P;
      F* sp = S.data_ptr<F>();
      for (int64_t bh = s; bh < e; ++bh) {
        const int64_t o4 = bh * N * d, o2 = bh * N * N;
        F* ga = gAp + o2;
        gemm_rm<F>(N, d, N, ap + o2, N, gop + o4, d, gvp + o4, d, false, false, F(1), true);  // gv = A^T gout
        gemm_rm<F>(N, N, d, qp + o4, d, kp + o4, d, sp, N, false, true, F(scale));        // S = scale q k^T
        if (fast) {  // fp32: gout v^T, then fused vector rows add gattn (gA) and turn S into gS
          gemm_rm<F>(N, N, d, gop + o4, d, vp + o4, d, ga, N, false, true);                // gout v^T
          softmax_grad_rows_fast(sp, sp, ga, gatp + o2, N, N, F(scale));
        } else {  // fp64 / portable: the original sequence (per-head gattn copy, P in a second buffer)
          std::copy(gatp + o2, gatp + o2 + N * N, ga);
          gemm_rm<F>(N, N, d, gop + o4, d, vp + o4, d, ga, N, true, true);                // gA = gattn + gout v^T
          if (!P.defined()) P = at::empty({N, N}, qf.options());
          F* pp = P.data_ptr<F>();
          if (portable) {
            std::copy(sp, sp + N * N, pp);
            softmax_rows<F>(pp, nullptr, N, N, F(1));
          } else {
            at::_softmax_out(P, S, -1, false);                                            // P, recomputed
          }
          for (int64_t i = 0; i < N; ++i) {  // gS = scale * P (gA - rowdot(gA, P))
            const F* pr = pp + i * N;
            const F* g = ga + i * N;
            F* gs = sp + i * N;
            F dot = 0;
            for (int64_t j = 0; j < N; ++j) dot += pr[j] * g[j];
            for (int64_t j = 0; j < N; ++j) gs[j] = F(scale) * softmax_grad(pr[j], g[j], dot);
          }
        }
        gemm_rm<F>(N, d, N, sp, N, kp + o4, d, gqp + o4, d);                              // gq = gS k
        gemm_rm<F>(N, d, N, sp, N, qp + o4, d, gkp + o4, d, false, false, F(1), true);    // gk = gS^T q
      }
    });
  });
  const auto st = q.scalar_type();
  return {gq.view({B, H, N, d}).to(st), gk.view({B, H, N, d}).to(st), gv.view({B, H, N, d}).to(st),
          gA.view({B, H, N, N}).to(st)};
}

// ----------------------------------------------------------------------------
// refine (eval): fused map + R @ v
// ----------------------------------------------------------------------------
struct RefineDims {
  int64_t B, H, N, d, rH, k;
  bool expand;
};

template <class F>
struct RefineW {
  const F *w_exp, *b_exp, *w_dw, *b_dw, *w_pro, *b_pro, *alpha, *beta;
};

constexpr int kRowsPerTile = 16;
// The streamed forward keeps only k expanded rows, so taller tiles cost little cache; they halve
// the recomputed halo rows and give R @ v a taller matmul.
constexpr int kStreamRows = 32;

// R @ v of one row tile (and/or R itself): R's H planes of t.TR rows at Rt, plane stride rplane.
template <class F>
void store_r_tile(const F* Rt, int64_t rplane, int64_t ldr, const F* V, const RefineDims& D, int64_t b,
                  const Tile& t, F* out, F* Rmap) {
  const int64_t N = D.N, d = D.d;
  for (int64_t h = 0; h < D.H; ++h) {
    const int64_t bh = b * D.H + h;
    const F* rh = Rt + h * rplane;
    if (Rmap)
      for (int y = 0; y < t.TR; ++y) std::copy(rh + y * ldr, rh + y * ldr + N, Rmap + (bh * N + t.r0 + y) * N);
    if (out) gemm_rm<F>(t.TR, d, N, rh, ldr, V + bh * N * d, d, out + (bh * N + t.r0) * d, d);
  }
}

// One chunk [s, e) of (batch, row-tile of kRowsPerTile) work items of the forward, the CUDA
// kernel's stage sequence (REFINER_CPU_PORTABLE=1).
template <class F>
void refine_fwd_chunk_portable(const F* A, const F* V, const RefineW<F>& w, const RefineDims& D, F* out, F* Rmap,
                               int64_t s, int64_t e) {
  const int64_t N = D.N, H = D.H, rH = D.rH;
  const int p = (int)D.k / 2;
  const int64_t ntiles = (N + kRowsPerTile - 1) / kRowsPerTile;
  Tile tmax{N, 0, 0, kRowsPerTile, (int)N};
  BlasSerialGuard blas_guard;
  std::vector<F> abuf(buf_elems<F>(tmax, p, (int)H)), ebuf(buf_elems<F>(tmax, p, 1)),
      pbuf(buf_elems<F>(tmax, 0, (int)H)), drow(N);
  SerialPar par;
  for (int64_t idx = s; idx < e; ++idx) {
    const int64_t b = idx / ntiles, r0 = (idx % ntiles) * kRowsPerTile;
    Tile t{N, r0, 0, (int)std::min<int64_t>(kRowsPerTile, N - r0), (int)N};
    auto Ab = make_buf(abuf.data(), t, p), Eb = make_buf(ebuf.data(), t, p), Pb = make_buf(pbuf.data(), t, 0);
    load_tile(par, A + b * H * N * N, (int)H, t, Ab);
    std::fill(pbuf.begin(), pbuf.end(), F(0));
    for (int c = 0; c < (int)rH; ++c) {
      if (D.expand) {
        expand_channel(par, c, (int)H, w.w_exp, w.b_exp, t, Ab, Eb, p);
        dw_pro_channel(par, c, (int)H, (int)rH, w.w_dw, w.b_dw, w.w_pro, (int)D.k, t, Eb, 0, Pb, drow.data());
      } else {
        dw_pro_channel(par, c, (int)H, (int)rH, w.w_dw, w.b_dw, w.w_pro, (int)D.k, t, Ab, c, Pb, drow.data());
      }
    }
    finish_r(par, (int)H, w.b_pro, w.alpha, w.beta, t, Ab, Pb);
    store_r_tile(Pb.p, Pb.plane, Pb.ld, V, D, b, t, out, Rmap);
  }
}

// Fast forward of one chunk [s, e) of (batch, row-tile of kStreamRows) items. Rows are streamed:
// the expanded rows live in a ring of the k rows one dw output row needs, so each is computed once
// per tile and every stage reads L1/L2-resident rows; both 1x1 mixes are head_mix micro-kernels
// with the bias/relu6 and the residual/adapt-BN epilogues fused. Row buffers are padded to the
// vector width (zero-initialised; padding columns hold finite junk nobody reads).
template <class F>
inline RF_INLINE void refine_fwd_chunk_stream(const F* A, const F* V, const RefineW<F>& w, const RefineDims& D,
                                              F* out, F* Rmap, int64_t s, int64_t e) {
  using VecF = cpu::vec_t<F>;
  constexpr int L = cpu::Vec<F>::L;
  const int64_t N = D.N, H = D.H, rH = D.rH;
  const int k = (int)D.k, p = k / 2;
  const int64_t ntiles = (N + kStreamRows - 1) / kStreamRows;
  const int64_t ldA = cpu::vec_pad<F>(N + 2 * p), ldD = cpu::vec_pad<F>(N);
  const int64_t aplane = (kStreamRows + 2 * p) * ldA, rplane = kStreamRows * ldD;
  BlasSerialGuard blas_guard;
  // + slack: the residual epilogue reads a row's centre up to column ldD, p past the row's end, and
  // the stencil reads its input rows up to k - 1 past ldD
  const int64_t slack = 2 * L;
  std::vector<F> abuf(H * aplane + slack), ring(D.expand ? k * rH * ldA + slack : 0), drow(rH * ldD),
      rbuf(H * rplane);
  const Buf<F> Ab{abuf.data(), p, (int)ldA, (int)aplane};
  const F six_s = 6;
  const cpu::Splat<F> wexp(w.w_exp, D.expand ? rH * H : 0), bexp(w.b_exp, D.expand ? rH : 0), wpro(w.w_pro, H * rH),
      wdw(w.w_dw, rH * k * k), bdw(w.b_dw, rH), bpro(w.b_pro, H), alpha(w.alpha, H), beta(w.beta, H), six(&six_s, 1);
  auto e_row = [&](int y) -> F* { return ring.data() + ((y + p) % k) * rH * ldA; };  // E row y, column -p
  SerialPar par;
  for (int64_t idx = s; idx < e; ++idx) {
    const int64_t b = idx / ntiles, r0 = (idx % ntiles) * kStreamRows;
    const Tile t{N, r0, 0, (int)std::min<int64_t>(kStreamRows, N - r0), (int)N};
    load_tile_rows(par, A + b * H * N * N, (int)H, t, Ab);
    for (int y = -p; y < t.TR + p; ++y) {
      if (D.expand) {  // E row y = relu6(W_exp A + b_exp), 0 off the map
        F* er = e_row(y);
        if (!map_row(t, y)) {
          std::fill(er, er + rH * ldA, F(0));
        } else {
          cpu::head_mix<F>((int)rH, (int)H, N + 2 * p, wexp.data(), Ab.row(0, y) - p, aplane,
                           [&](int m, int64_t x, VecF v) RF_INLINE {
                             cpu::vstore(er + m * ldA + x, cpu::relu6_vec<F>(v + bexp[m], six[0]));
                           });
          for (int64_t c = 0; c < rH; ++c)
            for (int j = 0; j < p; ++j) er[c * ldA + j] = er[c * ldA + p + N + j] = F(0);
        }
      }
      const int yo = y - p;  // the output row whose last input row is y
      if (yo < 0) continue;
      for (int64_t c = 0; c < rH; ++c) {
        const F* rows[7];
        for (int i = 0; i < k; ++i) rows[i] = D.expand ? e_row(yo - p + i) + c * ldA : Ab.row((int)c, yo - p + i) - p;
        cpu::dw_row_k<true>(k, drow.data() + c * ldD, rows, wdw.data() + c * k * k * L, bdw[c], six[0], N);
      }
      // R row yo = alpha (A + W_pro D + b_pro) + beta
      cpu::head_mix<F>((int)H, (int)rH, N, wpro.data(), drow.data(), ldD, [&](int m, int64_t x, VecF v) RF_INLINE {
        cpu::vstore(rbuf.data() + m * rplane + yo * ldD + x,
                    alpha[m] * (cpu::vload(Ab.row(m, yo) + x) + v + bpro[m]) + beta[m]);
      });
    }
    store_r_tile(rbuf.data(), rplane, ldD, V, D, b, t, out, Rmap);
  }
}

template <class F>
__attribute__((always_inline)) inline void refine_fwd_chunk(const F* A, const F* V, const RefineW<F>& w,
                                                            const RefineDims& D, F* out, F* Rmap, bool portable,
                                                            int64_t s, int64_t e) {
  if (portable) refine_fwd_chunk_portable(A, V, w, D, out, Rmap, s, e);
  else refine_fwd_chunk_stream(A, V, w, D, out, Rmap, s, e);
}

RF_CLONES void refine_fwd_chunk_f32(const float* A, const float* V, const RefineW<float>& w, const RefineDims& D,
                                    float* out, float* Rmap, bool portable, int64_t s, int64_t e) {
  refine_fwd_chunk<float>(A, V, w, D, out, Rmap, portable, s, e);
}
void refine_fwd_chunk_any(const float* A, const float* V, const RefineW<float>& w, const RefineDims& D, float* out,
                          float* Rmap, bool portable, int64_t s, int64_t e) {
  refine_fwd_chunk_f32(A, V, w, D, out, Rmap, portable, s, e);
}
void refine_fwd_chunk_any(const double* A, const double* V, const RefineW<double>& w, const RefineDims& D,
                          double* out, double* Rmap, bool portable, int64_t s, int64_t e) {
  refine_fwd_chunk<double>(A, V, w, D, out, Rmap, portable, s, e);
}

// out = R @ v (when out != nullptr) and/or Rmap = R (when Rmap != nullptr).
template <class F>
void refine_fwd_driver(const F* A, const F* V, const RefineW<F>& w, const RefineDims& D, F* out, F* Rmap) {
  const bool portable = portable_path();
  const int rows = portable ? kRowsPerTile : kStreamRows;
  const int64_t ntiles = (D.N + rows - 1) / rows;
  at::parallel_for(0, D.B * ntiles, 1, [&](int64_t s, int64_t e) {
    refine_fwd_chunk_any(A, V, w, D, out, Rmap, portable, s, e);
  });
}

struct RefineArgs {
  Tensor attn, v, w_exp, b_exp, w_dw, b_dw, w_pro, b_pro, alpha, beta;
  RefineDims D;
};

RefineArgs prep_refine(const Tensor& attn, const Tensor& v, const Tensor& w_exp, const Tensor& b_exp,
                       const Tensor& w_dw, const Tensor& b_dw, const Tensor& w_pro, const Tensor& b_pro,
                       const Tensor& alpha, const Tensor& beta, bool expand) {
  validate_refine_eval(attn, v, w_exp, b_exp, w_dw, b_dw, w_pro, b_pro, alpha, beta, expand);
  const auto ct = compute_type(attn);
  RefineArgs r{cc(attn, ct), cc(v, ct), cc(w_exp, ct), cc(b_exp, ct), cc(w_dw, ct), cc(b_dw, ct),
               cc(w_pro, ct), cc(b_pro, ct), cc(alpha, ct), cc(beta, ct), {}};
  r.D = {attn.size(0), attn.size(1), attn.size(2), v.size(3), w_dw.size(0), w_dw.size(1), expand};
  return r;
}

template <class F>
RefineW<F> weights_of(const RefineArgs& r) {
  return {r.w_exp.data_ptr<F>(), r.b_exp.data_ptr<F>(), r.w_dw.data_ptr<F>(), r.b_dw.data_ptr<F>(),
          r.w_pro.data_ptr<F>(), r.b_pro.data_ptr<F>(), r.alpha.data_ptr<F>(), r.beta.data_ptr<F>()};
}

Tensor refine_eval_cpu(const Tensor& attn, const Tensor& v, const Tensor& w_exp, const Tensor& b_exp,
                       const Tensor& w_dw, const Tensor& b_dw, const Tensor& w_pro, const Tensor& b_pro,
                       const Tensor& alpha, const Tensor& beta, bool expand) {
  auto r = prep_refine(attn, v, w_exp, b_exp, w_dw, b_dw, w_pro, b_pro, alpha, beta, expand);
  auto out = at::empty({r.D.B, r.D.H, r.D.N, r.D.d}, r.attn.options());
  RF_DISPATCH_F(r.attn.scalar_type(), "refine_eval_cpu", [&] {
    refine_fwd_driver<scalar_t>(r.attn.data_ptr<scalar_t>(), r.v.data_ptr<scalar_t>(), weights_of<scalar_t>(r),
                                r.D, out.data_ptr<scalar_t>(), nullptr);
  });
  return out.to(attn.scalar_type());
}

// Parameter-gradient slots of one (batch, row-tile) work item; summed over items at the end
// (fixed order: deterministic).
struct BwdSlots {
  int64_t wdw, bdw, wpro, wexp, bexp, alpha, beta, n;
  BwdSlots(int64_t H, int64_t rH, int64_t k)
      : wdw(0), bdw(rH * k * k), wpro(bdw + rH), wexp(wpro + H * rH), bexp(wexp + rH * H), alpha(bexp + rH),
        beta(alpha + H), n(beta + H) {}
};

struct BwdIO {
  const void *A, *GO, *V;  // attn, grad_out (B,H,N,d), v (compute type)
  void *R, *GA, *part;     // R map (for gv), grad of attn, per-item slots
};

// Fast backward of one chunk [s, e) of (batch, row-tile of kStreamRows) items, streamed by rows
// like the forward. With lead row j, three stages run with lags of p rows each:
//   A (row j)      E = relu6(W_exp A + b_exp) into a ring of k rows;
//   B (row j - p)  D = relu6(dw(E) + b_dw); on centre rows R = alpha (A + W_pro D + b_pro) + beta
//                  (stored for gv) with the galpha / gbeta sums; GP = alpha gR;
//                  gY = (W_pro^T GP) where 0 < D < 6, into a ring of k rows; on centre rows the
//                  gw_pro, gw_dw and gb_dw sums;
//   C (row j - 2p) gE = dw^T(gY), gU = gE where 0 < E < 6, gA = GP + W_exp^T gU (without the
//                  expansion: gA = GP + gE), with the gw_exp and gb_exp sums.
// Every ring row a stage reads was written by an earlier stage of the same item: the E ring holds
// rows j-2p..j, the gY ring rows j-3p..j-p. gR = gout v^T (rows with halo p) is one BLAS product
// per head and tile. 1x1 mixes and their weight gradients are micro-kernels (micro_kernels.h);
// the parameter-gradient sums stay in vector lanes until the item's end (fixed order).
// Rows: A has a halo of 2p rows and columns; the rings have p zero columns each side. Padding
// columns that enter a sum (gY, D, gU, and gR's) are zeroed; other padding holds finite junk.
template <class F>
inline RF_INLINE void refine_bwd_chunk_stream(const BwdIO& io, const RefineW<F>& w, const RefineDims& D, int64_t s,
                                              int64_t e) {
  using VecF = cpu::vec_t<F>;
  constexpr int L = cpu::Vec<F>::L;
  const int64_t N = D.N, H = D.H, d = D.d, rH = D.rH;
  const int k = (int)D.k, p = k / 2, kk = k * k;
  const int64_t ntiles = (N + kStreamRows - 1) / kStreamRows;
  const BwdSlots sl(H, rH, D.k);
  const F *A = static_cast<const F*>(io.A), *GO = static_cast<const F*>(io.GO), *V = static_cast<const F*>(io.V);
  F *Rp = static_cast<F*>(io.R), *GAp = static_cast<F*>(io.GA), *part = static_cast<F*>(io.part);
  // ldD: plain rows; ld: bordered rows (every read of a row stays inside it, see the header)
  const int64_t ldD = cpu::vec_pad<F>(N), ld = ldD + 2 * cpu::vec_pad<F>(2 * p);
  const int64_t aplane = (kStreamRows + 4 * p) * ld, grplane = (kStreamRows + 2 * p) * ldD;
  BlasSerialGuard blas_guard;
  std::vector<F> abuf(H * aplane), ering(D.expand ? k * rH * ld : 0), gyring(k * rH * ld), grbuf(H * grplane),
      drow(rH * ldD), gerow(rH * ldD), orow(H * ldD);
  // lane accumulators of the parameter-gradient sums, slot order
  std::vector<F> acc(sl.n * L);
  F *acc_wpro = acc.data() + sl.wpro * L, *acc_wexp = acc.data() + sl.wexp * L;
  const Buf<F> Ab{abuf.data(), 2 * p, (int)ld, (int)aplane};
  std::vector<F> wt_exp(H * rH), wt_pro(rH * H), wflip(rH * kk);  // W_exp^T, W_pro^T, flipped taps
  for (int64_t c = 0; c < rH; ++c) {
    for (int64_t h = 0; h < H; ++h) {
      if (D.expand) wt_exp[h * rH + c] = w.w_exp[c * H + h];
      wt_pro[c * H + h] = w.w_pro[h * rH + c];
    }
    for (int t = 0; t < kk; ++t) wflip[c * kk + t] = w.w_dw[c * kk + kk - 1 - t];
  }
  const F six_s = 6, zero_s = 0;
  const cpu::Splat<F> wexp(w.w_exp, D.expand ? rH * H : 0), wexpT(wt_exp.data(), D.expand ? H * rH : 0),
      bexp(w.b_exp, D.expand ? rH : 0), wpro(w.w_pro, H * rH), wproT(wt_pro.data(), rH * H), wdw(w.w_dw, rH * kk),
      wdwT(wflip.data(), rH * kk), bdw(w.b_dw, rH), bpro(w.b_pro, H), alpha(w.alpha, H), beta(w.beta, H),
      six(&six_s, 1), zero(&zero_s, 1);
  auto e_row = [&](int y, int64_t c) -> const F* RF_INLINE {  // E row y of channel c, column -p
    return D.expand ? ering.data() + (((y + 2 * p) % k) * rH + c) * ld : Ab.row((int)c, y) - p;
  };
  auto gy_row = [&](int y, int64_t c) -> F* RF_INLINE {  // gY row y of channel c, column -p
    return gyring.data() + (((y + p) % k) * rH + c) * ld;
  };
  auto gr_row = [&](int64_t h, int y) -> F* RF_INLINE { return grbuf.data() + h * grplane + (y + p) * ldD; };
  auto zero_pad = [&](F* row) RF_INLINE { std::fill(row + N, row + ldD, F(0)); };  // columns [N, vec_pad(N))
  auto vsum = [&](F* a, const F* row) RF_INLINE {
    VecF sv = cpu::vload(a);
    for (int64_t x = 0; x < ldD; x += L) sv += cpu::vload(row + x);
    cpu::vstore(a, sv);
  };
  const VecF vzero = zero[0], vsix = six[0];
  SerialPar par;
  for (int64_t idx = s; idx < e; ++idx) {
    const int64_t b = idx / ntiles, r0 = (idx % ntiles) * kStreamRows;
    const Tile t{N, r0, 0, (int)std::min<int64_t>(kStreamRows, N - r0), (int)N};
    std::fill(acc.begin(), acc.end(), F(0));
    load_tile_rows(par, A + b * H * N * N, (int)H, t, Ab);
    // gR rows [-p, T + p): in-map rows from BLAS, the others zero (padding columns stay zero)
    const int ylo = (int)std::max<int64_t>(-p, -r0), yhi = (int)std::min<int64_t>(t.TR + p, N - r0);
    for (int64_t h = 0; h < H; ++h) {
      for (int y = -p; y < t.TR + p; ++y)
        if (y < ylo || y >= yhi) std::fill(gr_row(h, y), gr_row(h, y) + ldD, F(0));
      const int64_t bh = b * H + h;
      gemm_rm<F>(yhi - ylo, N, d, GO + (bh * N + r0 + ylo) * d, d, V + bh * N * d, d, gr_row(h, ylo), ldD, false,
                 true);
    }
    for (int j = -2 * p; j < t.TR + 2 * p; ++j) {
      // --- stage A: E row j
      if (D.expand) {
        F* er = ering.data() + ((j + 2 * p) % k) * rH * ld;
        if (!map_row(t, j)) {
          std::fill(er, er + rH * ld, F(0));
        } else {
          cpu::head_mix<F>((int)rH, (int)H, N + 2 * p, wexp.data(), Ab.row(0, j) - p, aplane,
                           [&](int m, int64_t x, VecF v) RF_INLINE {
                             cpu::vstore(er + m * ld + x, cpu::relu6_vec<F>(v + bexp[m], vsix));
                           });
          for (int64_t c = 0; c < rH; ++c)
            for (int i = 0; i < p; ++i) er[c * ld + i] = er[c * ld + p + N + i] = F(0);
        }
      }
      // --- stage B: row yy
      const int yy = j - p;
      if (yy >= -p && yy < t.TR + p) {
        if (!map_row(t, yy)) {
          for (int64_t c = 0; c < rH; ++c) std::fill(gy_row(yy, c), gy_row(yy, c) + ld, F(0));
        } else {
          const bool centre = yy >= 0 && yy < t.TR;
          const F* rows[7];
          for (int64_t c = 0; c < rH; ++c) {  // D = relu6(dw(E) + b_dw)
            for (int i = 0; i < k; ++i) rows[i] = e_row(yy - p + i, c);
            cpu::dw_row_k<true>(k, drow.data() + c * ldD, rows, wdw.data() + c * kk * L, bdw[c], vsix, N);
            zero_pad(drow.data() + c * ldD);
          }
          if (centre) {  // R row = alpha (A + W_pro D + b_pro) + beta; galpha += gR Z, gbeta += gR
            cpu::head_mix<F>((int)H, (int)rH, N, wpro.data(), drow.data(), ldD,
                             [&](int m, int64_t x, VecF v) RF_INLINE {
                               const VecF z = cpu::vload(Ab.row(m, yy) + x) + v + bpro[m];
                               const VecF g = cpu::vload(gr_row(m, yy) + x);
                               cpu::vstore(orow.data() + m * ldD + x, alpha[m] * z + beta[m]);
                               F* ga = acc.data() + (sl.alpha + m) * L;
                               F* gb = acc.data() + (sl.beta + m) * L;
                               cpu::vstore(ga, cpu::vload(ga) + g * z);
                               cpu::vstore(gb, cpu::vload(gb) + g);
                             });
            for (int64_t h = 0; h < H; ++h)
              std::copy(orow.data() + h * ldD, orow.data() + h * ldD + N, Rp + ((b * H + h) * N + r0 + yy) * N);
          }
          for (int64_t h = 0; h < H; ++h) {  // GP = alpha gR, in place
            F* g = gr_row(h, yy);
            for (int64_t x = 0; x < ldD; x += L) cpu::vstore(g + x, alpha[h] * cpu::vload(g + x));
          }
          // gY = W_pro^T GP where relu6 passed (0 < D < 6)
          cpu::head_mix<F>((int)rH, (int)H, N, wproT.data(), gr_row(0, yy), grplane,
                           [&](int c, int64_t x, VecF v) RF_INLINE {
                             const VecF dv = cpu::vload(drow.data() + c * ldD + x);
                             cpu::vstore(gy_row(yy, c) + p + x, (dv > vzero) & (dv < vsix) ? v : vzero);
                           });
          for (int64_t c = 0; c < rH; ++c) zero_pad(gy_row(yy, c) + p);
          if (centre) {
            cpu::mix_wgrad_row<F>((int)H, (int)rH, ldD, gr_row(0, yy), grplane, drow.data(), ldD, acc_wpro);
            for (int64_t c = 0; c < rH; ++c) {
              const F* g = gy_row(yy, c) + p;
              for (int i = 0; i < k; ++i) rows[i] = e_row(yy - p + i, c);
              F* aw = acc.data() + (sl.wdw + c * kk) * L;  // (std::vector: not vector-aligned)
              VecF av[49];
              for (int tap = 0; tap < kk; ++tap) av[tap] = cpu::vload(aw + tap * L);
              cpu::dw_wgrad_row_k<F>(k, av, g, rows, ldD);
              for (int tap = 0; tap < kk; ++tap) cpu::vstore(aw + tap * L, av[tap]);
              vsum(acc.data() + (sl.bdw + c) * L, g);
            }
          }
        }
      }
      // --- stage C: row y (centre rows only)
      const int y = j - 2 * p;
      if (y < 0 || y >= t.TR) continue;
      const F* rows[7];
      for (int64_t c = 0; c < rH; ++c) {
        for (int i = 0; i < k; ++i) rows[i] = gy_row(y - p + i, c);
        F* ge = gerow.data() + c * ldD;
        if (D.expand) {  // gU = dw^T(gY) where relu6 passed (0 < E < 6)
          const F* er = e_row(y, c) + p;
          cpu::dw_row_apply_k<F>(k, rows, wdwT.data() + c * kk * L, vzero, N, [&](int64_t x, VecF v) RF_INLINE {
            const VecF ev = cpu::vload(er + x);
            cpu::vstore(ge + x, (ev > vzero) & (ev < vsix) ? v : vzero);
          });
          zero_pad(ge);
          vsum(acc.data() + (sl.bexp + c) * L, ge);
        } else {  // gA = GP + dw^T(gY)
          const F* gp = gr_row(c, y);
          cpu::dw_row_apply_k<F>(k, rows, wdwT.data() + c * kk * L, vzero, N, [&](int64_t x, VecF v) RF_INLINE {
            cpu::vstore(orow.data() + c * ldD + x, cpu::vload(gp + x) + v);
          });
        }
      }
      if (D.expand) {  // gA = GP + W_exp^T gU; gw_exp += gU A^T
        cpu::head_mix<F>((int)H, (int)rH, N, wexpT.data(), gerow.data(), ldD, [&](int m, int64_t x, VecF v) RF_INLINE {
          cpu::vstore(orow.data() + m * ldD + x, cpu::vload(gr_row(m, y) + x) + v);
        });
        cpu::mix_wgrad_row<F>((int)rH, (int)H, ldD, gerow.data(), ldD, Ab.row(0, y), aplane, acc_wexp);
      }
      for (int64_t h = 0; h < H; ++h)
        std::copy(orow.data() + h * ldD, orow.data() + h * ldD + N, GAp + ((b * H + h) * N + r0 + y) * N);
    }
    cpu::lane_sums(acc.data(), sl.n, part + idx * sl.n);
  }
}

RF_CLONES void refine_bwd_chunk_f32(const BwdIO& io, const RefineW<float>& w, const RefineDims& D, int64_t s,
                                    int64_t e) {
  refine_bwd_chunk_stream<float>(io, w, D, s, e);
}
void refine_bwd_chunk_any(const BwdIO& io, const RefineW<float>& w, const RefineDims& D, int64_t s, int64_t e) {
  refine_bwd_chunk_f32(io, w, D, s, e);
}
void refine_bwd_chunk_any(const BwdIO& io, const RefineW<double>& w, const RefineDims& D, int64_t s, int64_t e) {
  refine_bwd_chunk_stream<double>(io, w, D, s, e);
}

// The CUDA kernel's per-channel stage sequence (REFINER_CPU_PORTABLE=1): R from the forward
// driver, gR = gout v^T in full, then per tile and channel bwd_dy / bwd_de / the item reductions.
template <class F>
void refine_bwd_portable(const RefineArgs& r, const Tensor& go, const Tensor& R, const Tensor& gA,
                         const Tensor& partial, const BwdSlots& sl, Tensor& gv) {
  const RefineDims D = r.D;
  const int64_t B = D.B, H = D.H, N = D.N, rH = D.rH, k = D.k;
  const int p = (int)k / 2;
  const int64_t ntiles = (N + kRowsPerTile - 1) / kRowsPerTile;
  const auto w = weights_of<F>(r);
  refine_fwd_driver<F>(r.attn.data_ptr<F>(), nullptr, w, D, nullptr, R.data_ptr<F>());
  Tensor gR = at::matmul(go, r.v.transpose(-2, -1)).contiguous();
  gv = at::matmul(R.transpose(-2, -1), go);
  const F* A = r.attn.data_ptr<F>();
  const F* GRp = gR.data_ptr<F>();
  F* gAp = gA.data_ptr<F>();
  F* part = partial.data_ptr<F>();
  at::parallel_for(0, B * ntiles, 1, [&](int64_t s, int64_t e) {
    Tile tmax{N, 0, 0, kRowsPerTile, (int)N};
    BlasSerialGuard blas_guard;
    std::vector<F> abuf(buf_elems<F>(tmax, 2 * p, (int)H)), ebuf(buf_elems<F>(tmax, 2 * p, 1)),
        grbuf(buf_elems<F>(tmax, p, (int)H)), gybuf(buf_elems<F>(tmax, p, 1)), dbuf(buf_elems<F>(tmax, 0, 1)),
        gubuf(buf_elems<F>(tmax, 0, 1)), pbuf(buf_elems<F>(tmax, 0, (int)H)), gabuf(buf_elems<F>(tmax, 0, (int)H));
    SerialPar par;
    for (int64_t idx = s; idx < e; ++idx) {
      const int64_t b = idx / ntiles, r0 = (idx % ntiles) * kRowsPerTile;
      Tile t{N, r0, 0, (int)std::min<int64_t>(kRowsPerTile, N - r0), (int)N};
      auto Ab = make_buf(abuf.data(), t, 2 * p), Eb = make_buf(ebuf.data(), t, 2 * p),
           GRb = make_buf(grbuf.data(), t, p), GYb = make_buf(gybuf.data(), t, p),
           Db = make_buf(dbuf.data(), t, 0), GUb = make_buf(gubuf.data(), t, 0),
           Pb = make_buf(pbuf.data(), t, 0), GAb = make_buf(gabuf.data(), t, 0);
      load_tile(par, A + b * H * N * N, (int)H, t, Ab);
      load_tile(par, GRp + b * H * N * N, (int)H, t, GRb);
      std::fill(pbuf.begin(), pbuf.end(), F(0));
      std::fill(gabuf.begin(), gabuf.end(), F(0));
      std::fill(gubuf.begin(), gubuf.end(), F(0));
      F* slot = part + idx * sl.n;
      const int nitems = bwd_channel_items((int)H, (int)k, D.expand);
      for (int c = 0; c < (int)rH; ++c) {
        const Buf<F>& Ec = D.expand ? Eb : Ab;
        const int ce = D.expand ? 0 : c;
        if (D.expand) expand_channel(par, c, (int)H, w.w_exp, w.b_exp, t, Ab, Eb, 2 * p);
        bwd_dy_channel(par, c, (int)H, (int)rH, w.w_dw, w.b_dw, w.w_pro, w.alpha, (int)k, t, Ec, ce, GRb, GYb,
                       Db, Pb);
        bwd_de_channel(par, c, (int)H, w.w_exp, w.b_exp, w.w_dw, (int)k, D.expand, t, Ab, GYb, GUb, GAb);
        for (int it = 0; it < nitems; ++it) {
          const F v_ = F(bwd_channel_item(it, (int)H, w.alpha, (int)k, t, Ab, Ec, ce, GRb, GYb, Db, GUb, 0,
                                          t.TR * t.TC));
          int64_t o;
          if (it < k * k) o = sl.wdw + c * k * k + it;
          else if (it == k * k) o = sl.bdw + c;
          else if (it < k * k + 1 + H) o = sl.wpro + (it - k * k - 1) * rH + c;
          else if (it < k * k + 1 + 2 * H) o = sl.wexp + c * H + (it - k * k - 1 - H);
          else o = sl.bexp + c;
          slot[o] += v_;
        }
      }
      bwd_residual(par, (int)H, w.alpha, t, GRb, GAb);
      for (int it = 0; it < 2 * H; ++it)
        slot[sl.alpha + it] += bwd_head_item(it, (int)H, w.b_pro, t, Ab, GRb, Pb);
      for (int64_t h = 0; h < H; ++h)
        for (int y = 0; y < t.TR; ++y) {
          const F* g = GAb.row((int)h, y);
          std::copy(g, g + N, gAp + ((b * H + h) * N + r0 + y) * N);
        }
    }
  });
}

template <class F>
void refine_bwd_fast(const RefineArgs& r, const Tensor& go, const Tensor& R, const Tensor& gA, const Tensor& partial,
                     Tensor& gv) {
  const int64_t ntiles = (r.D.N + kStreamRows - 1) / kStreamRows;
  const auto w = weights_of<F>(r);
  const BwdIO io{r.attn.data_ptr<F>(), go.data_ptr<F>(), r.v.data_ptr<F>(), R.data_ptr<F>(), gA.data_ptr<F>(),
                 partial.data_ptr<F>()};
  at::parallel_for(0, r.D.B * ntiles, 1,
                   [&](int64_t s, int64_t e) { refine_bwd_chunk_any(io, w, r.D, s, e); });
  gv = at::matmul(R.transpose(-2, -1), go);
}

std::vector<Tensor> refine_eval_backward_cpu_v(const Tensor& gout, const Tensor& attn, const Tensor& v,
                                               const Tensor& w_exp, const Tensor& b_exp, const Tensor& w_dw,
                                               const Tensor& b_dw, const Tensor& w_pro, const Tensor& b_pro,
                                               const Tensor& alpha, const Tensor& beta, bool expand) {
  auto r = prep_refine(attn, v, w_exp, b_exp, w_dw, b_dw, w_pro, b_pro, alpha, beta, expand);
  validate_grad("refine_eval_backward", "grad_out", gout, v);
  const auto ct = r.attn.scalar_type();
  const int64_t B = r.D.B, H = r.D.H, N = r.D.N, rH = r.D.rH, k = r.D.k;
  auto go = cc(gout, ct);
  auto R = at::empty({B, H, N, N}, r.attn.options());
  auto gA = at::empty({B, H, N, N}, r.attn.options());
  const BwdSlots sl(H, rH, k);
  const bool portable = portable_path();
  const int rows = portable ? kRowsPerTile : kStreamRows;
  const int64_t ntiles = (N + rows - 1) / rows;
  auto partial = at::zeros({B * ntiles, sl.n}, r.attn.options());
  Tensor gv;
  RF_DISPATCH_F(ct, "refine_eval_backward_cpu", [&] {
    if (portable) refine_bwd_portable<scalar_t>(r, go, R, gA, partial, sl, gv);
    else refine_bwd_fast<scalar_t>(r, go, R, gA, partial, gv);
  });
  auto tot = partial.sum(0);  // (the narrowed slices below are cloned: outputs must not alias)
  const auto st = attn.scalar_type();
  auto gw_dw = tot.narrow(0, sl.wdw, rH * k * k).view({rH, k, k});
  auto gb_dw = tot.narrow(0, sl.bdw, rH);
  auto gw_pro = tot.narrow(0, sl.wpro, H * rH).view({H, rH});
  auto gw_exp = tot.narrow(0, sl.wexp, rH * H).view({rH, H});
  auto gb_exp = tot.narrow(0, sl.bexp, rH);
  auto galpha = tot.narrow(0, sl.alpha, H);
  auto gbeta = tot.narrow(0, sl.beta, H);
  auto gb_pro = gbeta * r.alpha;
  auto own = [&](const Tensor& t) { return t.to(st).clone(at::MemoryFormat::Contiguous); };
  return {gA.to(st), gv.to(st), own(gw_exp), own(gb_exp), own(gw_dw), own(gb_dw), own(gw_pro), own(gb_pro),
          own(galpha), own(gbeta)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> refine_eval_backward_cpu(
    const Tensor& gout, const Tensor& attn, const Tensor& v, const Tensor& w_exp, const Tensor& b_exp,
    const Tensor& w_dw, const Tensor& b_dw, const Tensor& w_pro, const Tensor& b_pro, const Tensor& alpha,
    const Tensor& beta, bool expand) {
  auto g = refine_eval_backward_cpu_v(gout, attn, v, w_exp, b_exp, w_dw, b_dw, w_pro, b_pro, alpha, beta, expand);
  return {g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9]};
}

// ----------------------------------------------------------------------------
// building blocks: depthwise conv, row softmax
// ----------------------------------------------------------------------------
// Fast path of the depthwise building block: each plane is copied once into a zero-bordered
// buffer, then every output row is one vector stencil row (micro_kernels.h). The backward's grad
// of x is the same correlation with the taps flipped. Planes [s, e) of (B*C, N, M). With gw
// (and g, the incoming gradient) it writes the plane's weight-gradient sums instead of y: k*k per
// plane, summed over the batch by the caller.
template <class F>
inline RF_INLINE void dw_planes(const F* x, const F* w, F* y, const F* g, F* gw, int64_t C, int64_t N, int64_t M,
                                int k, bool flip, int64_t s, int64_t e) {
  constexpr int L = cpu::Vec<F>::L;
  const int p = k / 2;
  const int64_t ld = cpu::vec_pad<F>(M + 2 * p), ldo = cpu::vec_pad<F>(M);
  std::vector<F> pad((N + 2 * p) * ld + 2 * L), orow(ldo), taps(k * k);  // + 2L: stencil reads past ld
  const F zero_s = 0;
  const cpu::Splat<F> zero(&zero_s, 1);
  const F* rows[7];
  for (int64_t plane = s; plane < e; ++plane) {
    for (int64_t r = 0; r < N; ++r)
      std::copy(x + (plane * N + r) * M, x + (plane * N + r + 1) * M, &pad[(r + p) * ld + p]);
    if (gw) {
      cpu::vec_t<F> acc[49];
      for (int t = 0; t < k * k; ++t) acc[t] = zero[0];
      for (int64_t r = 0; r < N; ++r) {
        for (int i = 0; i < k; ++i) rows[i] = &pad[(r + i) * ld];
        std::copy(g + (plane * N + r) * M, g + (plane * N + r + 1) * M, orow.begin());  // zero past M
        cpu::dw_wgrad_row_k(k, acc, orow.data(), rows, M);
      }
      for (int t = 0; t < k * k; ++t) {
        F sum = 0;
        for (int l = 0; l < L; ++l) sum += acc[t][l];
        gw[plane * k * k + t] = sum;
      }
      continue;
    }
    const F* wc = w + (plane % C) * k * k;
    for (int t = 0; t < k * k; ++t) taps[t] = flip ? wc[k * k - 1 - t] : wc[t];
    const cpu::Splat<F> tv(taps.data(), k * k);
    for (int64_t r = 0; r < N; ++r) {
      for (int i = 0; i < k; ++i) rows[i] = &pad[(r + i) * ld];
      cpu::dw_row_k<false>(k, orow.data(), rows, tv.data(), zero[0], zero[0], M);
      std::copy(orow.begin(), orow.begin() + M, y + (plane * N + r) * M);
    }
  }
}
RF_CLONES void dw_planes_f32(const float* x, const float* w, float* y, const float* g, float* gw, int64_t C, int64_t N,
                             int64_t M, int k, bool flip, int64_t s, int64_t e) {
  dw_planes(x, w, y, g, gw, C, N, M, k, flip, s, e);
}
void dw_planes_any(const float* x, const float* w, float* y, const float* g, float* gw, int64_t C, int64_t N,
                   int64_t M, int k, bool flip, int64_t s, int64_t e) {
  dw_planes_f32(x, w, y, g, gw, C, N, M, k, flip, s, e);
}
void dw_planes_any(const double* x, const double* w, double* y, const double* g, double* gw, int64_t C, int64_t N,
                   int64_t M, int k, bool flip, int64_t s, int64_t e) {
  dw_planes(x, w, y, g, gw, C, N, M, k, flip, s, e);
}

// y = dw(x) (or dw^T(x) when transpose), planes (B*C, N, M): the fast path above, or per pixel
// through dw_global, the CUDA kernel's arithmetic (REFINER_CPU_PORTABLE=1).
template <class F>
void dw_driver(const F* xp, const F* wp, F* yp, int64_t B, int64_t C, int64_t N, int64_t M, int k, bool transpose) {
  if (!portable_path()) {
    at::parallel_for(0, B * C, 1, [&](int64_t s, int64_t e) {
      dw_planes_any(xp, wp, yp, (const F*)nullptr, (F*)nullptr, C, N, M, k, transpose, s, e);
    });
    return;
  }
  at::parallel_for(0, B * C * N, 16, [&](int64_t s, int64_t e) {
    for (int64_t idx = s; idx < e; ++idx) {
      const int64_t bc = idx / N, r = idx % N, c = bc % C;
      for (int64_t xx = 0; xx < M; ++xx)
        yp[idx * M + xx] = dw_global(xp + bc * N * M, N, M, wp + c * k * k, k, r, xx, transpose);
    }
  });
}

Tensor attn_dwconv_cpu(const Tensor& x, const Tensor& w) {
  validate_attn_dwconv(x, w);
  const auto ct = compute_type(x);
  auto xf = cc(x, ct), wf = cc(w, ct);
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2), M = x.size(3), k = w.size(1);
  auto y = at::empty_like(xf);
  RF_DISPATCH_F(ct, "attn_dwconv_cpu", [&] {
    dw_driver(xf.data_ptr<scalar_t>(), wf.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), B, C, N, M, (int)k, false);
  });
  return y.to(x.scalar_type());
}

std::tuple<Tensor, Tensor> attn_dwconv_backward_cpu(const Tensor& g, const Tensor& x, const Tensor& w) {
  validate_attn_dwconv(x, w);
  validate_grad("attn_dwconv_backward", "grad", g, x);
  const auto ct = compute_type(x);
  auto xf = cc(x, ct), wf = cc(w, ct), gf = cc(g, ct);
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2), M = x.size(3), k = w.size(1);
  auto gx = at::empty_like(xf);
  auto gw = at::empty({C, k, k}, xf.options());
  RF_DISPATCH_F(ct, "attn_dwconv_backward_cpu", [&] {
    using F = scalar_t;
    const F *xp = xf.data_ptr<F>(), *wp = wf.data_ptr<F>(), *gp = gf.data_ptr<F>();
    F *gxp = gx.data_ptr<F>(), *gwp = gw.data_ptr<F>();
    dw_driver(gp, wp, gxp, B, C, N, M, (int)k, true);
    if (portable_path()) {  // dw_weight_grad: the CUDA kernel's per-tap sums
      at::parallel_for(0, C * k * k, 1, [&](int64_t s, int64_t e) {
        for (int64_t it = s; it < e; ++it) {
          const int64_t c = it / (k * k);
          F acc = 0;
          for (int64_t b = 0; b < B; ++b)
            acc += dw_weight_grad(gp + (b * C + c) * N * M, xp + (b * C + c) * N * M, N, M, (int)k,
                                  (int)(it % (k * k)));
          gwp[it] = acc;
        }
      });
    } else {  // per-plane vector sums, then over the batch in a fixed order (deterministic)
      std::vector<F> per_plane(B * C * k * k);
      at::parallel_for(0, B * C, 1, [&](int64_t s, int64_t e) {
        dw_planes_any(xp, wp, (F*)nullptr, gp, per_plane.data(), C, N, M, (int)k, false, s, e);
      });
      for (int64_t it = 0; it < C * k * k; ++it) {
        F acc = 0;
        for (int64_t b = 0; b < B; ++b) acc += per_plane[b * C * k * k + it];
        gwp[it] = acc;
      }
    }
  });
  return {gx.to(x.scalar_type()), gw.to(w.scalar_type())};
}

Tensor row_softmax_cpu(const Tensor& x) {
  validate_row_softmax(x);
  const auto ct = compute_type(x);
  auto xf = cc(x, ct).clone();
  const int64_t n = x.dim() ? x.size(-1) : 1;
  const int64_t rows = n ? xf.numel() / n : 0;
  RF_DISPATCH_F(ct, "row_softmax_cpu", [&] {
    using F = scalar_t;
    F* p = xf.data_ptr<F>();
    at::parallel_for(0, rows, 64, [&](int64_t s, int64_t e) { softmax_rows<F>(p + s * n, nullptr, e - s, n, F(1)); });
  });
  return xf.to(x.scalar_type());
}

Tensor row_softmax_backward_cpu(const Tensor& g, const Tensor& y) {
  validate_row_softmax(y);
  validate_grad("row_softmax_backward", "grad", g, y);
  const auto ct = compute_type(y);
  auto yf = cc(y, ct), gx = cc(g, ct).clone();
  const int64_t n = y.size(-1);
  const int64_t rows = n ? yf.numel() / n : 0;
  RF_DISPATCH_F(ct, "row_softmax_backward_cpu", [&] {
    using F = scalar_t;
    const F* yp = yf.data_ptr<F>();
    F* gp = gx.data_ptr<F>();
    at::parallel_for(0, rows, 64, [&](int64_t s, int64_t e) {
      for (int64_t i = s; i < e; ++i) {
        const F* yr = yp + i * n;
        F* gr = gp + i * n;
        F dot = 0;
        for (int64_t j = 0; j < n; ++j) dot += yr[j] * gr[j];
        for (int64_t j = 0; j < n; ++j) gr[j] = softmax_grad(yr[j], gr[j], dot);
      }
    });
  });
  return gx.to(y.scalar_type());
}

}  // namespace
}  // namespace refiner

TORCH_LIBRARY_IMPL(refiner, CPU, m) {
  m.impl("softmax_block", &refiner::softmax_block_cpu);
  m.impl("softmax_block_backward", &refiner::softmax_block_backward_cpu);
  m.impl("refine_eval", &refiner::refine_eval_cpu);
  m.impl("refine_eval_backward", &refiner::refine_eval_backward_cpu);
  m.impl("attn_dwconv", &refiner::attn_dwconv_cpu);
  m.impl("attn_dwconv_backward", &refiner::attn_dwconv_backward_cpu);
  m.impl("row_softmax", &refiner::row_softmax_cpu);
  m.impl("row_softmax_backward", &refiner::row_softmax_backward_cpu);
}
