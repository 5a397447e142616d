// csrc/cuda/ops_cuda.cu and train_cuda.cu compiled as C++ against the CPU emulator (cuda_emu.h):
// their kernels and launchers, registered as torch.ops.refiner_cuda_emu.* for CPU tensors. Test
// tooling, built by tests/cuda_emu.py, never part of the package.
#define REFINER_CUDA_EMU 1
#define RF_CUDA_LIB refiner_cuda_emu
#define RF_CUDA_KEY CPU

#include "cuda/ops_cuda.cu"
#include "cuda/train_cuda.cu"
#include "schemas.h"

namespace emu_selftest {

// Kernels with the faults the emulator must report (or, for `race`, expose through the schedule).
__global__ void sum_kernel(const float* x, float* out) {  // correct: block_reduce-like shuffle sum
  float v = x[blockIdx.x * blockDim.x + threadIdx.x];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) out[blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32] = v;
}
__global__ void divergent_sync_kernel(float* out) {
  if (threadIdx.x < 64) __syncthreads();
  out[threadIdx.x] = 1.f;
}
__global__ void divergent_shfl_kernel(float* out) {
  float v = 1.f;
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  __syncthreads();
  out[threadIdx.x] = v;
}
__global__ void smem_overflow_kernel(float* out) {
  RF_DYN_SHARED(float, sm);
  sm[blockDim.x + threadIdx.x] = 1.f;  // launched with blockDim.x floats
  out[threadIdx.x] = 0.f;
}
__global__ void race_kernel(float* out) {  // missing __syncthreads between the write and the read
  RF_DYN_SHARED(float, sm);
  sm[threadIdx.x] = (float)threadIdx.x;
  out[threadIdx.x] = sm[(threadIdx.x + 1) % blockDim.x];
}
__global__ void write_race_kernel(float* out) {  // two threads use one scratch word: write, then read
  RF_DYN_SHARED(float, sm);
  sm[threadIdx.x / 2] = (float)threadIdx.x;
  out[threadIdx.x] = sm[threadIdx.x / 2];
}
// Warp 0 reads a word after one shuffle, warp 1 writes it after two, with no barrier between: in
// lockstep every warp passes the first shuffle before any passes the second (the read always wins);
// a GPU may run warp 1 ahead, as schedules 1 and 2 do.
__global__ void skew_race_kernel(float* out) {
  RF_DYN_SHARED(float, sm);
  if (threadIdx.x == 0) sm[0] = 1.f;
  __syncthreads();
  float v = __shfl_xor_sync(0xffffffffu, 1.f, 1);
  if (threadIdx.x < 32) out[threadIdx.x] = sm[0] * v;
  v = __shfl_xor_sync(0xffffffffu, v, 1);
  if (threadIdx.x == 32) sm[0] = 5.f * v;
}
__global__ void uninit_kernel(float* out) {  // reads shared memory nobody wrote
  RF_DYN_SHARED(float, sm);
  out[threadIdx.x] = sm[threadIdx.x];
}

// One m16n8k8 product, fragments loaded by the layouts of mma.cuh: A (16, 8) and B (8, 8) row-major
// from mma_inputs(), C = 1. mode 0: a correct call; 1: an operand left unrounded; 2: half the warp.
__global__ void mma_kernel(const float* a, const float* b, float* out, int mode) {
  const int l = threadIdx.x % 32, g = l / 4, t = l % 4;
  float af[4], bf[2], acc[4] = {1.f, 1.f, 1.f, 1.f};
  for (int r = 0; r < 4; ++r) af[r] = refiner::tf32_rna(a[(g + 8 * (r % 2)) * 8 + t + 4 * (r / 2)]);
  for (int r = 0; r < 2; ++r) bf[r] = refiner::tf32_rna(b[(t + 4 * r) * 8 + g]);
  if (mode == 1 && l == 5) af[2] = 1.f + 1.f / (1 << 20);
  if (mode != 2 || l < 16) refiner::mma_tf32(acc, af, bf);
  for (int r = 0; r < 4; ++r) out[(g + 8 * (r / 2)) * 8 + 2 * t + r % 2] = acc[r];
}

// The selftest's mma operands: exact small multiples of 1/4 and 1/2 (TF32 values).
std::pair<at::Tensor, at::Tensor> mma_inputs() {
  auto i = at::arange(128, at::kLong);
  auto a = ((i * 7) % 13 - 6).to(at::kFloat).mul_(0.25f).view({16, 8});
  auto b = ((i.slice(0, 0, 64) * 5) % 11 - 5).to(at::kFloat).mul_(0.5f).view({8, 8});
  return {a, b};
}

at::Tensor run(const std::string& which, int64_t threads) {
  auto out = at::zeros({4 * threads}, at::kFloat);
  float* o = out.data_ptr<float>();
  const unsigned t = (unsigned)threads;
  const size_t smem = t * sizeof(float);
  if (which == "sum") {
    auto x = at::arange(2 * threads, at::kFloat);
    RF_LAUNCH(sum_kernel, 2, t, 0, 0)(x.data_ptr<float>(), o);
  } else if (which == "divergent_sync") {
    RF_LAUNCH(divergent_sync_kernel, 1, t, 0, 0)(o);
  } else if (which == "divergent_shfl") {
    RF_LAUNCH(divergent_shfl_kernel, 1, t, 0, 0)(o);
  } else if (which == "smem_overflow") {
    RF_LAUNCH(smem_overflow_kernel, 1, t, smem, 0)(o);
  } else if (which == "race") {
    RF_LAUNCH(race_kernel, 1, t, smem, 0)(o);
  } else if (which == "write_race") {
    RF_LAUNCH(write_race_kernel, 1, t, smem, 0)(o);
  } else if (which == "skew_race") {
    RF_LAUNCH(skew_race_kernel, 1, t, smem, 0)(o);
  } else if (which == "uninit") {
    RF_LAUNCH(uninit_kernel, 1, t, smem, 0)(o);
  } else if (which == "big_smem") {  // > 48 KiB without cudaFuncSetAttribute
    RF_LAUNCH(race_kernel, 1, t, 64 * 1024, 0)(o);
  } else if (which == "mma" || which == "mma_unrounded" || which == "mma_divergent") {
    auto ab = mma_inputs();
    const int mode = which == "mma" ? 0 : which == "mma_unrounded" ? 1 : 2;
    RF_LAUNCH(mma_kernel, 1, t, 0, 0)(ab.first.data_ptr<float>(), ab.second.data_ptr<float>(), o, mode);
  } else {
    TORCH_CHECK(false, "emu_selftest: unknown case ", which);
  }
  return out;
}

void set_schedule(int64_t order) { emu::set_schedule((int)order); }
void set_write_check(bool on) { emu::write_check() = on; }

}  // namespace emu_selftest

TORCH_LIBRARY(refiner_cuda_emu, m) {
  refiner::define_kernel_ops(m);
  m.def("set_schedule(int order) -> ()", &emu_selftest::set_schedule);
  m.def("set_write_check(bool on) -> ()", &emu_selftest::set_write_check);
  m.def("selftest(str which, int threads) -> Tensor", &emu_selftest::run);
}
