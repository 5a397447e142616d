// TF32 tensor-core products for the CUDA kernels: one warp-wide mma.sync m16n8k8 (D = A B + D,
// fp32 accumulate) and the rounding of its operands. The CPU emulator (emu/cuda_emu.h) runs the
// same calls as a warp collective with these fragment layouts, so the kernels' index math is
// tested without a GPU.
//
// Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k8", .tf32), lane l, g = l / 4, t = l % 4:
//   A (16 x 8, row major):  a[r] = A[g + 8 (r % 2)][t + 4 (r / 2)]
//   B (8 x 8, column major): b[r] = B[t + 4 r][g]
//   C, D (16 x 8):           c[r] = C[g + 8 (r / 2)][2 t + r % 2]
#pragma once

#include <cstdint>
#include <cmath>
#include <cstring>
#include <type_traits>

namespace refiner {

struct MmaLane {  // this lane's coordinates in the fragments above
  int g, t;
};

// Row strides (in floats) of shared-memory tiles read as fragments, free of bank conflicts: odd4
// (y % 8 == 4) where the 8 g-lanes walk rows and the 4 t-lanes columns (A fragments; a B fragment
// stored n-major), odd8 (y % 16 == 8) where the 4 t-lanes walk rows and the g-lanes columns.
__host__ __device__ inline int odd4(int64_t x) { return (int)((x + 3) / 8 * 8 + 4); }
__host__ __device__ inline int odd8(int64_t x) { return (int)((x + 7) / 16 * 16 + 8); }

// fp32 rounded to TF32 (10 mantissa bits) to nearest, ties away from zero (cvt.rna); NaN stays NaN.
// Operands go through it: left to the tensor cores, the 13 low bits are dropped (truncation).
__host__ __device__ __forceinline__ float tf32_rna(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return __uint_as_float(r);
#else
  if (x != x) return x;
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u = (u + 0x1000u) & 0xFFFFE000u;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
#endif
}

__host__ __device__ __forceinline__ float finite_or_zero(float x) { return fabsf(x) <= 3.402823466e38f ? x : 0.f; }

// x = hi + lo, both TF32 values (lo: the rounded remainder; 0 for a non-finite x, whose remainder
// would be NaN). hi alone is x to 2^-11, hi + lo to about 2^-22 (relative). A finite x that rounds
// past the largest TF32 value keeps a finite hi (its 13 low bits cut instead).
__host__ __device__ __forceinline__ void tf32_split(float x, float& hi, float& lo) {
  hi = tf32_rna(x);
  if (finite_or_zero(hi) != hi && finite_or_zero(x) == x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    u &= 0xFFFFE000u;
    std::memcpy(&hi, &u, 4);
  }
  lo = finite_or_zero(x) == x ? tf32_rna(x - hi) : 0.f;
}

#ifdef REFINER_CUDA_EMU
__device__ __forceinline__ void mma_tf32(float (&d)[4], const float (&a)[4], const float (&b)[2]) {
  ::emu::mma_tf32(d, a, b);
}
#else
__device__ __forceinline__ void mma_tf32(float (&d)[4], const float (&a)[4], const float (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(__float_as_uint(a[0])), "r"(__float_as_uint(a[1])), "r"(__float_as_uint(a[2])),
        "r"(__float_as_uint(a[3])), "r"(__float_as_uint(b[0])), "r"(__float_as_uint(b[1])));
#else
  __trap();  // the host launches tensor-core kernels only on sm_80 and newer (tensor_cores_for)
#endif
}
#endif

// An operand fragment of N values, to TF32 (kSplit false: hi only) or split hi + lo (kSplit: 3xTF32,
// about fp32's accuracy, for fp32 inputs), and the product of two.
template <bool kSplit, int N>
struct TfFrag {
  float hi[N], lo[kSplit ? N : 1];
  __device__ __forceinline__ void set(int r, float x) {
    if constexpr (kSplit) {
      tf32_split(x, hi[r], lo[r]);
    } else {
      hi[r] = tf32_rna(x);
    }
  }
};

// d += a b: one TF32 product, or three (a_lo b_hi + a_hi b_lo + a_hi b_hi; a_lo b_lo, ~2^-22, dropped).
// Non-finite values enter only a_hi b_hi, so Inf and NaN propagate as in one fp32 product: the
// correction terms take them as 0 (a remainder of either sign, or 0, times Inf would give NaN or
// flip an Inf's sign).
template <bool kSplit>
__device__ __forceinline__ void mma_frag(float (&d)[4], const TfFrag<kSplit, 4>& a, const TfFrag<kSplit, 2>& b) {
  if constexpr (kSplit) {
    float af[4], bf[2];
    for (int r = 0; r < 4; ++r) af[r] = finite_or_zero(a.hi[r]);
    for (int r = 0; r < 2; ++r) bf[r] = finite_or_zero(b.hi[r]);
    mma_tf32(d, a.lo, bf);
    mma_tf32(d, af, b.lo);
  }
  mma_tf32(d, a.hi, b.hi);
}

}  // namespace refiner
