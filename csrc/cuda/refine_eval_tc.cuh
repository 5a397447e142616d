// refine (eval), forward on the tensor cores (H <= 16, sm_80+): the head mixes and R v as TF32
// mma.sync products (mma.cuh), the k x k stencil on the CUDA cores. Used by ops_cuda.cu (fp64 maps
// keep its refine_fwd_kernel, IEEE).
// fp16/bf16 outputs: one TF32 product per step. It loses nothing on the inputs (fp16 and bf16
// values are TF32 values); the weights, E, D and R are rounded to nearest (tf32_rna).
// fp32 outputs, and the fp32 R map the backward recomputes (Rmap): 3xTF32 (kSplit: every operand
// split hi + lo, TfFrag), about fp32's accuracy.
//
// A block (8 warps) owns a tile of kTcRows query rows x kTcCols key columns of one image's maps,
// walking the key columns; a tile's maps with their stencil halo ("halo plane": (kTcRows + 2p) x
// (kTcCols + 2p) pixels, flattened, padded to PLP) sit in shared memory. Per column tile:
//  1. A's halo planes, fp32 (H of them; the fragments read 0 for the padded heads);
//  2. per chunk of 16 expanded channels: E = relu6(W_exp A + b_exp) on the halo planes (M = 16
//     channels, N = 8 pixels, K = heads), 0 outside the map (the stencil's zero padding);
//  3. D = relu6(dw_k(E) + b_dw) computed by each lane straight into its B fragments (channels
//     t, t + 4 of 8 at pixel g of a group of 8 columns; a lane's 4 groups are 4 consecutive rows of
//     one column, so their K x K stencils share (K + 3) K loads), and P += W_pro D (M = 16 heads)
//     into accumulators that live across the chunks;
//  4. R = alpha (A + P + b_pro) + beta -> shared memory (H x rows x cols, rows kTcLdr apart), and
//     to the R map when one is asked for (then without steps 5 and out);
//  5. out^T += V^T R^T per head (M = 16 rows of d, N = the tile's 8 rows, K = columns), added to
//     an fp32 (H, rows, d) accumulator in shared memory that lives across the column tiles.
// No (B, rH, N, N) map exists anywhere; E of one chunk is the only expanded state (shared memory).
#pragma once

#include "cuda/tc_tiles.cuh"

namespace refiner {
namespace {

struct RefineWF {  // folded refine weights, fp32 device pointers
  const float *w_exp, *b_exp, *w_dw, *b_dw, *w_pro, *b_pro, *alpha, *beta;
};

constexpr int kTcLdr = kTcCols + 4;  // = odd4(kTcCols): R's rows, read as B fragments in step 5

inline bool refine_tc_eligible(int64_t H) { return H <= kTcMaxHeads; }

size_t refine_fwd_tc_smem(int64_t H, int64_t d, int k) {
  const TcPlane pl(k, (int)d, k / 2);
  return sizeof(float) * ((H + kTcMaxHeads) * pl.PLP + H * kTcRows * (kTcLdr + pl.ldo));  // A, E; R, out
}

// E = relu6(W_exp A + b_exp) of channels cb .. cb + 15 (M = 16 channels, N = 8 pixels, K = heads) on
// halo planes of `halo` pixels: ab holds H planes of A, eb gets 16 planes of E, both PLP apart and ld
// wide; 0 outside the map and past PL (the stencil pads E with zeros). Shared by the forward and the
// backward (halo p and 2p).
template <bool kSplit>
__device__ void tc_expand_chunk(const float* ab, float* eb, int PL, int PLP, int ld, int halo, const RefineWF& w,
                                int cb, int H, int rH, int64_t N, int64_t r0, int64_t c0) {
  tc_mix_chunk<kSplit>(
      ab, H, PLP, [&](int m, int h) { return cb + m < rH && h < H ? w.w_exp[(cb + m) * H + h] : 0.f; },
      [&](int m, int q, float u) {
        const bool in = cb + m < rH && q < PL && tc_inmap(N, r0 + q / ld - halo, c0 + q % ld - halo);
        eb[m * PLP + q] = in ? relu6(u + w.b_exp[cb + m]) : 0.f;
      });
}

template <class T, int K, bool kSplit>
__global__ void __launch_bounds__(kTcThreads)
    refine_fwd_tc_kernel(const T* __restrict__ A, const T* __restrict__ V, RefineWF w, int64_t B, int H, int64_t N,
                         int d, int rH, bool expand, T* __restrict__ out, float* __restrict__ Rmap) {
  RF_DYN_SHARED(float, sm);
  using Frag4 = TfFrag<kSplit, 4>;
  using Frag2 = TfFrag<kSplit, 2>;
  constexpr int p = K / 2;
  const TcPlane pl(K, d, K / 2);
  const int ld = pl.ld, PLP = pl.PLP, ldo = pl.ldo;
  float* ab = sm;                             // (H, PLP)
  float* eb = ab + H * PLP;                   // (16, PLP): one chunk of E
  float* rb = eb + kTcMaxHeads * PLP;         // (H, kTcRows, kTcLdr)
  float* ob = rb + H * kTcRows * kTcLdr;      // (H, kTcRows, ldo)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const MmaLane L{lane >> 2, lane & 3};
  // this lane's pixels in steps 3-4: rows y0 + i (i < kTcGroups), column group xb
  const int y0 = warp / (kTcCols / 8) * kTcGroups, xb = warp % (kTcCols / 8) * 8;
  const int mtiles = (d + 15) / 16, nout = H * mtiles;
  const int64_t rtiles = (N + kTcRows - 1) / kTcRows;
  for (int64_t blk = blockIdx.x; blk < B * rtiles; blk += gridDim.x) {
    const int64_t b = blk / rtiles, r0 = blk % rtiles * kTcRows;
    if (out)
      for (int j = threadIdx.x; j < H * kTcRows * ldo; j += blockDim.x) ob[j] = 0.f;
    for (int64_t c0 = 0; c0 < N; c0 += kTcCols) {
      // 1. A's halo planes (0 outside the map and past PL)
      tc_load_planes(ab, A + b * H * N * N, H, N, r0 - p, c0 - p, ld, pl.PL, PLP);
      __syncthreads();
      float pacc[kTcGroups][4] = {};
      for (int cb = 0; cb < rH; cb += 16) {
        const float* src = ab;  // the stencil's input planes (no expansion: E = A, rH = H <= 16)
        if (expand) {  // 2. E of channels cb .. cb + 15 on the halo planes
          tc_expand_chunk<kSplit>(ab, eb, pl.PL, PLP, ld, p, w, cb, H, rH, N, r0, c0);
          __syncthreads();
          src = eb;
        }
        // 3. D of channel cb + ks 8 + t + 4 r at pixel (y0 + i, xb + g): B fragment r of step (i, ks)
        Frag2 dfrag[kTcGroups][2];
        RF_UNROLL
        for (int ks = 0; ks < 2; ++ks)
          RF_UNROLL
          for (int r = 0; r < 2; ++r) {
            const int cl = ks * 8 + L.t + 4 * r, c = cb + cl;
            float dv[kTcGroups] = {};
            if (c < rH) {
              const float* wk = w.w_dw + (int64_t)c * K * K;
              const float* e = src + cl * PLP + y0 * ld + xb + L.g;  // top-left tap of row y0's stencil
              RF_UNROLL
              for (int j2 = 0; j2 < K; ++j2) {
                float col[kTcGroups + K - 1];  // tap column j2 of the 4 stencils
                RF_UNROLL
                for (int u = 0; u < kTcGroups + K - 1; ++u) col[u] = e[u * ld + j2];
                RF_UNROLL
                for (int i2 = 0; i2 < K; ++i2) {
                  const float wij = wk[i2 * K + j2];
                  RF_UNROLL
                  for (int i = 0; i < kTcGroups; ++i) dv[i] += wij * col[i + i2];
                }
              }
              const float bias = w.b_dw[c];
              RF_UNROLL
              for (int i = 0; i < kTcGroups; ++i)
                dv[i] = tc_inmap(N, r0 + y0 + i, c0 + xb + L.g) ? relu6(dv[i] + bias) : 0.f;
            }
            RF_UNROLL
            for (int i = 0; i < kTcGroups; ++i) dfrag[i][ks].set(r, dv[i]);
          }
        Frag4 wp[2];
        RF_UNROLL
        for (int ks = 0; ks < 2; ++ks)
          RF_UNROLL
          for (int r = 0; r < 4; ++r) {
            const int h = L.g + 8 * (r % 2), c = cb + ks * 8 + L.t + 4 * (r / 2);
            wp[ks].set(r, h < H && c < rH ? w.w_pro[h * rH + c] : 0.f);
          }
        RF_UNROLL
        for (int i = 0; i < kTcGroups; ++i)
          RF_UNROLL
          for (int ks = 0; ks < 2; ++ks) mma_frag(pacc[i], wp[ks], dfrag[i][ks]);
        __syncthreads();  // the next chunk overwrites eb
      }
      // 4. R on the centre (0 outside the map): accumulator r of group i is head g + 8 (r / 2), pixel
      // (y0 + i, xb + 2 t + r % 2)
      RF_UNROLL
      for (int i = 0; i < kTcGroups; ++i)
        RF_UNROLL
        for (int r = 0; r < 4; ++r) {
          const int h = L.g + 8 * (r / 2), y = y0 + i, x = xb + 2 * L.t + r % 2;
          if (h >= H) continue;
          const float a = ab[h * PLP + (y + p) * ld + x + p];
          rb[(h * kTcRows + y) * kTcLdr + x] =
              tc_inmap(N, r0 + y, c0 + x) ? w.alpha[h] * (a + pacc[i][r] + w.b_pro[h]) + w.beta[h] : 0.f;
        }
      __syncthreads();
      if (Rmap)
        for (int j = threadIdx.x; j < H * kTcRows * kTcCols; j += blockDim.x) {
          const int h = j / (kTcRows * kTcCols), y = j / kTcCols % kTcRows, x = j % kTcCols;
          if (tc_inmap(N, r0 + y, c0 + x))
            Rmap[((b * H + h) * N + r0 + y) * N + c0 + x] = rb[(h * kTcRows + y) * kTcLdr + x];
        }
      // 5. out^T (16 rows of d x 8 query rows) += V^T (.. x 32 columns) R^T, per (head, 16 rows of d);
      // accumulator r: row m0 + g + 8 (r / 2) of d, query row 2 t + r % 2 (one lane owns each ob word)
      for (int item = warp; out && item < nout; item += kTcWarps) {
        const int h = item / mtiles, m0 = item % mtiles * 16;
        const T* vb = V + ((b * H + h) * N + c0) * d;
        float acc[4] = {};
        RF_UNROLL
        for (int ks = 0; ks < kTcCols / 8; ++ks) {
          Frag4 af;
          Frag2 bf;
          RF_UNROLL
          for (int r = 0; r < 4; ++r) {
            const int dd = m0 + L.g + 8 * (r % 2), x = ks * 8 + L.t + 4 * (r / 2);
            af.set(r, dd < d && c0 + x < N ? static_cast<float>(vb[(int64_t)x * d + dd]) : 0.f);
          }
          RF_UNROLL
          for (int r = 0; r < 2; ++r) bf.set(r, rb[(h * kTcRows + L.g) * kTcLdr + ks * 8 + L.t + 4 * r]);
          mma_frag(acc, af, bf);
        }
        RF_UNROLL
        for (int r = 0; r < 4; ++r) ob[(h * kTcRows + 2 * L.t + r % 2) * ldo + m0 + L.g + 8 * (r / 2)] += acc[r];
      }
      __syncthreads();  // the next column tile overwrites ab and rb
    }
    for (int j = threadIdx.x; out && j < H * kTcRows * d; j += blockDim.x) {
      const int h = j / (kTcRows * d), y = j / d % kTcRows, dd = j % d;
      if (r0 + y < N) out[((b * H + h) * N + r0 + y) * d + dd] = static_cast<T>(ob[(h * kTcRows + y) * ldo + dd]);
    }
    __syncthreads();  // ob is cleared for the next row tile
  }
}

template <class T, int K>
void launch_refine_tc_k(const Tensor& A, const Tensor& V, const RefineWF& w, int64_t H, int64_t d, int64_t rH,
                        bool expand, Tensor* out, Tensor* Rmap) {
  const int64_t B = A.size(0), N = A.size(2);
  const size_t smem = refine_fwd_tc_smem(H, d, K);
  auto* kernel = refine_fwd_tc_kernel<T, K, true>;
  if constexpr (!std::is_same<T, float>::value)
    if (!Rmap) kernel = refine_fwd_tc_kernel<T, K, false>;
  set_smem(kernel, smem, "refine_eval");
  RF_LAUNCH(kernel, grid_for(B * ((N + kTcRows - 1) / kTcRows)), kTcThreads, smem, c10::cuda::getCurrentCUDAStream())(
      A.data_ptr<T>(), V.data_ptr<T>(), w, B, (int)H, N, (int)d, (int)rH, expand,
      out ? out->data_ptr<T>() : nullptr, Rmap ? Rmap->data_ptr<float>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The tensor-core refine forward: the output (3xTF32 for fp32) or the fp32 R map (3xTF32 for every
// input type). A (B, H, N, N) and V (B, H, N, d) contiguous; the caller checks refine_tc_eligible
// and tensor_cores_for.
void launch_refine_tc(const Tensor& A, const Tensor& V, const RefineWF& w, int64_t H, int64_t d, int64_t rH,
                      int64_t k, bool expand, Tensor* out, Tensor* Rmap) {
  RF_DISPATCH_TC(A.scalar_type(), "refine_tc", [&] {
    with_kernel_size(k, [&](auto K) { launch_refine_tc_k<scalar_t, K.value>(A, V, w, H, d, rH, expand, out, Rmap); });
  });
}

}  // namespace
}  // namespace refiner
