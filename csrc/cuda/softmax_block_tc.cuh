// softmax block, forward on the tensor cores (sm_80+): q k^T and attn @ v as TF32 mma.sync products
// (mma.cuh), the softmax as in ops_cuda.cu's softmax_block_fwd_kernel, which serves fp64.
// fp16/bf16: one TF32 product per step, which loses nothing (the inputs and the stored, rounded
// attn are fp16/bf16 values, exact in TF32; fp32 accumulation). fp32: 3xTF32 (TfFrag), about
// fp32's accuracy.
//
// A block (8 warps) owns 16 query rows (the m of every product) of one (batch, head):
//  1. Q (16 x d, zero-padded to a multiple of 8 columns) into shared memory;
//  2. per tile of kSbTcKeys keys: S = Q K^T * scale, warp w taking keys 8w .. 8w + 7 (K = d);
//  3. softmax (+ scale * prev) of each row by one warp; attn stored, and its rounded values kept;
//  4. per key tile: out += attn V (N = 8 columns of d per warp item, K = the tile's keys).
#pragma once

#include "cuda/cuda_common.cuh"

namespace refiner {
namespace {

constexpr int kSbTcRows = 16;
constexpr int kSbTcWarps = 8;
constexpr int kSbTcKeys = 8 * kSbTcWarps;  // keys per tile: a warp per 8 keys in q k^T
constexpr int kSbTcMaxItems = 2;  // 8-column groups of d per warp: 128 / 8 / 8

struct SbTcGeom {
  int dp, ldq, ldv, lds;
  __host__ __device__ SbTcGeom(int d, int64_t N) : dp((d + 7) / 8 * 8), ldq(odd4(dp)), ldv(odd8(dp)), lds(odd4(N)) {}
  __host__ __device__ int kv_stride() const { return ldq > ldv ? ldq : ldv; }
};

size_t softmax_block_tc_smem(int64_t N, int64_t d) {  // Q, a K/V tile, the scores
  const SbTcGeom g((int)d, N);
  return sizeof(float) * ((size_t)kSbTcRows * g.ldq + (size_t)kSbTcKeys * g.kv_stride() + (size_t)kSbTcRows * g.lds);
}

// Keys [j0, j0 + nk) of one head's (N, d) K or V into kv (rows ld apart), zero in the padding
// (rows nk .. kSbTcKeys, columns d .. dp), between two barriers.
template <class T>
__device__ void stage_keys_padded(float* kv, const T* src, int64_t j0, int nk, int d, int dp, int ld) {
  __syncthreads();
  for (int j = threadIdx.x; j < kSbTcKeys * dp; j += blockDim.x) {
    const int key = j / dp, c = j % dp;
    kv[key * ld + c] = key < nk && c < d ? static_cast<float>(src[(j0 + key) * d + c]) : 0.f;
  }
  __syncthreads();
}

template <class T>
__global__ void __launch_bounds__(32 * kSbTcWarps)
    softmax_block_fwd_tc_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                const T* __restrict__ prev, T* __restrict__ out, T* __restrict__ attn, int64_t BH,
                                int64_t N, int d, float scale) {
  RF_DYN_SHARED(float, sm);
  constexpr bool kSplit = std::is_same<T, float>::value;
  const SbTcGeom geo(d, N);
  const int dp = geo.dp;
  float* qs = sm;                            // (16, ldq)
  float* kv = qs + kSbTcRows * geo.ldq;      // (kSbTcKeys, ldq or ldv)
  float* sc = kv + kSbTcKeys * geo.kv_stride();  // (16, lds): scores, then the stored attn values
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const MmaLane L{lane >> 2, lane & 3};
  const int64_t ntiles = (N + kSbTcRows - 1) / kSbTcRows;
  for (int64_t blk = blockIdx.x; blk < BH * ntiles; blk += gridDim.x) {
    const int64_t bh = blk / ntiles, r0 = blk % ntiles * kSbTcRows;
    const int nq = (int)min((int64_t)kSbTcRows, N - r0);
    for (int j = threadIdx.x; j < kSbTcRows * dp; j += blockDim.x) {  // rows past nq are 0: finite scores
      const int r = j / dp, c = j % dp;
      qs[r * geo.ldq + c] = r < nq && c < d ? static_cast<float>(q[(bh * N + r0 + r) * d + c]) : 0.f;
    }
    // 2. scores; accumulator r: row g + 8 (r / 2), key 8 warp + 2 t + r % 2
    for (int64_t j0 = 0; j0 < N; j0 += kSbTcKeys) {
      const int nk = (int)min((int64_t)kSbTcKeys, N - j0);
      stage_keys_padded(kv, k + bh * N * d, j0, nk, d, dp, geo.ldq);
      float acc[4] = {};
      for (int ks = 0; ks < dp / 8; ++ks) {
        TfFrag<kSplit, 4> af;
        TfFrag<kSplit, 2> bf;
        RF_UNROLL
        for (int r = 0; r < 4; ++r) af.set(r, qs[(L.g + 8 * (r % 2)) * geo.ldq + ks * 8 + L.t + 4 * (r / 2)]);
        RF_UNROLL
        for (int r = 0; r < 2; ++r) bf.set(r, kv[(8 * warp + L.g) * geo.ldq + ks * 8 + L.t + 4 * r]);
        mma_frag(acc, af, bf);
      }
      RF_UNROLL
      for (int r = 0; r < 4; ++r) {
        const int key = 8 * warp + 2 * L.t + r % 2;
        if (key < nk) sc[(L.g + 8 * (r / 2)) * geo.lds + j0 + key] = acc[r] * scale;
      }
    }
    __syncthreads();
    // 3. softmax (+ scale * prev) of row r by warp r % 8
    for (int r = warp; r < nq; r += kSbTcWarps) {
      const int64_t grow = (bh * N + r0 + r) * N;
      softmax_row_store(sc + r * geo.lds, N, prev ? prev + grow : nullptr, attn + grow, scale);
    }
    // 4. out = attn @ v; item it of a warp: columns 8 (warp + 8 it) .. + 7 of d; accumulator r: row
    // g + 8 (r / 2), column 2 t + r % 2 of the group
    float oacc[kSbTcMaxItems][4] = {};
    for (int64_t j0 = 0; j0 < N; j0 += kSbTcKeys) {
      const int nk = (int)min((int64_t)kSbTcKeys, N - j0);
      stage_keys_padded(kv, v + bh * N * d, j0, nk, d, dp, geo.ldv);  // its first barrier orders step 3
      RF_UNROLL
      for (int it = 0; it < kSbTcMaxItems; ++it) {
        const int n0 = 8 * (warp + kSbTcWarps * it);
        if (n0 >= dp) continue;  // warp-uniform
        for (int ks = 0; ks * 8 < nk; ++ks) {
          TfFrag<kSplit, 4> af;
          TfFrag<kSplit, 2> bf;
          RF_UNROLL
          for (int r = 0; r < 4; ++r) {
            const int key = ks * 8 + L.t + 4 * (r / 2);
            af.set(r, key < nk ? sc[(L.g + 8 * (r % 2)) * geo.lds + j0 + key] : 0.f);
          }
          RF_UNROLL
          for (int r = 0; r < 2; ++r) bf.set(r, kv[(ks * 8 + L.t + 4 * r) * geo.ldv + n0 + L.g]);
          mma_frag(oacc[it], af, bf);
        }
      }
    }
    RF_UNROLL
    for (int it = 0; it < kSbTcMaxItems; ++it)
      RF_UNROLL
      for (int r = 0; r < 4; ++r) {
        const int row = L.g + 8 * (r / 2), col = 8 * (warp + kSbTcWarps * it) + 2 * L.t + r % 2;
        if (row < nq && col < d) out[(bh * N + r0 + row) * d + col] = static_cast<T>(oacc[it][r]);
      }
    __syncthreads();  // qs, kv and sc are rewritten for the next tile
  }
}

// The tensor-core forward on contiguous q, k, v (and prev); false, with nothing launched, where 16
// rows of scores do not fit in a block's shared memory (N past ~3,500: the CUDA-core kernel then).
bool launch_softmax_block_tc(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor* prev, Tensor& out,
                             Tensor& attn, double scale) {
  const int64_t BH = q.size(0) * q.size(1), N = q.size(2), d = q.size(3);
  const size_t smem = softmax_block_tc_smem(N, d);
  if (smem > (size_t)device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin)) return false;
  RF_DISPATCH_TC(q.scalar_type(), "softmax_block_cuda_tc", [&] {
    auto* kernel = softmax_block_fwd_tc_kernel<scalar_t>;
    set_smem(kernel, smem, "softmax_block");
    RF_LAUNCH(kernel, grid_for(BH * ((N + kSbTcRows - 1) / kSbTcRows)), 32 * kSbTcWarps, smem,
              c10::cuda::getCurrentCUDAStream())(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                                                 prev ? prev->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
                                                 attn.data_ptr<scalar_t>(), BH, N, (int)d, (float)scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return true;
}

}  // namespace
}  // namespace refiner
