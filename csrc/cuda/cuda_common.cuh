// Shared by the CUDA translation units (ops_cuda.cu, train_cuda.cu): the CUDA-or-emulator
// includes and macros, the block-thread policy and the launch helpers.
#pragma once

#include <cstdlib>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#ifdef REFINER_CUDA_EMU
#include "cuda/emu/cuda_emu.h"  // tests only: these kernels on the CPU emulator (tests/cuda_emu.py)
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
// The CUDA syntax that is not C++, and the library the kernels register in, as macros that
// cuda_emu.h and emu/ops_cuda_emu.cpp define differently (that build registers them for CPU tensors).
#define RF_DYN_SHARED(T, name) extern __shared__ T name[]
#define RF_LAUNCH(kernel, grid, threads, smem, stream) kernel<<<grid, threads, smem, stream>>>
#define RF_CUDA_LIB refiner
#define RF_CUDA_KEY CUDA
#endif
#ifdef REFINER_CUDA_EMU
#define RF_UNROLL
#else
#define RF_UNROLL _Pragma("unroll")
#endif

#include "common/refine_tile.h"
#include "cuda/mma.cuh"
#include "validate.h"

namespace refiner {
namespace {

using at::Tensor;

// The threads of a block as nty rows x ntx columns over a tile (refine_tile.h's Par policy):
// thread (ty, tx) does rows ty, ty + nty, ... and columns tx, tx + ntx, ... of every stage.
struct CudaPar {
  int ty, nty, tx, ntx;
  __device__ int y0() const { return ty; }
  __device__ int ny() const { return nty; }
  __device__ int x0() const { return tx; }
  __device__ int nx() const { return ntx; }
};

constexpr int kThreads = 128;

// Columns = the tile width, so that a warp reads consecutive columns of one row.
__device__ CudaPar tile_par(int TC) { return {(int)threadIdx.x / TC, (int)blockDim.x / TC, (int)threadIdx.x % TC, TC}; }

template <class F> __device__ __forceinline__ F warp_sum(F v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// Block-wide reduction (blockDim.x a multiple of 32, <= 1024); scratch: 32 floats.
template <bool kMax>
__device__ float block_reduce(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = kMax ? warp_max(v) : warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  // Only warp 0 reads the partials: another warp reading scratch[0] while thread 0 writes the total
  // there is a (harmless, discarded) race that compute-sanitizer's racecheck reports.
  if (warp == 0) {
    v = lane < nw ? scratch[lane] : (kMax ? -INFINITY : 0.f);
    v = kMax ? warp_max(v) : warp_sum(v);
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  const float r = scratch[0];
  __syncthreads();
  return r;
}

// One attention row by one warp (the softmax block forwards): row (n scaled scores in shared
// memory) -> attn = softmax(row) + sprev * prev (prev may be null), stored at attn_row, and the
// stored (rounded) values back into row for attn @ v.
template <class T>
__device__ void softmax_row_store(float* row, int64_t n, const T* prev_row, T* attn_row, float sprev) {
  const int lane = threadIdx.x & 31;
  float mx = -INFINITY;
  for (int64_t j = lane; j < n; j += 32) mx = fmaxf(mx, row[j]);
  mx = warp_max(mx);
  float sum = 0.f;
  for (int64_t j = lane; j < n; j += 32) sum += rf_exp(row[j] - mx);
  const float inv = 1.f / warp_sum(sum);
  for (int64_t j = lane; j < n; j += 32) {
    const float pv = prev_row ? static_cast<float>(prev_row[j]) : 0.f;
    const T a = static_cast<T>(softmax_residual(row[j], mx, inv, pv, prev_row ? sprev : 0.f));
    attn_row[j] = a;
    row[j] = static_cast<float>(a);
  }
}

int device_attr(cudaDeviceAttr attr) {  // of the current device
  int dev = 0, v = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, dev));
  return v;
}

template <class K>
void set_smem(K kernel, size_t bytes, const char* op) {
  const int mx = device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  TORCH_CHECK((int64_t)bytes <= mx, op, ": needs ", bytes, " bytes of shared memory per block, the device has ", mx,
              " (reduce N, H or the kernel size)");
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
}

// Rows of a block's tile: `dflt`, or the environment variable `env` (1-32, for benchmarks),
// lowered until the block's shared memory fits (so only shapes that do not fit at one row fail).
template <class SmemOf>
int tile_rows(const char* env, int dflt, SmemOf smem_of) {
  int tr = dflt;
  if (const char* e = std::getenv(env)) {
    tr = std::atoi(e);
    TORCH_CHECK(tr >= 1 && tr <= 32, env, " must be an integer in [1, 32], got '", e, "'");
  }
  const size_t mx = (size_t)device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  while (tr > 1 && smem_of(tr) > mx) --tr;
  return tr;
}

// The tensor-core kernels (softmax block forward, refine_eval forward and backward) serve
// fp32/fp16/bf16 inputs on sm_80+;
// REFINER_CUDA_TENSOR_CORES=0 keeps those on the CUDA-core kernels (which fp64 always uses).
inline bool tensor_cores_for(at::ScalarType st) {
  if (st != at::kFloat && st != at::kHalf && st != at::kBFloat16) return false;
  if (const char* e = std::getenv("REFINER_CUDA_TENSOR_CORES")) {
    const std::string v(e);
    TORCH_CHECK(v == "0" || v == "1", "REFINER_CUDA_TENSOR_CORES must be 0 or 1, got '", v, "'");
    if (v == "0") return false;
  }
  return device_attr(cudaDevAttrComputeCapabilityMajor) >= 8;
}

// AT_DISPATCH over the tensor-core kernels' input types (fp64 has none)
#define RF_DISPATCH_TC(TYPE, NAME, ...)                                                              \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                          \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                       \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

inline Tensor f32(const Tensor& t) { return t.to(at::kFloat).contiguous(); }

inline unsigned grid_for(int64_t rows) { return (unsigned)std::min<int64_t>(rows, 2147483647LL); }

}  // namespace
}  // namespace refiner
