// CUDA kernels and launchers of the refiner ops. The refine kernels run the same stage
// functions as the CPU drivers (csrc/common/refine_tile.h) with a thread-parallel policy.
//
// Layout: one block per (batch, head, tile of query rows) for the softmax block and per (batch,
// tile of query rows) for the refine kernels, on grid.x (64-bit index math; B*H and B*N may
// exceed 65535). A tile is walked in column (key) tiles staged in shared memory.
// Inputs fp32/fp16/bf16, all arithmetic and accumulation in fp32. On sm_80+ the softmax block's
// forward and refine_eval's forward and backward gradient kernel run on the tensor cores instead
// (softmax_block_tc.cuh, refine_eval_tc.cuh, refine_eval_bwd_tc.cuh; docs/cuda_kernels.md); the
// kernels below serve fp64, H > 16, the rest, and REFINER_CUDA_TENSOR_CORES=0.
#include "cuda/cuda_common.cuh"
#include "cuda/refine_eval_tc.cuh"  // RefineWF, and the tensor-core refine forward
#include "cuda/refine_eval_bwd_tc.cuh"
#include "cuda/softmax_block_tc.cuh"

namespace refiner {
namespace {

// ----------------------------------------------------------------------------
// softmax block forward: one block per (b, h, tile of TQ query rows). K and then V stream
// through shared memory in tiles of kKeyTile keys, each read once per TQ rows (not per row);
// the TQ x N scores stay in shared memory for the softmax (a warp per row) and attn @ v.
// ----------------------------------------------------------------------------
constexpr int kSoftmaxThreads = 256;
constexpr int kKeyTile = 64;

size_t softmax_block_smem(int64_t N, int64_t d, int TQ) {  // q and out (TQ, d), a K/V tile, scores (TQ, N)
  return sizeof(float) * (2 * TQ * d + kKeyTile * (d + 1) + TQ * N);
}

// Keys [j0, j0 + nk) of one head's (N, d) K or V into kv, rows padded to ld, between two
// barriers (the previous tile's readers are done; the tile is complete).
template <class T>
__device__ void stage_keys(float* kv, const T* src, int64_t j0, int nk, int d, int ld) {
  __syncthreads();
  for (int j = threadIdx.x; j < nk * d; j += blockDim.x) kv[j / d * ld + j % d] = static_cast<float>(src[j0 * d + j]);
  __syncthreads();
}

template <class T>
__global__ void softmax_block_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                         const T* __restrict__ prev, T* __restrict__ out, T* __restrict__ attn,
                                         int64_t BH, int64_t N, int d, int TQ, float scale) {
  RF_DYN_SHARED(float, sm);
  const int ld = d + 1;  // K/V tile rows padded: the threads of a warp read different keys' rows
  float* qs = sm;                     // (TQ, d)
  float* oacc = qs + TQ * d;          // (TQ, d), each slot owned by one thread
  float* kv = oacc + TQ * d;          // (kKeyTile, ld)
  float* sc = kv + kKeyTile * ld;     // (TQ, N): scores, then the stored attn values
  const int tid = threadIdx.x, nt = blockDim.x, warp = tid >> 5, nw = nt >> 5;
  const int64_t ntiles = (N + TQ - 1) / TQ;
  for (int64_t blk = blockIdx.x; blk < BH * ntiles; blk += gridDim.x) {
    const int64_t bh = blk / ntiles, r0 = blk % ntiles * TQ;
    const int nq = (int)min((int64_t)TQ, N - r0);
    const T* kb = k + bh * N * d;
    const T* vb = v + bh * N * d;
    for (int j = tid; j < nq * d; j += nt) {
      qs[j] = static_cast<float>(q[(bh * N + r0) * d + j]);
      oacc[j] = 0.f;
    }
    for (int64_t j0 = 0; j0 < N; j0 += kKeyTile) {  // scores
      const int nk = (int)min((int64_t)kKeyTile, N - j0);
      stage_keys(kv, kb, j0, nk, d, ld);
      for (int e = tid; e < nq * nk; e += nt) {
        const int r = e / nk, j = e % nk;
        const float* qr = qs + r * d;
        const float* kr = kv + j * ld;
        float s = 0.f;
        for (int t = 0; t < d; ++t) s += qr[t] * kr[t];
        sc[r * N + j0 + j] = s * scale;
      }
    }
    __syncthreads();
    for (int r = warp; r < nq; r += nw) {  // softmax (+ scale * prev) of row r by warp r % nw
      const int64_t grow = (bh * N + r0 + r) * N;
      softmax_row_store(sc + r * N, N, prev ? prev + grow : nullptr, attn + grow, scale);
    }
    for (int64_t j0 = 0; j0 < N; j0 += kKeyTile) {  // out = attn @ v
      const int nk = (int)min((int64_t)kKeyTile, N - j0);
      stage_keys(kv, vb, j0, nk, d, ld);
      for (int e = tid; e < nq * d; e += nt) {
        const int r = e / d, dd = e % d;
        const float* a = sc + r * N + j0;
        float acc = 0.f;
        for (int j = 0; j < nk; ++j) acc += a[j] * kv[j * ld + dd];
        oacc[e] += acc;
      }
    }
    for (int e = tid; e < nq * d; e += nt) out[(bh * N + r0) * d + e] = static_cast<T>(oacc[e]);
    __syncthreads();
  }
}

std::tuple<Tensor, Tensor> softmax_block_cuda(const Tensor& q_, const Tensor& k_, const Tensor& v_,
                                              const c10::optional<Tensor>& prev_, double scale) {
  validate_softmax_block(q_, k_, v_, prev_, scale);
  c10::cuda::CUDAGuard guard(q_.device());
  auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const bool has_prev = prev_.has_value() && prev_->defined();
  Tensor prev = has_prev ? prev_->contiguous() : Tensor();
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3);
  auto out = at::empty_like(q);
  auto attn = at::empty({B, H, N, N}, q.options());
  if (tensor_cores_for(q.scalar_type()) && launch_softmax_block_tc(q, k, v, has_prev ? &prev : nullptr, out, attn, scale))
    return {out, attn};
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int TQ = tile_rows("REFINER_CUDA_SOFTMAX_ROWS", 16, [&](int tq) { return softmax_block_smem(N, d, tq); });
  const size_t smem = softmax_block_smem(N, d, TQ);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "softmax_block_cuda", [&] {
    set_smem(softmax_block_fwd_kernel<scalar_t>, smem, "softmax_block");
    RF_LAUNCH(softmax_block_fwd_kernel<scalar_t>, grid_for(B * H * ((N + TQ - 1) / TQ)), kSoftmaxThreads, smem,
              stream)(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                      has_prev ? prev.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
                      attn.data_ptr<scalar_t>(), B * H, N, (int)d, TQ, (float)scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, attn};
}

// ----------------------------------------------------------------------------
// row softmax (+ backward): one block per row, fp32
// ----------------------------------------------------------------------------
// In place allowed (y may alias x: an element is read, then written, by the same thread).
// The scaled score is rounded (__fmul_rn) each time it is formed: contracted into an FMA with the
// `- mx` it would be the exact product, up to half an ulp above the max (e^16 at logits ~3e8).
__global__ void row_softmax_kernel(const float* x, float* y, int64_t rows, int64_t n, float scale) {
  __shared__ float red[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* xr = x + r * n;
    float* yr = y + r * n;
    float mx = -INFINITY;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) mx = fmaxf(mx, __fmul_rn(scale, xr[j]));
    mx = block_reduce<true>(mx, red);
    float sum = 0.f;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) sum += rf_exp(__fmul_rn(scale, xr[j]) - mx);
    sum = block_reduce<false>(sum, red);
    const float inv = 1.f / sum;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
      yr[j] = softmax_residual(__fmul_rn(scale, xr[j]), mx, inv, 0.f, 0.f);
  }
}

// gx = scale * y (g - sum(g y)), in place allowed (gx may alias y or g).
__global__ void row_softmax_bwd_kernel(const float* y, const float* g, float* gx, int64_t rows, int64_t n,
                                       float scale) {
  __shared__ float red[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* yr = y + r * n;
    const float* gr = g + r * n;
    float* o = gx + r * n;
    float dot = 0.f;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) dot += yr[j] * gr[j];
    dot = block_reduce<false>(dot, red);
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) o[j] = scale * softmax_grad(yr[j], gr[j], dot);
  }
}

void launch_row_softmax(const Tensor& x, Tensor& y, float scale) {
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  if (rows == 0) return;
  RF_LAUNCH(row_softmax_kernel, grid_for(rows), 256, 0, c10::cuda::getCurrentCUDAStream())(
      x.data_ptr<float>(), y.data_ptr<float>(), rows, n, scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_row_softmax_bwd(const Tensor& y, const Tensor& g, Tensor& gx, float scale) {
  const int64_t n = y.size(-1), rows = n ? y.numel() / n : 0;
  if (rows == 0) return;
  RF_LAUNCH(row_softmax_bwd_kernel, grid_for(rows), 256, 0, c10::cuda::getCurrentCUDAStream())(
      y.data_ptr<float>(), g.data_ptr<float>(), gx.data_ptr<float>(), rows, n, scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor row_softmax_cuda(const Tensor& x) {
  validate_row_softmax(x);
  c10::cuda::CUDAGuard guard(x.device());
  auto xf = f32(x);
  auto y = at::empty_like(xf);
  launch_row_softmax(xf, y, 1.f);
  return y.to(x.scalar_type());
}

Tensor row_softmax_backward_cuda(const Tensor& g, const Tensor& y) {
  validate_row_softmax(y);
  validate_grad("row_softmax_backward", "grad", g, y);
  c10::cuda::CUDAGuard guard(y.device());
  auto yf = f32(y), gf = f32(g);
  auto gx = at::empty_like(yf);
  launch_row_softmax_bwd(yf, gf, gx, 1.f);
  return gx.to(y.scalar_type());
}

std::tuple<Tensor, Tensor, Tensor, Tensor> softmax_block_backward_cuda(const Tensor& gout, const Tensor& gattn,
                                                                       const Tensor& q, const Tensor& k,
                                                                       const Tensor& v, const Tensor& attn,
                                                                       double scale) {
  validate_softmax_block(q, k, v, attn, scale);
  validate_grad("softmax_block_backward", "grad_out", gout, q);
  validate_grad("softmax_block_backward", "grad_attn", gattn, attn);
  c10::cuda::CUDAGuard guard(q.device());
  // Two fp32 (B, H, N, N) maps at a time: gA, and S -> P -> gS in one buffer (the row kernels run
  // in place); the fp32 copy of attn only until gv.
  auto qf = f32(q), kf = f32(k), vf = f32(v), go = f32(gout);
  auto gv = at::matmul(f32(attn).transpose(-2, -1), go);
  auto gA = gattn.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();  // gattn + gout v^T
  gA.view({-1, gA.size(2), gA.size(3)}).baddbmm_(go.flatten(0, 1), vf.flatten(0, 1).transpose(1, 2));
  auto S = at::matmul(qf, kf.transpose(-2, -1)).contiguous();
  launch_row_softmax(S, S, (float)scale);      // P
  launch_row_softmax_bwd(S, gA, S, (float)scale);  // gS
  const Tensor& gS = S;
  auto gq = at::matmul(gS, kf), gk = at::matmul(gS.transpose(-2, -1), qf);
  const auto st = q.scalar_type();
  return {gq.to(st), gk.to(st), gv.to(st), gA.to(st)};
}

// ----------------------------------------------------------------------------
// refine (eval), forward: block per (b, tile of TR query rows), walking the columns in tiles
// of kTC. A tile needs E on TR + 2p rows, so TR > 1 divides the recomputed halo rows of the
// expansion ((TR + 2p) / TR of the work instead of 1 + 2p).
// ----------------------------------------------------------------------------

constexpr int kTC = 64;
static_assert(kThreads % kTC == 0, "whole thread-rows");

size_t refine_fwd_smem(int64_t H, int64_t d, int k, int TR) {
  const int p = k / 2;
  const Tile t{1, 0, 0, TR, kTC};
  return sizeof(float) * (buf_elems<float>(t, p, (int)H) + buf_elems<float>(t, p, 1) + buf_elems<float>(t, 0, (int)H) +
                          (kThreads / kTC) * kTC + TR * H * d);
}

template <class T>
__global__ void refine_fwd_kernel(const T* __restrict__ A, const T* __restrict__ V, RefineWF w, int64_t B, int H,
                                  int64_t N, int d, int rH, int k, int TR, bool expand, T* __restrict__ out,
                                  float* __restrict__ Rmap) {
  RF_DYN_SHARED(float, sm);
  const int p = k / 2;
  const CudaPar par = tile_par(kTC);
  const int64_t ntiles = (N + TR - 1) / TR;
  const int hd = H * d;
  for (int64_t blk = blockIdx.x; blk < B * ntiles; blk += gridDim.x) {
    const int64_t b = blk / ntiles, r0 = blk % ntiles * TR;
    const Tile t0{N, r0, 0, TR, kTC};
    float* ab = sm;
    float* eb = ab + buf_elems<float>(t0, p, H);
    float* pb = eb + buf_elems<float>(t0, p, 1);
    float* drow = pb + buf_elems<float>(t0, 0, H) + par.ty * kTC;  // one scratch row per thread-row
    float* oacc = pb + buf_elems<float>(t0, 0, H) + par.nty * kTC;  // (TR, H, d)
    for (int j = threadIdx.x; j < TR * hd; j += blockDim.x) oacc[j] = 0.f;
    for (int64_t c0 = 0; c0 < N; c0 += kTC) {
      const Tile t{N, r0, c0, TR, kTC};
      auto Ab = make_buf(ab, t, p), Eb = make_buf(eb, t, p), Pb = make_buf(pb, t, 0);
      load_tile(par, A + b * H * N * N, H, t, Ab);
      for (int j = threadIdx.x; j < H * TR * kTC; j += blockDim.x) pb[j] = 0.f;
      __syncthreads();
      for (int c = 0; c < rH; ++c) {
        if (expand) {
          expand_channel(par, c, H, w.w_exp, w.b_exp, t, Ab, Eb, p);
          __syncthreads();
          dw_pro_channel(par, c, H, rH, w.w_dw, w.b_dw, w.w_pro, k, t, Eb, 0, Pb, drow);
          __syncthreads();
        } else {
          dw_pro_channel(par, c, H, rH, w.w_dw, w.b_dw, w.w_pro, k, t, Ab, c, Pb, drow);
        }
      }
      finish_r(par, H, w.b_pro, w.alpha, w.beta, t, Ab, Pb);
      __syncthreads();
      if (Rmap) store_tile(par, Rmap + b * H * N * N, H, t, Pb);
      if (out) {
        const int64_t ncol = min((int64_t)kTC, N - c0);
        for (int j = threadIdx.x; j < TR * hd; j += blockDim.x) {
          const int y = j / hd, h = j % hd / d, dd = j % d;
          if (r0 + y >= N) continue;
          const T* vb = V + ((b * H + h) * N + c0) * d + dd;
          const float* r = Pb.row(h, y);
          float acc = 0.f;
          for (int64_t x = 0; x < ncol; ++x) acc += r[x] * static_cast<float>(vb[x * d]);
          oacc[j] += acc;
        }
      }
      __syncthreads();
    }
    if (out)
      for (int j = threadIdx.x; j < TR * hd; j += blockDim.x) {
        const int y = j / hd, h = j % hd / d, dd = j % d;
        if (r0 + y < N) out[((b * H + h) * N + r0 + y) * d + dd] = static_cast<T>(oacc[j]);
      }
    __syncthreads();
  }
}

struct RefineCuda {
  Tensor attn, v, w_exp, b_exp, w_dw, b_dw, w_pro, b_pro, alpha, beta;
  int64_t B, H, N, d, rH, k;
  bool expand;
  RefineWF wf() const {
    return {w_exp.data_ptr<float>(), b_exp.data_ptr<float>(), w_dw.data_ptr<float>(), b_dw.data_ptr<float>(),
            w_pro.data_ptr<float>(), b_pro.data_ptr<float>(), alpha.data_ptr<float>(), beta.data_ptr<float>()};
  }
  // the tensor-core kernels (refine_eval_tc.cuh, refine_eval_bwd_tc.cuh) serve this call
  bool tensor_cores() const { return refine_tc_eligible(H) && tensor_cores_for(attn.scalar_type()); }
};

// The caller validates the arguments first (validate_refine_eval), before its device guard: a bad call
// raises without touching the device (tests/test_cuda_entry_checks.py runs those checks without a GPU).
RefineCuda prep_refine_cuda(const Tensor& attn, const Tensor& v, const Tensor& w_exp, const Tensor& b_exp,
                            const Tensor& w_dw, const Tensor& b_dw, const Tensor& w_pro, const Tensor& b_pro,
                            const Tensor& alpha, const Tensor& beta, bool expand) {
  return {attn.contiguous(), v.contiguous(), f32(w_exp), f32(b_exp), f32(w_dw), f32(b_dw), f32(w_pro), f32(b_pro),
          f32(alpha), f32(beta), attn.size(0), attn.size(1), attn.size(2), v.size(3), w_dw.size(0), w_dw.size(1),
          expand};
}

void launch_refine_fwd(const RefineCuda& r, Tensor* out, Tensor* Rmap) {
  if (r.tensor_cores())
    return launch_refine_tc(r.attn, r.v, r.wf(), r.H, r.d, r.rH, r.k, r.expand, out, Rmap);
  const int TR = tile_rows("REFINER_CUDA_TILE_ROWS", 4, [&](int tr) { return refine_fwd_smem(r.H, r.d, (int)r.k, tr); });
  const size_t smem = refine_fwd_smem(r.H, r.d, (int)r.k, TR);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.attn.scalar_type(), "refine_eval_cuda", [&] {
    set_smem(refine_fwd_kernel<scalar_t>, smem, "refine_eval");
    RF_LAUNCH(refine_fwd_kernel<scalar_t>, grid_for(r.B * ((r.N + TR - 1) / TR)), kThreads, smem, stream)(
        r.attn.data_ptr<scalar_t>(), r.v.data_ptr<scalar_t>(), r.wf(), r.B, (int)r.H, r.N, (int)r.d, (int)r.rH,
        (int)r.k, TR, r.expand, out ? out->data_ptr<scalar_t>() : nullptr, Rmap ? Rmap->data_ptr<float>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

Tensor refine_eval_cuda(const Tensor& attn, const Tensor& v, const Tensor& w_exp, const Tensor& b_exp,
                        const Tensor& w_dw, const Tensor& b_dw, const Tensor& w_pro, const Tensor& b_pro,
                        const Tensor& alpha, const Tensor& beta, bool expand) {
  validate_refine_eval(attn, v, w_exp, b_exp, w_dw, b_dw, w_pro, b_pro, alpha, beta, expand);
  c10::cuda::CUDAGuard guard(attn.device());
  auto r = prep_refine_cuda(attn, v, w_exp, b_exp, w_dw, b_dw, w_pro, b_pro, alpha, beta, expand);
  auto out = at::empty_like(r.v);
  launch_refine_fwd(r, &out, nullptr);
  return out;
}

// ----------------------------------------------------------------------------
// refine (eval), backward: gR = gout v^T and gv = R^T gout by cuBLAS (through ATen), then one
// recomputing kernel over (b, tile of TR query rows) for gA and the parameter gradients (E is
// recomputed on TR + 4p rows: TR > 1 divides that halo overhead, as in the forward). The grid is capped
// at a few blocks per SM; each block walks its rows and keeps the parameter-gradient partial sums
// in shared memory (each slot owned by one thread: no atomics), writes them once, and the host
// sums the per-block partials: deterministic, and no contention on a few hundred addresses.
// ----------------------------------------------------------------------------
constexpr int kTCB = 32;

struct GradSlots {  // offsets of the weight gradients in a block's partial sums (and the host's total)
  int64_t wdw, bdw, wpro, wexp, bexp, alpha, beta, n;
  __host__ __device__ GradSlots(int64_t H, int64_t rH, int64_t k)
      : wdw(0), bdw(rH * k * k), wpro(bdw + rH), wexp(wpro + H * rH), bexp(wexp + rH * H), alpha(bexp + rH),
        beta(alpha + H), n(beta + H) {}
};

static_assert(kThreads % kTCB == 0, "whole thread-rows");

// Threads per channel item in the backward's reductions: the block's threads over the items.
__host__ __device__ inline int item_slices(int nitems) { return nitems < kThreads ? kThreads / nitems : 1; }

size_t refine_bwd_smem(int64_t H, int k, bool expand, const GradSlots& sl, int TR) {
  const int p = k / 2;
  const Tile t{1, 0, 0, TR, kTCB};
  const int nitems = bwd_channel_items((int)H, k, expand);
  return sizeof(double) * nitems * item_slices(nitems) +
         sizeof(float) * (buf_elems<float>(t, 2 * p, (int)H) + buf_elems<float>(t, 2 * p, 1) +
                          buf_elems<float>(t, p, (int)H) + buf_elems<float>(t, p, 1) + 2 * buf_elems<float>(t, 0, 1) +
                          2 * buf_elems<float>(t, 0, (int)H) + sl.n);
}

template <class T>  // A in the input dtype (converted as its tiles load: no fp32 copy of the map)
__global__ void refine_bwd_kernel(const T* __restrict__ A, const float* __restrict__ GR, RefineWF w, int64_t B,
                                  int H, int64_t N, int rH, int k, int TR, bool expand, GradSlots sl,
                                  float* __restrict__ gA, float* __restrict__ gpart) {
  RF_DYN_SHARED(float, sm);
  const int p = k / 2;
  const CudaPar par = tile_par(kTCB);
  const int64_t ntiles = (N + TR - 1) / TR;
  const int kk = k * k;
  const int nitems = bwd_channel_items(H, k, expand);
  const int S = item_slices(nitems), npix = TR * kTCB, slice = (npix + S - 1) / S;
  double* ipart = reinterpret_cast<double*>(sm);  // (nitems, S) partial sums of the channel items
  float* gacc = sm + 2 * nitems * S;  // sl.n partial sums of this block; slot (c, item) always added by one thread
  for (int64_t j = threadIdx.x; j < sl.n; j += blockDim.x) gacc[j] = 0.f;
  for (int64_t blk = blockIdx.x; blk < B * ntiles; blk += gridDim.x) {
    const int64_t b = blk / ntiles, r0 = blk % ntiles * TR;
    for (int64_t c0 = 0; c0 < N; c0 += kTCB) {
      const Tile t{N, r0, c0, TR, kTCB};
      float* q = gacc + sl.n;
      auto Ab = make_buf(q, t, 2 * p);   q += buf_elems<float>(t, 2 * p, H);
      auto Eb = make_buf(q, t, 2 * p);   q += buf_elems<float>(t, 2 * p, 1);
      auto GRb = make_buf(q, t, p);      q += buf_elems<float>(t, p, H);
      auto GYb = make_buf(q, t, p);      q += buf_elems<float>(t, p, 1);
      auto Db = make_buf(q, t, 0);       q += buf_elems<float>(t, 0, 1);
      auto GUb = make_buf(q, t, 0);      q += buf_elems<float>(t, 0, 1);
      auto Pb = make_buf(q, t, 0);       q += buf_elems<float>(t, 0, H);
      auto GAb = make_buf(q, t, 0);
      load_tile(par, A + b * H * N * N, H, t, Ab);
      load_tile(par, GR + b * H * N * N, H, t, GRb);
      for (int j = threadIdx.x; j < H * TR * kTCB; j += blockDim.x) Pb.p[j] = GAb.p[j] = 0.f;
      for (int j = threadIdx.x; j < TR * kTCB; j += blockDim.x) GUb.p[j] = 0.f;
      __syncthreads();
      for (int c = 0; c < rH; ++c) {
        const Buf<float>& Ec = expand ? Eb : Ab;
        const int ce = expand ? 0 : c;
        if (expand) {
          expand_channel(par, c, H, w.w_exp, w.b_exp, t, Ab, Eb, 2 * p);
          __syncthreads();
        }
        bwd_dy_channel(par, c, H, rH, w.w_dw, w.b_dw, w.w_pro, w.alpha, k, t, Ec, ce, GRb, GYb, Db, Pb);
        __syncthreads();
        bwd_de_channel(par, c, H, w.w_exp, w.b_exp, w.w_dw, k, expand, t, Ab, GYb, GUb, GAb);
        __syncthreads();
        // an item's pixels in S slices, one thread each (S = threads per item: every thread busy
        // when there are fewer items than threads); centre pixels outside the map hold zeros in
        // GY / D / GU, so they add nothing
        for (int j = threadIdx.x; j < nitems * S; j += blockDim.x) {
          const int s = j % S, q0 = s * slice;
          ipart[j] = bwd_channel_item(j / S, H, w.alpha, k, t, Ab, Ec, ce, GRb, GYb, Db, GUb, q0,
                                      min(npix, q0 + slice));
        }
        __syncthreads();
        for (int it = threadIdx.x; it < nitems; it += blockDim.x) {
          double sum = 0;  // the slices in order: deterministic
          for (int s = 0; s < S; ++s) sum += ipart[it * S + s];
          const float val = (float)sum;
          int64_t o;
          if (it < kk) o = sl.wdw + (int64_t)c * kk + it;
          else if (it == kk) o = sl.bdw + c;
          else if (it < kk + 1 + H) o = sl.wpro + (int64_t)(it - kk - 1) * rH + c;
          else if (it < kk + 1 + 2 * H) o = sl.wexp + (int64_t)c * H + (it - kk - 1 - H);
          else o = sl.bexp + c;
          gacc[o] += val;
        }
        __syncthreads();
      }
      bwd_residual(par, H, w.alpha, t, GRb, GAb);
      __syncthreads();
      for (int it = threadIdx.x; it < 2 * H; it += blockDim.x)
        gacc[sl.alpha + it] += bwd_head_item(it, H, w.b_pro, t, Ab, GRb, Pb);
      store_tile(par, gA + b * H * N * N, H, t, GAb);
      __syncthreads();
    }
  }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < sl.n; j += blockDim.x) gpart[blockIdx.x * sl.n + j] = gacc[j];
}

// The CUDA-core gradient kernel: gA, and the weight gradients laid out by sl.
Tensor refine_bwd_cuda_cores(const RefineCuda& r, const Tensor& gR, const GradSlots& sl, Tensor& gA) {
  const int64_t B = r.B, H = r.H, N = r.N, rH = r.rH, k = r.k;
  const bool expand = r.expand;
  const int TR =
      tile_rows("REFINER_CUDA_TILE_ROWS", 4, [&](int tr) { return refine_bwd_smem(H, (int)k, expand, sl, tr); });
  const size_t smem = refine_bwd_smem(H, (int)k, expand, sl, TR);
  const int64_t blocks = std::min<int64_t>(B * ((N + TR - 1) / TR), 8LL * device_attr(cudaDevAttrMultiProcessorCount));
  auto gpart = at::empty({blocks, sl.n}, gR.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.attn.scalar_type(), "refine_eval_backward_cuda", [&] {
    set_smem(refine_bwd_kernel<scalar_t>, smem, "refine_eval_backward");
    RF_LAUNCH(refine_bwd_kernel<scalar_t>, (unsigned)blocks, kThreads, smem, c10::cuda::getCurrentCUDAStream())(
        r.attn.data_ptr<scalar_t>(), gR.data_ptr<float>(), r.wf(), B, (int)H, N, (int)rH, (int)k, TR, expand, sl,
        gA.data_ptr<float>(), gpart.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gpart.sum(0);
}

// The tensor-core kernel's sums (TcGradSlots) in sl's layout: gw_pro = alpha S, galpha = sum gR A +
// sum_c w_pro S + b_pro sum gR (= sum gR (A + P + b_pro), P = w_pro D), gbeta = sum gR.
Tensor grads_from_tc(const RefineCuda& r, const Tensor& t, const GradSlots& sl) {
  const int64_t H = r.H, rH = r.rH, kk = r.k * r.k;
  const TcGradSlots tl(H, rH, (int)r.k);
  auto S = t.narrow(0, tl.S, H * rH).view({H, rH});
  auto sum_gr = t.narrow(0, tl.gr, H);
  auto galpha = t.narrow(0, tl.ga, H) + (r.w_pro * S).sum(1) + r.b_pro * sum_gr;
  auto g = at::cat({t.narrow(0, tl.wdw, rH * kk), t.narrow(0, tl.bdw, rH), (r.alpha.unsqueeze(1) * S).flatten(),
                    t.narrow(0, tl.gexp, rH * H), t.narrow(0, tl.bexp, rH), galpha, sum_gr});
  TORCH_INTERNAL_ASSERT(g.numel() == sl.n);  // the pieces above in sl's order: wdw, bdw, wpro, wexp, bexp, alpha, beta
  return g;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> refine_eval_backward_cuda(
    const Tensor& gout, const Tensor& attn, const Tensor& v, const Tensor& w_exp, const Tensor& b_exp,
    const Tensor& w_dw, const Tensor& b_dw, const Tensor& w_pro, const Tensor& b_pro, const Tensor& alpha,
    const Tensor& beta, bool expand) {
  validate_refine_eval(attn, v, w_exp, b_exp, w_dw, b_dw, w_pro, b_pro, alpha, beta, expand);
  validate_grad("refine_eval_backward", "grad_out", gout, v);
  c10::cuda::CUDAGuard guard(attn.device());
  auto r = prep_refine_cuda(attn, v, w_exp, b_exp, w_dw, b_dw, w_pro, b_pro, alpha, beta, expand);
  const int64_t B = r.B, H = r.H, N = r.N, rH = r.rH, k = r.k;
  auto R = at::empty({B, H, N, N}, r.attn.options().dtype(at::kFloat));
  launch_refine_fwd(r, nullptr, &R);
  auto go = f32(gout), vf = f32(r.v);
  auto gR = at::matmul(go, vf.transpose(-2, -1)).contiguous();
  auto gv = at::matmul(R.transpose(-2, -1), go);
  R.reset();
  const GradSlots sl(H, rH, k);
  const bool tc = r.tensor_cores();
  auto gA = at::empty({B, H, N, N}, tc ? r.attn.options() : go.options());  // the CUDA-core kernel's: fp32
  const Tensor gpar = tc ? grads_from_tc(r, launch_refine_bwd_tc(r.attn, gR, r.wf(), H, rH, k, expand, gA), sl)
                         : refine_bwd_cuda_cores(r, gR, sl, gA);
  const auto st = attn.scalar_type();
  auto gbeta = gpar.narrow(0, sl.beta, H);
  auto own = [&](const Tensor& t) { return t.to(st).clone(at::MemoryFormat::Contiguous); };  // outputs must not alias
  return {gA.to(st),
          gv.to(st),
          own(gpar.narrow(0, sl.wexp, rH * H).view({rH, H})),
          own(gpar.narrow(0, sl.bexp, rH)),
          own(gpar.narrow(0, sl.wdw, rH * k * k).view({rH, k, k})),
          own(gpar.narrow(0, sl.bdw, rH)),
          own(gpar.narrow(0, sl.wpro, H * rH).view({H, rH})),
          own(gbeta * r.alpha),
          own(gpar.narrow(0, sl.alpha, H)),
          own(gbeta)};
}

// ----------------------------------------------------------------------------
// depthwise conv building block
// ----------------------------------------------------------------------------
__global__ void dwconv_kernel(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y,
                              int64_t total, int64_t C, int64_t N, int64_t M, int k, bool transpose) {
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t plane = idx / (N * M), rem = idx % (N * M);
    const int64_t c = plane % C;
    y[idx] = dw_global(x + plane * N * M, N, M, w + c * k * k, k, rem / M, rem % M, transpose);
  }
}

// grid.x = C * k * k (one block per weight), reduces over batch and pixels.
__global__ void dwconv_wgrad_kernel(const float* __restrict__ g, const float* __restrict__ x, float* __restrict__ gw,
                                    int64_t B, int64_t C, int64_t N, int64_t M, int k) {
  __shared__ float red[32];
  const int64_t item = blockIdx.x, c = item / (k * k);
  const int tap = (int)(item % (k * k));
  float acc = 0.f;
  for (int64_t b = 0; b < B; ++b) {
    const float* gp = g + (b * C + c) * N * M;
    const float* xp = x + (b * C + c) * N * M;
    for (int64_t pix = threadIdx.x; pix < N * M; pix += blockDim.x)
      acc += dw_wgrad_term(gp, xp, N, M, k, tap, pix / M, pix % M);
  }
  acc = block_reduce<false>(acc, red);
  if (threadIdx.x == 0) gw[item] = acc;
}

void launch_dwconv(const Tensor& x, const Tensor& w, Tensor& y, bool transpose) {
  const int64_t total = x.numel();
  if (total == 0) return;
  const int64_t blocks = std::min<int64_t>((total + 255) / 256, 1 << 20);
  RF_LAUNCH(dwconv_kernel, (unsigned)blocks, 256, 0, c10::cuda::getCurrentCUDAStream())(
      x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), total, x.size(1), x.size(2), x.size(3),
      (int)w.size(1), transpose);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor attn_dwconv_cuda(const Tensor& x, const Tensor& w) {
  validate_attn_dwconv(x, w);
  c10::cuda::CUDAGuard guard(x.device());
  auto xf = f32(x), wf = f32(w);
  auto y = at::empty_like(xf);
  launch_dwconv(xf, wf, y, false);
  return y.to(x.scalar_type());
}

std::tuple<Tensor, Tensor> attn_dwconv_backward_cuda(const Tensor& g, const Tensor& x, const Tensor& w) {
  validate_attn_dwconv(x, w);
  validate_grad("attn_dwconv_backward", "grad", g, x);
  c10::cuda::CUDAGuard guard(x.device());
  auto xf = f32(x), wf = f32(w), gf = f32(g);
  auto gx = at::empty_like(xf);
  launch_dwconv(gf, wf, gx, true);
  const int64_t C = x.size(1), k = w.size(1);
  auto gw = at::empty({C, k, k}, xf.options());
  RF_LAUNCH(dwconv_wgrad_kernel, (unsigned)(C * k * k), 256, 0, c10::cuda::getCurrentCUDAStream())(
      gf.data_ptr<float>(), xf.data_ptr<float>(), gw.data_ptr<float>(), x.size(0), C, x.size(2), x.size(3), (int)k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {gx.to(x.scalar_type()), gw.to(w.scalar_type())};
}

}  // namespace
}  // namespace refiner

TORCH_LIBRARY_IMPL(RF_CUDA_LIB, RF_CUDA_KEY, m) {
  m.impl("softmax_block", &refiner::softmax_block_cuda);
  m.impl("softmax_block_backward", &refiner::softmax_block_backward_cuda);
  m.impl("refine_eval", &refiner::refine_eval_cuda);
  m.impl("refine_eval_backward", &refiner::refine_eval_backward_cuda);
  m.impl("attn_dwconv", &refiner::attn_dwconv_cuda);
  m.impl("attn_dwconv_backward", &refiner::attn_dwconv_backward_cuda);
  m.impl("row_softmax", &refiner::row_softmax_cuda);
  m.impl("row_softmax_backward", &refiner::row_softmax_backward_cuda);
}
