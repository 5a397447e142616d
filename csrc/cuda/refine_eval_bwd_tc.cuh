// refine (eval), the backward's gradient kernel on the tensor cores (H <= 16, sm_80+): from gR (the
// gradient of R, fp32) and A, the gradient of the map (in A's dtype, from fp32) and the per-block
// partial sums of the weight gradients. Every product is 3xTF32 (about fp32's accuracy, whatever the
// input type: these are gradients). Used by ops_cuda.cu (fp64 and H > 16 keep its refine_bwd_kernel).
//
// Same tiles as the forward (refine_eval_tc.cuh): a block of 8 warps owns 8 query rows x 32 key
// columns of one image and walks the key columns. In shared memory: A on halo planes of 2p (the
// stencil of D needs E around every pixel of GY's halo), gR on halo planes of p, and per chunk of
// 16 expanded channels E (halo 2p), GY (halo p), 16 centre planes (D, then GU) and the warps' partial
// products over pixels (tc_stash). Per chunk:
//  a. E = relu6(W_exp A + b_exp)                               tensor cores (tc_expand_chunk)
//  b. GY's ungated value (alpha W_pro)^T gR on the halo-p planes   tensor cores, M = channels
//  c. pre = dw_k(E) + b_dw there: GY = 0 where relu6 is flat or off the map; D = relu6(pre)
//                                                              CUDA cores
//  d. S[h, c] += sum_pix gR_h D_c                              tensor cores, K = pixels (split by warp)
//  e. GU = dw_k^T(GY), gated by relu6' of E (no expansion: gE itself)    CUDA cores
//  f. gA += W_exp^T GU (the identity without expansion), Gexp[c, h] += sum_pix GU_c A_h
//                                                              tensor cores
//  g. gw_dw[c, tap] += sum_pix GY_c E_c(shifted), gb_dw += sum GY_c, gb_exp += sum GU_c
//                                                              CUDA cores, fp64 slices
// and per column tile gA = alpha gR + the accumulated expansion path, sum gR_h A_h and sum gR_h.
// The host forms gw_pro = alpha S, galpha = sum gR A + sum_c w_pro S + b_pro sum gR, gbeta = sum gR.
// The partial sums of a block go to its own row of gpart (zeroed by the host; each slot added by
// one fixed thread, between barriers): deterministic, no atomics.
#pragma once

#include "cuda/refine_eval_tc.cuh"

namespace refiner {
namespace {

struct TcGradSlots {  // offsets in a block's row of partial sums (floats)
  int64_t S, gexp, bexp, wdw, bdw, ga, gr, n;
  __host__ __device__ TcGradSlots(int64_t H, int64_t rH, int k)
      : S(0), gexp(H * rH), bexp(gexp + rH * H), wdw(bexp + rH), bdw(wdw + rH * k * k), ga(bdw + rH), gr(ga + H),
        n(gr + H) {}
};

// Items of a chunk's CUDA-core sums (step g): k^2 taps and b_dw per channel, b_exp per channel.
__host__ __device__ inline int tc_bwd_chunk_items(int k, bool expand) { return 16 * (k * k + 1) + (expand ? 16 : 0); }
// fp64 slots of the sliced sums: items x slices <= max(items, threads)
__host__ __device__ inline int tc_bwd_ipart(int k, bool expand) {
  return tc_bwd_chunk_items(k, expand) > kTcThreads ? tc_bwd_chunk_items(k, expand) : kTcThreads;
}

size_t refine_bwd_tc_smem(int64_t H, int k, bool expand) {
  const TcPlane P2(k, 0, 2 * (k / 2)), P1(k, 0, k / 2);
  return sizeof(double) * tc_bwd_ipart(k, expand) +
         sizeof(float) * ((H + (expand ? 16 : 0)) * P2.PLP + (H + 16) * P1.PLP + 16 * kTcLdc + kTcWarps * 128);
}

template <class T, int K>
__global__ void __launch_bounds__(kTcThreads)
    refine_bwd_tc_kernel(const T* __restrict__ A, const float* __restrict__ GR, RefineWF w, int64_t B, int H,
                         int64_t N, int rH, bool expand, TcGradSlots sl, T* __restrict__ gA,
                         float* __restrict__ gpart) {
  RF_DYN_SHARED(float, sm);
  constexpr int p = K / 2, KK = K * K;
  const TcPlane P2(K, 0, 2 * p), P1(K, 0, p);
  const int ld2 = P2.ld, PLP2 = P2.PLP, ld1 = P1.ld, PLP1 = P1.PLP;
  double* ipart = reinterpret_cast<double*>(sm);
  float* ab = sm + 2 * tc_bwd_ipart(K, expand);  // (H, PLP2): A, halo 2p
  float* eb = ab + H * PLP2;                      // (16, PLP2): E of a chunk (expand only)
  float* grb = eb + (expand ? 16 * PLP2 : 0);     // (H, PLP1): gR, halo p
  float* gyb = grb + H * PLP1;                    // (16, PLP1): GY of a chunk
  float* cen = gyb + 16 * PLP1;                   // (16, kTcLdc): D of a chunk (centre), then GU
  float* scr = cen + 16 * kTcLdc;                 // (kTcWarps, 128): the warps' S or Gexp partials
  const float* src = expand ? eb : ab;            // the stencil's input planes
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const MmaLane L{lane >> 2, lane & 3};
  // this lane's centre pixels in the products over pixels: rows y0 + i (i < kTcGroups), columns xb ..
  const int y0 = warp / (kTcCols / 8) * kTcGroups, xb = warp % (kTcCols / 8) * 8;
  // the products over pixels (S, Gexp; tc_stash): this warp's 8 columns of the 16 and its 2 rows of the tile
  const int sum_n0 = warp / (kTcWarps / 2) * 8, sum_row0 = warp % (kTcWarps / 2) * 2;
  float* gp = gpart + blockIdx.x * sl.n;
  const int64_t rtiles = (N + kTcRows - 1) / kTcRows;
  for (int64_t blk = blockIdx.x; blk < B * rtiles; blk += gridDim.x) {
    const int64_t b = blk / rtiles, r0 = blk % rtiles * kTcRows;
    for (int64_t c0 = 0; c0 < N; c0 += kTcCols) {
      tc_load_planes(ab, A + b * H * N * N, H, N, r0 - 2 * p, c0 - 2 * p, ld2, P2.PL, PLP2);
      tc_load_planes(grb, GR + b * H * N * N, H, N, r0 - p, c0 - p, ld1, P1.PL, PLP1);
      __syncthreads();
      float gacc[kTcGroups][4] = {};  // gA's expansion path: head g + 8 (r / 2), pixel (y0 + i, xb + 2 t + r % 2)
      for (int cb = 0; cb < rH; cb += 16) {
        // a. E of channels cb .. cb + 15
        if (expand) tc_expand_chunk<true>(ab, eb, P2.PL, PLP2, ld2, 2 * p, w, cb, H, rH, N, r0, c0);
        // b. (alpha W_pro)^T gR on the halo-p planes: channel g + 8 (r / 2), pixel n0 + 2 t + r % 2
        tc_mix_chunk<true>(
            grb, H, PLP1,
            [&](int m, int h) { return cb + m < rH && h < H ? w.w_pro[h * rH + cb + m] * w.alpha[h] : 0.f; },
            [&](int m, int q, float v) { gyb[m * PLP1 + q] = v; });
        __syncthreads();
        // c. pre = dw_k(E) + b_dw on the halo-p planes: GY gated, D on the centre
        for (int j = threadIdx.x; j < 16 * P1.PL; j += blockDim.x) {
          const int cl = j / P1.PL, q = j % P1.PL, y1 = q / ld1, x1 = q % ld1, c = cb + cl;
          float gy = 0.f, dv = 0.f;
          if (c < rH) {
            // the stencil's top-left tap: (y1, x1) of the halo-2p plane
            const float pre = tc_stencil<K>(src + (expand ? cl : c) * PLP2, ld2, w.w_dw + c * KK, y1, x1) + w.b_dw[c];
            if (tc_inmap(N, r0 + y1 - p, c0 + x1 - p)) {
              gy = relu6_pass(pre) ? gyb[cl * PLP1 + q] : 0.f;
              dv = relu6(pre);
            }
          }
          gyb[cl * PLP1 + q] = gy;
          const int y = y1 - p, x = x1 - p;
          if (y >= 0 && y < kTcRows && x >= 0 && x < kTcCols) cen[cl * kTcLdc + y * kTcCols + x] = dv;
        }
        __syncthreads();
        // d. S (16 heads x 16 channels) over the tile's pixels: warp w takes channels 8 (w / 4) .. + 7 and
        // rows 2 (w % 4), + 1 (K steps: 8 pixels of one row); tc_unstash sums the four partials
        tc_pixel_product(
            scr, sum_n0, sum_row0,
            [&](int h, int y, int x) { return h < H ? grb[h * PLP1 + (y + p) * ld1 + x + p] : 0.f; },
            [&](int cl, int y, int x) { return cen[cl * kTcLdc + y * kTcCols + x]; });
        __syncthreads();  // e overwrites D
        tc_unstash(scr, [&](int m, int n, float v) {  // S[h = m, c = cb + n]
          if (m < H && cb + n < rH) gp[sl.S + m * rH + cb + n] += v;
        });
        // e. GU = dw_k^T(GY) on the centre (GY at (y - (i - p), x - (j - p))), gated by 0 < E < 6
        for (int j = threadIdx.x; j < 16 * kTcPix; j += blockDim.x) {
          const int cl = j / kTcPix, q = j % kTcPix, y = q / kTcCols, x = q % kTcCols, c = cb + cl;
          float gu = 0.f;
          if (c < rH && tc_inmap(N, r0 + y, c0 + x)) {
            gu = tc_stencil<K, -1>(gyb + cl * PLP1, ld1, w.w_dw + c * KK, y + 2 * p, x + 2 * p);
            if (expand) {
              const float e = eb[cl * PLP2 + (y + 2 * p) * ld2 + x + 2 * p];
              if (!(e > 0.f && e < 6.f)) gu = 0.f;
            }
          }
          cen[cl * kTcLdc + q] = gu;
        }
        __syncthreads();
        // f. gA's accumulators += W_exp^T GU (M = 16 heads, K = 16 channels), and Gexp over the warp's pixels
        tc_mix_centre(gacc, cen, y0, xb, [&](int h, int k) {
          const int c = cb + k;
          return expand ? (c < rH && h < H ? w.w_exp[c * H + h] : 0.f) : (c == h ? 1.f : 0.f);
        });
        if (expand) {  // Gexp (16 channels x 16 heads): warp w takes heads 8 (w / 4) .. + 7, pixels as in d
          tc_pixel_product(
              scr, sum_n0, sum_row0, [&](int cl, int y, int x) { return cen[cl * kTcLdc + y * kTcCols + x]; },
              [&](int h, int y, int x) { return h < H ? ab[h * PLP2 + (y + 2 * p) * ld2 + x + 2 * p] : 0.f; });
        }
        // g. per channel: the k^2 taps of gw_dw, gb_dw and gb_exp (items in that order)
        tc_sliced_sums(
            ipart, tc_bwd_chunk_items(K, expand),
            [&](int it, int q0, int q1) {
              const int cl = it < 16 * KK ? it / KK : (it - 16 * KK) % 16, tap = it % KK;
              const int di = tap / K, dj = tap % K;  // E at (y + di - p, x + dj - p): plane (y + di + p, x + dj + p)
              if (cb + cl >= rH) return 0.0;
              const float* gy = gyb + cl * PLP1;
              const float* e = src + (expand ? cl : cb + cl) * PLP2;
              double acc = 0;
              for (int q = q0; q < q1; ++q) {
                const int y = q / kTcCols, x = q % kTcCols;
                if (it < 16 * KK)
                  acc += double(gy[(y + p) * ld1 + x + p]) * e[(y + di + p) * ld2 + x + dj + p];
                else if (it < 16 * (KK + 1))
                  acc += gy[(y + p) * ld1 + x + p];
                else
                  acc += cen[cl * kTcLdc + q];
              }
              return acc;
            },
            [&](int it, double v) {
              const int cl = it < 16 * KK ? it / KK : (it - 16 * KK) % 16, c = cb + cl;
              if (c >= rH) return;
              const int64_t o = it < 16 * KK         ? sl.wdw + c * KK + it % KK
                                : it < 16 * (KK + 1) ? sl.bdw + c
                                                     : sl.bexp + c;
              gp[o] += (float)v;
            });
        if (expand)  // Gexp[c = cb + m, h = n] (the sliced sums' barriers have passed)
          tc_unstash(scr, [&](int m, int n, float v) {
            if (cb + m < rH && n < H) gp[sl.gexp + (cb + m) * H + n] += v;
          });
        __syncthreads();  // the next chunk overwrites E, GY, the centre planes and the scratch
      }
      // gA = alpha gR + the expansion path, on the centre
      RF_UNROLL
      for (int i = 0; i < kTcGroups; ++i)
        RF_UNROLL
        for (int r = 0; r < 4; ++r) {
          const int h = L.g + 8 * (r / 2), y = y0 + i, x = xb + 2 * L.t + r % 2;
          if (h < H && tc_inmap(N, r0 + y, c0 + x))
            gA[((b * H + h) * N + r0 + y) * N + c0 + x] =
                static_cast<T>(w.alpha[h] * grb[h * PLP1 + (y + p) * ld1 + x + p] + gacc[i][r]);
        }
      // per head: sum gR_h A_h (items [0, H)) and sum gR_h ([H, 2H)); the barrier at its end lets the
      // next column tile overwrite A and gR
      tc_sliced_sums(
          ipart, 2 * H,
          [&](int it, int q0, int q1) {
            const int h = it % H;
            double acc = 0;
            for (int q = q0; q < q1; ++q) {
              const int y = q / kTcCols, x = q % kTcCols;
              const float g = grb[h * PLP1 + (y + p) * ld1 + x + p];
              acc += it < H ? double(g) * ab[h * PLP2 + (y + 2 * p) * ld2 + x + 2 * p] : double(g);
            }
            return acc;
          },
          [&](int it, double v) { gp[(it < H ? sl.ga : sl.gr) + it % H] += (float)v; });
    }
  }
}

template <class T, int K>
void launch_refine_bwd_tc_k(const Tensor& A, const Tensor& GR, const RefineWF& w, int64_t H, int64_t rH, bool expand,
                            const TcGradSlots& sl, Tensor& gA, Tensor& gpart) {
  const int64_t B = A.size(0), N = A.size(2);
  const size_t smem = refine_bwd_tc_smem(H, K, expand);
  auto* kernel = refine_bwd_tc_kernel<T, K>;  // (a macro argument cannot hold the template's comma)
  set_smem(kernel, smem, "refine_eval_backward");
  RF_LAUNCH(kernel, (unsigned)gpart.size(0), kTcThreads, smem, c10::cuda::getCurrentCUDAStream())(
      A.data_ptr<T>(), GR.data_ptr<float>(), w, B, (int)H, N, (int)rH, expand, sl, gA.data_ptr<T>(),
      gpart.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The tensor-core gradient kernel: gA (B, H, N, N, A's dtype: no fp32 copy to convert) and the
// per-block partial sums (laid out by TcGradSlots), summed over the blocks. A (B, H, N, N) contiguous,
// GR the same in fp32; the caller checks refine_tc_eligible and tensor_cores_for.
Tensor launch_refine_bwd_tc(const Tensor& A, const Tensor& GR, const RefineWF& w, int64_t H, int64_t rH, int64_t k,
                            bool expand, Tensor& gA) {
  const TcGradSlots sl(H, rH, (int)k);
  const int64_t B = A.size(0), N = A.size(2);
  const int64_t blocks =
      std::min<int64_t>(B * ((N + kTcRows - 1) / kTcRows), 4LL * device_attr(cudaDevAttrMultiProcessorCount));
  auto gpart = at::zeros({blocks, sl.n}, GR.options());
  RF_DISPATCH_TC(A.scalar_type(), "refine_bwd_tc", [&] {
    with_kernel_size(k, [&](auto K) {
      launch_refine_bwd_tc_k<scalar_t, K.value>(A, GR, w, H, rH, expand, sl, gA, gpart);
    });
  });
  return gpart.sum(0);
}

}  // namespace
}  // namespace refiner
