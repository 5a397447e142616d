// The tiles of the tensor-core kernels (refine_eval_tc.cuh, refine_eval_bwd_tc.cuh, train_tc.cuh):
// a block of 8 warps owns 8 rows x 32 columns of one image's N x N maps; the maps sit in shared
// memory on "halo planes" (the tile plus a stencil halo, flattened); the head mixes are mma steps
// over those planes (mma.cuh), and the sums over a tile's pixels go through fp64 slices or the
// warps' stashed mma partials, added in a fixed order (deterministic).
#pragma once

#include "cuda/cuda_common.cuh"

namespace refiner {
namespace {

constexpr int kTcWarps = 8, kTcThreads = 32 * kTcWarps;
constexpr int kTcRows = 8;   // = the n of an m16n8k8 product: R v's N dimension
constexpr int kTcCols = 32;
constexpr int kTcGroups = 4;  // pixel groups (8 columns of a row) per warp, on 4 consecutive rows
constexpr int kTcMaxHeads = 16;  // one m16 tile of heads
static_assert(kTcWarps / (kTcCols / 8) * kTcGroups == kTcRows, "the warps' row bands cover the tile");

// A plane of PL floats padded to whole 8-pixel fragment columns, planes 8 or 24 words apart mod 32:
// a B fragment's 4 t-lanes read 4 planes in distinct banks.
__host__ __device__ inline int tc_plane_pad(int PL) {
  const int PLP = (PL + 7) / 8 * 8;
  return PLP % 32 == 0 || PLP % 32 == 16 ? PLP + 8 : PLP;
}

struct TcPlane {  // the halo plane's geometry (halo `halo` around the tile), and the output accumulator's row stride
  int p, ld, PL, PLP, ldo;
  __host__ __device__ TcPlane(int k, int d, int halo) : p(k / 2), ld(kTcCols + 2 * halo) {
    PL = (kTcRows + 2 * halo) * ld;
    PLP = tc_plane_pad(PL);
    ldo = (d + 15) / 16 * 16 + 4;  // rows 2t apart land 8t banks apart
  }
};

__device__ __forceinline__ bool tc_inmap(int64_t N, int64_t gy, int64_t gx) { return gy >= 0 && gy < N && gx >= 0 && gx < N; }

// The k x k stencil at one pixel of a plane: kDir 1, dw_k whose top-left tap is the plane pixel
// (y, x), sum_{i,j < K} wk[i K + j] plane[(y + i) ld + x + j]; kDir -1, its transpose at (y, x),
// sum wk[i K + j] plane[(y - i) ld + x - j].
template <int K, int kDir = 1>
__device__ __forceinline__ float tc_stencil(const float* plane, int ld, const float* wk, int y, int x) {
  const float* e = plane + y * ld + x;
  float s = 0.f;
  RF_UNROLL
  for (int i = 0; i < K; ++i)
    RF_UNROLL
    for (int j = 0; j < K; ++j) s += wk[i * K + j] * e[kDir * (i * ld + j)];
  return s;
}

// C planes of a (C, N, N) map (one image) into halo planes (PLP floats apart, ld wide) whose first
// pixel is the map's (y0, x0): fp32, 0 outside the map and past PL.
template <class T>
__device__ void tc_load_planes(float* dst, const T* src, int C, int64_t N, int64_t y0, int64_t x0, int ld, int PL,
                               int PLP) {
  for (int j = threadIdx.x; j < C * PLP; j += blockDim.x) {
    const int c = j / PLP, q = j % PLP;
    const int64_t gy = y0 + q / ld, gx = x0 + q % ld;
    dst[j] = q < PL && tc_inmap(N, gy, gx) ? static_cast<float>(src[(c * N + gy) * N + gx]) : 0.f;
  }
}

// Head mixes as mma steps. tc_mix_weights: a 16 x 16 weight as A fragments of two K steps of 8
// (weight(m, k): row m, column k; 0 past the heads or channels). tc_mix_planes: acc (16 rows x the 8
// pixels n0 .. n0 + 7) += wa x planes, planes = H planes PLP apart (K = the planes; steps past H
// skipped, warp-uniformly).
template <bool kSplit, class Weight>
__device__ __forceinline__ void tc_mix_weights(TfFrag<kSplit, 4> (&wa)[2], MmaLane L, Weight weight) {
  RF_UNROLL
  for (int ks = 0; ks < 2; ++ks)
    RF_UNROLL
    for (int r = 0; r < 4; ++r) wa[ks].set(r, weight(L.g + 8 * (r % 2), ks * 8 + L.t + 4 * (r / 2)));
}
template <bool kSplit>
__device__ __forceinline__ void tc_mix_planes(float (&acc)[4], const TfFrag<kSplit, 4> (&wa)[2], const float* planes,
                                              int H, int PLP, int n0, MmaLane L) {
  RF_UNROLL
  for (int ks = 0; ks < 2; ++ks) {
    if (ks * 8 >= H) break;  // warp-uniform; constant bounds keep wa in registers
    TfFrag<kSplit, 2> bf;
    RF_UNROLL
    for (int r = 0; r < 2; ++r) {
      const int h = ks * 8 + L.t + 4 * r;
      bf.set(r, h < H ? planes[h * PLP + n0 + L.g] : 0.f);
    }
    mma_frag(acc, wa[ks], bf);
  }
}

// A chunk of 16 mixed planes (M = 16 rows of weight(m, h), N = 8 pixels, K = the H planes PLP apart):
// store(m, q, value) for every pixel q < PLP of every row m, each warp 8 pixels at a time. The
// forward's expansion, the backward's (alpha W_pro)^T gR and refine_train's passes.
template <bool kSplit, class Weight, class Store>
__device__ __forceinline__ void tc_mix_chunk(const float* planes, int H, int PLP, Weight weight, Store store) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const MmaLane L{lane >> 2, lane & 3};
  TfFrag<kSplit, 4> wa[2];
  tc_mix_weights(wa, L, weight);
  for (int n0 = warp * 8; n0 < PLP; n0 += 8 * kTcWarps) {
    float acc[4] = {};
    tc_mix_planes(acc, wa, planes, H, PLP, n0, L);
    RF_UNROLL
    for (int r = 0; r < 4; ++r) store(L.g + 8 * (r / 2), n0 + 2 * L.t + r % 2, acc[r]);
  }
}

constexpr int kTcPix = kTcRows * kTcCols;     // a tile's centre pixels
constexpr int kTcLdc = kTcPix + 8;            // centre planes 8 words apart mod 32 (tc_plane_pad)
constexpr int kTcSumSteps = 2 * kTcCols / 8;  // K steps of a warp's share of the products over pixels (2 rows)
static_assert(kTcWarps / 2 * 2 == kTcRows, "each half of the warps, two tile rows a warp, covers the tile");

// nitems sums over the tile's centre pixels, each split into slices over the block's threads (every
// thread busy when there are fewer items than threads): sum_of(item, q0, q1) sums pixels [q0, q1) in
// fp64; add(item, total) gets the slices' total, added in order (deterministic). Ends with a barrier.
template <class Sum, class Add>
__device__ void tc_sliced_sums(double* ipart, int nitems, Sum sum_of, Add add) {
  const int S = nitems < kTcThreads ? kTcThreads / nitems : 1, slice = (kTcPix + S - 1) / S;
  for (int j = threadIdx.x; j < nitems * S; j += blockDim.x) {
    const int q0 = j % S * slice;
    ipart[j] = sum_of(j / S, q0, min(kTcPix, q0 + slice));
  }
  __syncthreads();
  for (int it = threadIdx.x; it < nitems; it += blockDim.x) {
    double s = 0;
    for (int k = 0; k < S; ++k) s += ipart[it * S + k];
    add(it, s);
  }
  __syncthreads();
}

// The products over pixels (S, Gexp: 16 x 16) split over the warps: warp w owns columns 8 (w / 4) ..
// + 7 and tile rows 2 (w % 4), + 1. tc_stash puts its 16 x 8 accumulator (r: row g + 8 (r / 2), column
// 2 t + r % 2) in its slot of the scratch; after a barrier, tc_unstash hands add(m, n, sum) each element
// of the 16 x 16 sum, its four partials added in warp order.
__device__ __forceinline__ void tc_stash(float* scr, const float (&acc)[4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  RF_UNROLL
  for (int r = 0; r < 4; ++r) scr[(threadIdx.x >> 5) * 128 + (g + 8 * (r / 2)) * 8 + 2 * t + r % 2] = acc[r];
}
template <class Add>
__device__ void tc_unstash(const float* scr, Add add) {
  for (int j = threadIdx.x; j < 256; j += blockDim.x) {
    const int m = j / 16, n = j % 16;
    float s = 0.f;
    for (int q = 0; q < kTcWarps / 2; ++q) s += scr[(n / 8 * (kTcWarps / 2) + q) * 128 + m * 8 + n % 8];
    add(m, n, s);
  }
}

// acc (16 heads x this warp's pixels: rows y0 + i, columns xb .. xb + 7) += weight(h, cl) cen_cl over
// the 16 channels cl of a chunk (K = channels; cen: 16 centre planes kTcLdc apart).
template <class Weight>
__device__ __forceinline__ void tc_mix_centre(float (&acc)[kTcGroups][4], const float* cen, int y0, int xb,
                                              Weight weight) {
  const int lane = threadIdx.x & 31;
  const MmaLane L{lane >> 2, lane & 3};
  TfFrag<true, 4> wt[2];
  tc_mix_weights(wt, L, weight);
  RF_UNROLL
  for (int i = 0; i < kTcGroups; ++i)
    RF_UNROLL
    for (int ks = 0; ks < 2; ++ks) {
      TfFrag<true, 2> bf;
      RF_UNROLL
      for (int r = 0; r < 2; ++r) bf.set(r, cen[(ks * 8 + L.t + 4 * r) * kTcLdc + (y0 + i) * kTcCols + xb + L.g]);
      mma_frag(acc[i], wt[ks], bf);
    }
}

// The warp's share of a 16 x 16 product over the tile's pixels, sum_pix a(m, pix) b(n, pix)
// (tc_stash's split: this warp's columns n0 .. n0 + 7 of the 16, tile rows row0, row0 + 1), into
// its scratch slot; a(m, y, x) and b(n, y, x) read the centre pixel (y, x).
template <class AOf, class BOf>
__device__ __forceinline__ void tc_pixel_product(float* scr, int n0, int row0, AOf a, BOf b) {
  const int lane = threadIdx.x & 31;
  const MmaLane L{lane >> 2, lane & 3};
  float acc[4] = {};
  for (int ks = 0; ks < kTcSumSteps; ++ks) {  // (rolled: registers)
    const int y = row0 + ks / 4, x0 = ks % 4 * 8;
    TfFrag<true, 4> af;
    TfFrag<true, 2> bf;
    RF_UNROLL
    for (int r = 0; r < 4; ++r) af.set(r, a(L.g + 8 * (r % 2), y, x0 + L.t + 4 * (r / 2)));
    RF_UNROLL
    for (int r = 0; r < 2; ++r) bf.set(r, b(n0 + L.g, y, x0 + L.t + 4 * r));
    mma_frag(acc, af, bf);
  }
  tc_stash(scr, acc);
}

// f(std::integral_constant<int, K>) for the kernel size k (validated: odd, 1..7): the tensor-core
// kernels' instances
template <class F>
void with_kernel_size(int64_t k, F f) {
  switch (k) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 5: return f(std::integral_constant<int, 5>{});
    default: return f(std::integral_constant<int, 7>{});
  }
}

}  // namespace
}  // namespace refiner
