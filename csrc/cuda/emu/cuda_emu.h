// A CPU emulator of the CUDA features csrc/cuda/ops_cuda.cu uses, so that the kernels
// themselves (not only their shared tile math) run in the tests of a machine without a GPU.
// Test tooling only: tests/cuda_emu.py compiles ops_cuda.cu against this header as plain C++.
//
// Model: the blocks of a grid run one after another; the threads of a block are fibers
// (ucontext) on one OS thread, each with its own stack. A fiber runs until it reaches a
// collective point (__syncthreads, __shfl_xor_sync, a tensor-core mma) or exits; the scheduler
// then releases what CUDA would release: a warp whose 32 lanes all wait at the same warp
// collective, or the block when every thread waits at __syncthreads. So a kernel's code runs with CUDA's
// synchronisation semantics, and what a GPU would not forgive is an error here:
//   * __syncthreads not reached by every thread of the block (divergent barrier);
//   * a shuffle or mma not reached by all 32 lanes of its warp, or a shuffle with a partial mask;
//   * an mma operand that is not a TF32 value (the kernel forgot to round it: tf32_rna);
//   * writes past the dynamic shared memory (a canary after it), more than 48 KiB of it
//     without cudaFuncSetAttribute, more than an H100 block may have;
//   * block sizes over 1024.
// Dynamic shared memory starts as NaN, so a read of a word nobody wrote poisons the results.
// Data races between barriers: a thread reading what another writes in the same phase shows up
// as results that change with the order in which the fibers of a phase run (emu::set_schedule:
// forward, reverse, shuffled; under the last two, one warp at a time passes its warp collectives,
// so warps also skew across their mma and shuffle steps). Fibers do not interleave within a phase,
// so two threads that each write then read the same word would go unseen: emu::set_write_check
// makes the scheduler diff the dynamic shared memory around every fiber run and report a word
// changed by two threads between two barriers (slow: for small shapes).
// Device properties are an H100's, except the SM count (2), so grid-stride loops loop.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <cstdlib>
#include <type_traits>
#include <vector>

namespace emu {

constexpr int kWarp = 32;
constexpr size_t kStackBytes = 256 * 1024;  // per fiber (mmap'ed: only touched pages cost)
constexpr size_t kCanaryBytes = 4096;
constexpr int kSmemOptin = 232448;  // H100: cudaDevAttrMaxSharedMemoryPerBlockOptin
// SMs the launchers see (they size grid-stride grids from it): 2, or REFINER_EMU_SMS (132 on an
// H100) to give the kernels the GPU's grid, so that a block walks as many tiles as on the device.
inline int sm_count() {
  static const int n = [] {
    const char* s = std::getenv("REFINER_EMU_SMS");
    return s && std::atoi(s) > 0 ? std::atoi(s) : 2;
  }();
  return n;
}

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

enum class St { Run, Sync, Shfl, Mma, Done };

struct Fiber {
  ucontext_t ctx;   // for the first entry only; then switches are __builtin_setjmp/longjmp
  void* jb[5];
  bool started = false;
  void* stack = nullptr;
  Dim3 tid;
  St st = St::Run;
  double sval = 0, sout = 0;  // shuffle: value given, value received
  int src = 0;                // shuffle: source lane
  float* md = nullptr;        // mma: this lane's accumulator fragment (4) and operands (4, 2)
  const float *ma = nullptr, *mb = nullptr;
};

struct Block {
  Dim3 bid, bdim, gdim;
  std::vector<Fiber>* fibers = nullptr;
  void* sched_jb[5];
  std::function<void()>* body = nullptr;
  unsigned char* dyn_smem = nullptr;
  size_t smem = 0;
};

// Scheduling order of the fibers of one phase: 0 forward, 1 reverse, 2 shuffled (fixed seed).
inline int& schedule() {
  static int order = 0;
  return order;
}
inline void set_schedule(int order) {
  TORCH_CHECK(order >= 0 && order <= 2, "emu: schedule must be 0, 1 or 2, got ", order);
  schedule() = order;
}
inline bool& write_check() {
  static bool on = false;
  return on;
}

// Who changed each 4-byte word of the dynamic shared memory since the last block barrier.
struct WriteCheck {
  std::vector<unsigned char> before;
  std::vector<int> writer;
  void phase(const Block& b) {
    writer.assign(b.smem / 4, -1);
    before.resize(b.smem);
  }
  void snapshot(const Block& b) { std::memcpy(before.data(), b.dyn_smem, b.smem); }
  std::string diff(const Block& b, int t) {
    for (size_t w = 0; w < writer.size(); ++w) {
      if (std::memcmp(before.data() + 4 * w, b.dyn_smem + 4 * w, 4) == 0) continue;
      if (writer[w] >= 0 && writer[w] != t)
        return "threads " + std::to_string(writer[w]) + " and " + std::to_string(t) + " of block " +
               std::to_string(b.bid.x) + " both wrote shared-memory byte " + std::to_string(4 * w) +
               " between two barriers (a write-write race)";
      writer[w] = t;
    }
    return "";
  }
};

inline thread_local Block* cur_block = nullptr;
inline thread_local Fiber* cur_fiber = nullptr;

inline Block& block() { return *cur_block; }
inline Fiber& self() { return *cur_fiber; }

// Kernel-side errors cannot throw across fibers: they are recorded and raised by the launcher.
inline thread_local std::string pending_error;
inline void fail_in_kernel(std::string msg) {
  if (pending_error.empty()) pending_error = std::move(msg);
}

// Context switches: swapcontext makes a system call (the signal mask) per switch, so after a
// fiber's first entry the switches are GCC's register-only __builtin_setjmp / __builtin_longjmp
// (each longjmp in a function other than its setjmp's, as GCC requires).
__attribute__((noinline)) inline void jump(void** jb) { __builtin_longjmp(jb, 1); }

__attribute__((noinline)) inline void yield() {
  if (__builtin_setjmp(cur_fiber->jb) == 0) jump(cur_block->sched_jb);
}

__attribute__((noinline)) inline void resume(Block& b, Fiber& f) {
  if (__builtin_setjmp(b.sched_jb) == 0) {
    if (f.started) jump(f.jb);
    f.started = true;
    ucontext_t here;  // never resumed: the fiber comes back through sched_jb
    swapcontext(&here, &f.ctx);
  }
}

inline void syncthreads() {
  cur_fiber->st = St::Sync;
  yield();
}

template <class T>
T shfl_xor(unsigned mask, T v, int lane_mask) {
  static_assert(std::is_arithmetic<T>::value, "emu: shuffles of arithmetic values only");
  if (mask != 0xffffffffu) fail_in_kernel("__shfl_xor_sync: only the full mask is emulated");
  Fiber& f = self();
  f.sval = static_cast<double>(v);
  f.src = (int)((f.tid.x % kWarp) ^ (unsigned)lane_mask);
  f.st = St::Shfl;
  yield();
  return static_cast<T>(self().sout);
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 as a warp collective: every lane gives its
// fragments (layouts in csrc/cuda/mma.cuh) and gets D = A B + C back.
inline void mma_tf32(float* d, const float* a, const float* b) {
  Fiber& f = self();
  f.md = d;
  f.ma = a;
  f.mb = b;
  f.st = St::Mma;
  yield();
}

inline bool is_tf32(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return x != x || (u & 0x1FFFu) == 0;
}

// The warp's product, once its 32 lanes wait at mma_tf32 (fibers[lo, lo + 32)).
inline std::string run_mma(std::vector<Fiber>& fs, unsigned lo) {
  float A[16][8], B[8][8], C[16][8];
  for (int l = 0; l < kWarp; ++l) {
    const Fiber& f = fs[lo + l];
    const int g = l / 4, t = l % 4;
    for (int r = 0; r < 4; ++r) {
      A[g + 8 * (r % 2)][t + 4 * (r / 2)] = f.ma[r];
      C[g + 8 * (r / 2)][2 * t + r % 2] = f.md[r];
    }
    for (int r = 0; r < 2; ++r) B[t + 4 * r][g] = f.mb[r];
    for (int r = 0; r < 4; ++r)
      if (!is_tf32(f.ma[r]) || (r < 2 && !is_tf32(f.mb[r])))
        return "mma_tf32: lane " + std::to_string(l) + " passed an operand that is not a TF32 value (round it first)";
  }
  for (int l = 0; l < kWarp; ++l) {
    const int g = l / 4, t = l % 4;
    for (int r = 0; r < 4; ++r) {
      const int m = g + 8 * (r / 2), n = 2 * t + r % 2;
      float acc = C[m][n];
      for (int kk = 0; kk < 8; ++kk) acc += A[m][kk] * B[kk][n];
      fs[lo + l].md[r] = acc;
    }
  }
  return "";
}

inline std::map<const void*, int>& smem_optin() {  // cudaFuncSetAttribute(MaxDynamicSharedMemorySize)
  static std::map<const void*, int> m;
  return m;
}

// A pool of fiber stacks per OS thread, reused by every block.
inline std::vector<Fiber>& fiber_pool(size_t n) {
  static thread_local std::vector<Fiber> pool;
  while (pool.size() < n) {
    Fiber f;
    f.stack = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(f.stack != MAP_FAILED, "emu: cannot map a fiber stack");
    pool.push_back(f);
  }
  return pool;
}

inline void fiber_main() {
  (*cur_block->body)();
  cur_fiber->st = St::Done;
  yield();  // never resumed
}

// Runs one block to completion; returns an error message ("" when fine).
inline std::string run_block(Block& b, unsigned nthreads) {
  std::vector<Fiber>& fs = *b.fibers;
  for (unsigned t = 0; t < nthreads; ++t) {
    Fiber& f = fs[t];
    f.tid = Dim3{t, 0, 0};
    f.st = St::Run;
    f.started = false;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
  }
  std::vector<unsigned> order(nthreads);
  for (unsigned t = 0; t < nthreads; ++t) order[t] = t;
  if (schedule() == 1) std::reverse(order.begin(), order.end());
  std::mt19937 rng(1234u + b.bid.x);
  const unsigned nwarps = (nthreads + kWarp - 1) / kWarp;
  const bool check = write_check();
  WriteCheck wc;
  if (check) wc.phase(b);
  for (;;) {
    if (schedule() == 2) std::shuffle(order.begin(), order.end(), rng);
    for (unsigned t : order) {
      if (fs[t].st != St::Run) continue;
      if (check) wc.snapshot(b);
      cur_fiber = &fs[t];
      resume(b, fs[t]);
      if (check) {
        std::string err = wc.diff(b, (int)t);
        if (!err.empty()) return err;
      }
    }
    cur_fiber = nullptr;
    if (!pending_error.empty()) return pending_error;
    // Every fiber now waits (Sync / Shfl) or is done. First the warps whose lanes all shuffle: all
    // of them at once (schedule 0: the warps in lockstep), or one warp, the last (1) or a random one
    // (2), which then runs on alone to its next collective: a warp runs ahead of the others through
    // its collectives, as on a GPU, and a missing barrier between a warp's reads and another warp's
    // writes changes the results.
    bool released = false;
    std::vector<unsigned> warps(nwarps);
    for (unsigned w = 0; w < nwarps; ++w) warps[w] = schedule() == 1 ? nwarps - 1 - w : w;
    if (schedule() == 2) std::shuffle(warps.begin(), warps.end(), rng);
    for (unsigned w : warps) {
      if (released && schedule() != 0) break;
      const unsigned lo = w * kWarp, hi = std::min(nthreads, lo + kWarp);
      unsigned shfl = 0, mma = 0;
      for (unsigned t = lo; t < hi; ++t) {
        shfl += fs[t].st == St::Shfl;
        mma += fs[t].st == St::Mma;
      }
      if (shfl == 0 && mma == 0) continue;
      const char* what = shfl ? "__shfl_xor_sync" : "mma_tf32";
      if (hi - lo != (unsigned)kWarp)
        return std::string(what) + " in a partial warp (block size " + std::to_string(nthreads) + ")";
      if (shfl + mma != (unsigned)kWarp || (shfl && mma))
        return std::string(what) + " reached by " + std::to_string(shfl ? shfl : mma) + " of the 32 lanes of warp " +
               std::to_string(w) + " (divergent warp collective: the others wait elsewhere or exited)";
      if (shfl) {
        for (unsigned t = lo; t < hi; ++t) fs[t].sout = fs[lo + fs[t].src].sval;
      } else {
        std::string err = run_mma(fs, lo);
        if (!err.empty()) return err;
      }
      for (unsigned t = lo; t < hi; ++t) fs[t].st = St::Run;
      released = true;
    }
    if (released) continue;
    unsigned sync = 0, done = 0;
    for (unsigned t = 0; t < nthreads; ++t) {
      sync += fs[t].st == St::Sync;
      done += fs[t].st == St::Done;
    }
    if (done == nthreads) return "";
    if (sync != nthreads)
      return "__syncthreads reached by " + std::to_string(sync) + " of the " + std::to_string(nthreads) +
             " threads of block " + std::to_string(b.bid.x) + " (the others exited: divergent barrier)";
    for (unsigned t = 0; t < nthreads; ++t) fs[t].st = St::Run;
    if (check) wc.phase(b);
  }
}

// kernel<<<grid, threads, smem>>>(args...) on the CPU.
template <class K>
struct Launch {
  K* kernel;
  unsigned grid, threads;
  size_t smem;
  const char* name;

  template <class... A>
  void operator()(A&&... args) const {
    TORCH_CHECK(grid >= 1 && threads >= 1 && threads <= 1024, "emu launch of ", name, ": invalid configuration <<<",
                grid, ", ", threads, ">>>");
    TORCH_CHECK(smem <= (size_t)kSmemOptin, "emu launch of ", name, ": ", smem,
                " bytes of dynamic shared memory, more than an H100 block may have (", kSmemOptin, ")");
    if (smem > 48 * 1024) {
      auto it = smem_optin().find((const void*)kernel);
      TORCH_CHECK(it != smem_optin().end() && (size_t)it->second >= smem, "emu launch of ", name, ": ", smem,
                  " bytes of dynamic shared memory need cudaFuncSetAttribute(MaxDynamicSharedMemorySize) first");
    }
    std::vector<float> shared((smem + kCanaryBytes + sizeof(float) - 1) / sizeof(float),
                              std::numeric_limits<float>::quiet_NaN());
    std::vector<unsigned char> canary(kCanaryBytes);
    std::memcpy(canary.data(), reinterpret_cast<unsigned char*>(shared.data()) + smem, kCanaryBytes);
    std::function<void()> body = [&] { kernel(args...); };
    Block b;
    b.gdim = Dim3{grid, 1, 1};
    b.bdim = Dim3{threads, 1, 1};
    b.fibers = &fiber_pool(threads);
    b.body = &body;
    b.dyn_smem = reinterpret_cast<unsigned char*>(shared.data());
    b.smem = smem;
    Block* outer = cur_block;
    pending_error.clear();
    for (unsigned g = 0; g < grid; ++g) {
      b.bid = Dim3{g, 1, 1};
      cur_block = &b;
      std::string err = run_block(b, threads);
      cur_block = outer;
      pending_error.clear();
      TORCH_CHECK(err.empty(), "emu launch of ", name, " <<<", grid, ", ", threads, ", ", smem, ">>>: ", err);
      TORCH_CHECK(std::memcmp(canary.data(), b.dyn_smem + smem, kCanaryBytes) == 0, "emu launch of ", name,
                  ": block ", g, " wrote past its ", smem, " bytes of dynamic shared memory");
    }
  }
};

template <class K>
Launch<K> launch(K* kernel, unsigned grid, unsigned threads, size_t smem, const char* name) {
  return Launch<K>{kernel, grid, threads, smem, name};
}

template <class T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(cur_block->dyn_smem);
}

}  // namespace emu

// ---- the CUDA names the kernels and launchers use ------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local  // one block at a time per OS thread
#define threadIdx (::emu::self().tid)
#define blockIdx (::emu::block().bid)
#define blockDim (::emu::block().bdim)
#define gridDim (::emu::block().gdim)

inline void __syncthreads() { ::emu::syncthreads(); }
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  return ::emu::shfl_xor(mask, v, lane_mask);
}
// A product rounded to fp32 on its own (never contracted into an FMA): volatile stops the
// emulator build's -ffp-contract=fast as __fmul_rn stops nvcc's.
inline float __fmul_rn(float a, float b) {
  volatile float r = a * b;
  return r;
}
template <class T>
inline T min(T a, T b) {
  return b < a ? b : a;
}

enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin, cudaDevAttrMultiProcessorCount, cudaDevAttrComputeCapabilityMajor };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
inline int cudaGetDevice(int* dev) {
  *dev = 0;
  return 0;
}
inline int cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  *v = attr == cudaDevAttrMaxSharedMemoryPerBlockOptin ? emu::kSmemOptin
      : attr == cudaDevAttrComputeCapabilityMajor    ? 9  // an H100's
                                                     : emu::sm_count();
  return 0;
}
template <class K>
int cudaFuncSetAttribute(K* kernel, cudaFuncAttribute, int bytes) {
  emu::smem_optin()[(const void*)kernel] = bytes;
  return 0;
}
#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == 0, "emu: ", #expr, " failed")
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
struct EmuStream {};
inline EmuStream getCurrentCUDAStream() { return {}; }
}  // namespace cuda
}  // namespace c10

#define RF_DYN_SHARED(T, name) T* name = ::emu::dynamic_shared<T>()
#define RF_LAUNCH(kernel, grid, threads, smem, stream) ::emu::launch(kernel, grid, threads, smem, #kernel)
