// An AVX-512 fp32 GEMM for the per-head products of the CPU drivers (ops_cpu.cpp's gemm_rm): the
// softmax block's S = scale q k^T (N x N, K = d) and attn v (N x d, K = N), their backward's, and the
// refine forward's R v. At these shapes (N ~ 200, d ~ 32) BLAS runs far below the core's FMA rate
// (one core of the 2-core AMD EPYC dev VM, N = 197, d = 32: q k^T MKL 41 GFMA/s, this 97; attn v
// 41 against 117): register blocks of 12 rows x 32 columns (24 zmm accumulators), the row operand
// broadcast, no packing but op(B)'s transpose. Used when the CPU has AVX-512F (checked at run time; the
// functions are compiled for it by target attributes).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define RF_HAVE_SMALL_GEMM 1
#endif

namespace refiner {
namespace cpu {

#ifdef RF_HAVE_SMALL_GEMM
inline bool small_gemm_supported() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

#define RF_AVX512 __attribute__((target("avx512f")))

// C[r, j0 .. j0 + ncols) (+)= alpha * sum_k A[r * lda + k * sa] B[k * ldb + j0 + ..] for r < MR,
// ncols <= 32 (the tail masked: B's columns beyond ncols are not read).
template <int MR, bool FULL>
RF_AVX512 inline void block_12x32(int64_t K, const float* A, int64_t lda, int64_t sa, const float* B, int64_t ldb,
                                  float* C, int64_t ldc, int ncols, float alpha, bool accumulate) {
  const __mmask16 m0 = ncols >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << ncols) - 1);
  const __mmask16 m1 = ncols >= 32 ? (__mmask16)0xFFFF : ncols <= 16 ? (__mmask16)0 : (__mmask16)((1u << (ncols - 16)) - 1);
  __m512 acc[MR][2];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 b0 = FULL ? _mm512_loadu_ps(B + k * ldb) : _mm512_maskz_loadu_ps(m0, B + k * ldb);
    const __m512 b1 = FULL ? _mm512_loadu_ps(B + k * ldb + 16) : _mm512_maskz_loadu_ps(m1, B + k * ldb + 16);
    const float* ak = A + k * sa;
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(ak[r * lda]);
      acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
    }
  }
  const __m512 al = _mm512_set1_ps(alpha);
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    __m512 c0 = _mm512_mul_ps(acc[r][0], al), c1 = _mm512_mul_ps(acc[r][1], al);
    if (accumulate) {
      c0 = _mm512_add_ps(c0, _mm512_maskz_loadu_ps(m0, C + r * ldc));
      c1 = _mm512_add_ps(c1, _mm512_maskz_loadu_ps(m1, C + r * ldc + 16));
    }
    _mm512_mask_storeu_ps(C + r * ldc, m0, c0);
    _mm512_mask_storeu_ps(C + r * ldc + 16, m1, c1);
  }
}

// C (M x Ncol, ld ldc) (+)= alpha * A' B with A'[r, k] = A[r * lda + k * sa] (M x K) and B (K x Ncol,
// ld ldb): rows in blocks of 12, then 4, then 1; columns in blocks of 32.
template <int MR>
RF_AVX512 inline void rows_block(int64_t i, int64_t K, int64_t Ncol, const float* A, int64_t lda, int64_t sa,
                                 const float* B, int64_t ldb, float* C, int64_t ldc, float alpha, bool accumulate) {
  int64_t j = 0;
  for (; j + 32 <= Ncol; j += 32)
    block_12x32<MR, true>(K, A + i * lda, lda, sa, B + j, ldb, C + i * ldc + j, ldc, 32, alpha, accumulate);
  if (j < Ncol)
    block_12x32<MR, false>(K, A + i * lda, lda, sa, B + j, ldb, C + i * ldc + j, ldc, (int)(Ncol - j), alpha,
                           accumulate);
}

RF_AVX512 inline void small_gemm(int64_t M, int64_t Ncol, int64_t K, const float* A, int64_t lda, int64_t sa,
                                 const float* B, int64_t ldb, float* C, int64_t ldc, float alpha, bool accumulate) {
  int64_t i = 0;
  for (; i + 12 <= M; i += 12) rows_block<12>(i, K, Ncol, A, lda, sa, B, ldb, C, ldc, alpha, accumulate);
  for (; i + 4 <= M; i += 4) rows_block<4>(i, K, Ncol, A, lda, sa, B, ldb, C, ldc, alpha, accumulate);
  for (; i < M; ++i) rows_block<1>(i, K, Ncol, A, lda, sa, B, ldb, C, ldc, alpha, accumulate);
}

#undef RF_AVX512
#else
inline bool small_gemm_supported() { return false; }
#endif

}  // namespace cpu
}  // namespace refiner
