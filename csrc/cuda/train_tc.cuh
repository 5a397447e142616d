// refine_train's passes (train_pass.h) on the tensor cores: fp32 maps, H <= 16, sm_80+. The head
// mixes (W_exp A, W_pro D, W_pro^T gY3, W_exp^T gU) and the weight gradients that are products over
// pixels (gw_pro, gw_exp) are 3xTF32 mma products (mma.cuh, about fp32's accuracy: these are batch
// statistics and gradients); the k x k stencils, the BN epilogues and the per-channel sums stay on
// the CUDA cores. Used by train_cuda.cu, whose CUDA-core train_pass_kernel serves fp64, H > 16 and
// the shapes whose planes do not fit in shared memory.
//
// The tiles of refine_eval's tensor-core kernels (refine_eval_tc.cuh): a block of 8 warps, 8 rows x
// 32 columns of one image's maps, grid-stride over (image, row tile, column tile). A's halo planes
// (halo hE = hY + p, hY = p in the passes that need gY2 around the centre for dw's transpose, else
// 0) and, in the gradient passes, gY3's (halo hY) sit in shared memory. Per chunk of 16 expanded
// channels:
//  a. U = W_exp A (tensor cores) and E = relu6(s1 (U - m1) + b1) on the halo-hE planes, 0 off the
//     map (without expansion E = A); U on the centre kept for BN1's backward (in the centre planes,
//     which gE1 or gU then replaces pixel by pixel). Gradient passes:
//     W_pro^T gY3 on the halo-hY planes (tensor cores, M = channels).
//  b. Y2 = dw_k(E) (CUDA cores): Y2Moments and ProGrad keep it on the centre, Y3 and ProGrad keep
//     D = relu6(s2 (Y2 - m2) + b2) there; ProGrad gates gD2 by relu6'(D); DwGrad and ExpGrad form
//     gY2 = k2 ((gD2 - c22 (Y2 - m2)) - c12) on the halo-hY planes, 0 off the map.
//  c. the pass's own stage:
//     Y2Moments  per channel: the tile's mean, then its centred squares, merged (Chan) into the slots
//     Y3         Y3 += W_pro D (tensor cores, M = 16 heads, accumulators live across the chunks)
//     ProGrad    gw_pro += sum_pix gY3 D (tensor cores, K = pixels); BN2's sum gD2, sum gD2 (Y2 - m2)
//     DwGrad     gE = dw_k^T(gY2), gE1 = gE where 0 < E < 6; gw_dw's k^2 taps, BN1's sum gE1 and
//                sum gE1 (U - m1); without expansion gA += gE
//     ExpGrad    gU = BN1's backward of gE1; gA += W_exp^T gU (tensor cores), gw_exp += sum_pix gU A
// Every sum over pixels goes to its slot (TrainSlots, train_slots.cuh) in the block's own fp64 row of
// gpart (zeroed by the host), added by one fixed thread between barriers: deterministic, no atomics.
#pragma once

#include "cuda/tc_tiles.cuh"
#include "cuda/train_slots.cuh"

namespace refiner {
namespace {

// Shared memory of a block: fp64 scratch of the sliced sums, then float buffers (offsets in floats).
struct TrainTcLayout {
  TcPlane PE, PY;  // the halo-hE planes (A, E) and the halo-hY planes (gY3, gD2, gY2)
  int nsl, nd;     // doubles: the sliced sums' scratch (nsl, tc_sliced_sums), then the pass's own
                   // (Y2Moments: 16 per-channel means; DwGrad: the warps' partial BN1 sums)
  int64_t ab, eb, g3b, gyb, y2c, cen, scr, total;
  __host__ __device__ TrainTcLayout(int pass, bool expand, int H, int k)
      : PE(k, 0, (pass >= (int)TrainPass::DwGrad ? k / 2 : 0) + k / 2),
        PY(k, 0, pass >= (int)TrainPass::DwGrad ? k / 2 : 0) {
    const bool grad = pass >= (int)TrainPass::ProGrad, dw_t = pass >= (int)TrainPass::DwGrad;
    const int items = pass == (int)TrainPass::Y2Moments ? 16
                      : pass == (int)TrainPass::ProGrad ? 32
                      : pass == (int)TrainPass::DwGrad  ? 16 * k * k
                                                        : 0;
    nsl = items > kTcThreads ? items : kTcThreads;
    nd = nsl + (pass == (int)TrainPass::Y2Moments ? 16 : pass == (int)TrainPass::DwGrad && expand ? 32 * kTcWarps : 0);
    int64_t o = 2 * nd;
    auto take = [&](int64_t n) { const int64_t at = o; o += n; return at; };
    ab = take(H * PE.PLP);
    eb = take(expand ? 16 * PE.PLP : 0);
    g3b = take(grad ? H * PY.PLP : 0);
    gyb = take(grad ? 16 * PY.PLP : 0);
    y2c = take(pass == (int)TrainPass::Y2Moments || pass == (int)TrainPass::ProGrad ? 16 * kTcLdc : 0);
    cen = take(pass == (int)TrainPass::Y2Moments ? 0 : 16 * kTcLdc);
    scr = take(pass == (int)TrainPass::ProGrad || pass == (int)TrainPass::ExpGrad ? kTcWarps * 128 : 0);
    total = o;
  }
};

inline size_t train_tc_smem(int pass, bool expand, int64_t H, int k) {
  return sizeof(float) * TrainTcLayout(pass, expand, (int)H, k).total;
}

template <int K, int kPass>
__global__ void __launch_bounds__(kTcThreads, 2)
    train_pass_tc_kernel(const float* __restrict__ A, float* __restrict__ map, float* __restrict__ gA,
                         TrainW<float> w, bool expand, int64_t B, int H, int64_t N, int rH, TrainSlots sl,
                         double* __restrict__ gpart) {
  constexpr bool moments = kPass == (int)TrainPass::Y2Moments, y3 = kPass == (int)TrainPass::Y3,
                 pro = kPass == (int)TrainPass::ProGrad, dwg = kPass == (int)TrainPass::DwGrad,
                 expg = kPass == (int)TrainPass::ExpGrad, dw_t = dwg || expg, grad = pro || dw_t;
  constexpr int p = K / 2, KK = K * K, hY = dw_t ? p : 0, hE = hY + p;
  RF_DYN_SHARED(float, sm);
  const TrainTcLayout Ly(kPass, expand, H, K);
  const int ldE = Ly.PE.ld, PLE = Ly.PE.PL, PLPE = Ly.PE.PLP, ldY = Ly.PY.ld, PLY = Ly.PY.PL, PLPY = Ly.PY.PLP;
  double* ipart = reinterpret_cast<double*>(sm);
  double* cmean = ipart + Ly.nsl;  // Y2Moments: the tile's per-channel means
  double* bn1w = ipart + Ly.nsl;   // DwGrad: sum gE1 and sum gE1 (U - m1) of channel cl, warp w at 2 (cl kTcWarps + w)
  float *ab = sm + Ly.ab, *eb = sm + Ly.eb, *g3b = sm + Ly.g3b, *gyb = sm + Ly.gyb,
        *y2c = sm + Ly.y2c, *cen = sm + Ly.cen, *scr = sm + Ly.scr;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const MmaLane L{lane >> 2, lane & 3};
  const int y0 = warp / (kTcCols / 8) * kTcGroups, xb = warp % (kTcCols / 8) * 8;  // tc_mix_centre's pixels
  const int sum_n0 = warp / (kTcWarps / 2) * 8, sum_row0 = warp % (kTcWarps / 2) * 2;  // tc_pixel_product's
  double* gp = gpart + blockIdx.x * sl.n;
  const int64_t ntr = (N + kTcRows - 1) / kTcRows, ntc = (N + kTcCols - 1) / kTcCols, NN = N * N;
  for (int64_t blk = blockIdx.x; blk < B * ntr * ntc; blk += gridDim.x) {
    const int64_t b = blk / (ntr * ntc), r0 = blk % (ntr * ntc) / ntc * kTcRows, c0 = blk % ntc * kTcCols;
    const auto inmap = [&](int y, int x) { return tc_inmap(N, r0 + y, c0 + x); };  // centre coordinates
    tc_load_planes(ab, A + b * H * NN, H, N, r0 - hE, c0 - hE, ldE, PLE, PLPE);
    if (grad) tc_load_planes(g3b, map + b * H * NN, H, N, r0 - hY, c0 - hY, ldY, PLY, PLPY);
    __syncthreads();
    float acc[kTcGroups][4] = {};  // Y3, or gA's expansion path: head g + 8 (r / 2), pixel (y0 + i, xb + 2 t + r % 2)
    for (int cb = 0; cb < rH; cb += 16) {
      const float* src = expand ? eb : ab + cb * PLPE;  // the stencil's input: plane cl at src + cl PLPE
      // a. U and E on the halo-hE planes; the gradient passes' W_pro^T gY3 on the halo-hY planes
      if (expand)
        tc_mix_chunk<true>(
            ab, H, PLPE, [&](int m, int h) { return cb + m < rH && h < H ? w.w_exp[(cb + m) * H + h] : 0.f; },
            [&](int m, int q, float u) {
              const int c = cb + m, y = q / ldE - hE, x = q % ldE - hE;
              const bool in = c < rH && q < PLE && inmap(y, x);
              eb[m * PLPE + q] = in ? relu6(w.s1[c] * (u - w.m1[c]) + w.b1[c]) : 0.f;
              if (dw_t && y >= 0 && y < kTcRows && x >= 0 && x < kTcCols) cen[m * kTcLdc + y * kTcCols + x] = u;
            });
      if (grad)
        tc_mix_chunk<true>(
            g3b, H, PLPY, [&](int m, int h) { return cb + m < rH && h < H ? w.w_pro[h * rH + cb + m] : 0.f; },
            [&](int m, int q, float v) { gyb[m * PLPY + q] = v; });
      __syncthreads();
      // b. Y2 = dw_k(E) and what the pass keeps of it (0 for the chunk's channels past rH)
      if (dw_t) {  // gY2 on the halo-hY planes (in place of gD2's ungated value)
        for (int j = threadIdx.x; j < 16 * PLY; j += blockDim.x) {
          const int cl = j / PLY, q = j % PLY, y1 = q / ldY, x1 = q % ldY, c = cb + cl;
          float gy = 0.f;
          if (c < rH && inmap(y1 - hY, x1 - hY)) {  // the stencil's top-left tap: plane (y1, x1), as hE = hY + p
            const float y2 = tc_stencil<K>(src + cl * PLPE, ldE, w.w_dw + c * KK, y1, x1) - w.m2[c];
            const float gd2 = relu6_pass(w.s2[c] * y2 + w.b2[c]) ? gyb[cl * PLPY + q] : 0.f;
            gy = w.k2[c] * ((gd2 - w.c22[c] * y2) - w.c12[c]);
          }
          gyb[cl * PLPY + q] = gy;
        }
      } else {  // on the centre: Y2 (Y2Moments, ProGrad), D (Y3, ProGrad), gD2 gated (ProGrad)
        for (int j = threadIdx.x; j < 16 * kTcPix; j += blockDim.x) {
          const int cl = j / kTcPix, q = j % kTcPix, y = q / kTcCols, x = q % kTcCols, c = cb + cl;
          const bool in = c < rH && inmap(y, x);
          const float y2 = in ? tc_stencil<K>(src + cl * PLPE, ldE, w.w_dw + c * KK, y, x) : 0.f;  // hE = p
          if (moments || pro) y2c[cl * kTcLdc + q] = y2;
          if (!moments) {
            const float pre = in ? w.s2[c] * (y2 - w.m2[c]) + w.b2[c] : 0.f;
            cen[cl * kTcLdc + q] = relu6(pre);
            if (pro) gyb[cl * PLPY + q] = relu6_pass(pre) ? gyb[cl * PLPY + q] : 0.f;  // hY = 0: q is the centre's
          }
        }
      }
      __syncthreads();
      // c. the pass's own stage
      if constexpr (moments) {  // Chan's merge of the tile's (n, mean, m2) per channel
        const int rows = N - r0 < kTcRows ? (int)(N - r0) : kTcRows, cols = N - c0 < kTcCols ? (int)(N - c0) : kTcCols;
        const double n = double(rows) * cols;
        tc_sliced_sums(
            ipart, 16,
            [&](int cl, int q0, int q1) {
              double s = 0;
              for (int q = q0; q < q1; ++q) s += y2c[cl * kTcLdc + q];  // 0 off the map
              return s;
            },
            [&](int cl, double s) { cmean[cl] = s / n; });
        tc_sliced_sums(
            ipart, 16,
            [&](int cl, int q0, int q1) {
              double s = 0;
              for (int q = q0; q < q1; ++q)
                if (inmap(q / kTcCols, q % kTcCols)) {
                  const double dv = y2c[cl * kTcLdc + q] - cmean[cl];
                  s += dv * dv;
                }
              return s;
            },
            [&](int cl, double m2) {
              const int c = cb + cl;
              if (c < rH) chan_merge(gp[3 * c], gp[3 * c + 1], gp[3 * c + 2], n, cmean[cl], m2);
            });
      } else if constexpr (y3) {
        tc_mix_centre(acc, cen, y0, xb,
                      [&](int h, int k) { return cb + k < rH && h < H ? w.w_pro[h * rH + cb + k] : 0.f; });
      } else if constexpr (pro) {  // gw_pro[h, c] (tensor cores), BN2's sums (CUDA cores)
        tc_pixel_product(
            scr, sum_n0, sum_row0, [&](int h, int y, int x) { return h < H ? g3b[h * PLPY + y * kTcCols + x] : 0.f; },
            [&](int cl, int y, int x) { return cen[cl * kTcLdc + y * kTcCols + x]; });
        tc_sliced_sums(
            ipart, 32,
            [&](int it, int q0, int q1) {
              const int cl = it % 16;
              const float m2 = cb + cl < rH ? w.m2[cb + cl] : 0.f;
              double s = 0;
              for (int q = q0; q < q1; ++q) {
                const float g = gyb[cl * PLPY + q];
                s += it < 16 ? double(g) : double(g) * (y2c[cl * kTcLdc + q] - m2);
              }
              return s;
            },
            [&](int it, double s) {
              const int c = cb + it % 16;
              if (c < rH) gp[(it < 16 ? sl.sg : sl.sgx) + c] += s;
            });
        tc_unstash(scr, [&](int h, int cl, float v) {
          if (h < H && cb + cl < rH) gp[sl.gw + h * rH + cb + cl] += v;
        });
      } else {  // DwGrad, ExpGrad: gE = dw_k^T(gY2) on the centre (gY2 at (y - (i - p), x - (j - p)))
        // Thread q owns pixel q of every channel: U (cen, from step a) is read where gE1 or gU goes,
        // and DwGrad's BN1 sums are warp sums (fp64 shuffles), not planes
        static_assert(kTcThreads == kTcPix, "a thread per centre pixel");
        const int q = threadIdx.x, y = q / kTcCols, x = q % kTcCols;
        for (int cl = 0; cl < 16; ++cl) {
          const int c = cb + cl;
          float g = 0.f, gxu = 0.f;  // gE (gE1, gU) and gE1 (U - m1)
          if (c < rH && inmap(y, x)) {
            g = tc_stencil<K, -1>(gyb + cl * PLPY, ldY, w.w_dw + c * KK, y + 2 * p, x + 2 * p);
            if (expand) {
              const float um = cen[cl * kTcLdc + q] - w.m1[c];
              if (!relu6_pass(eb[cl * PLPE + (y + hE) * ldE + x + hE])) g = 0.f;
              gxu = g * um;
              if (expg) g = w.k1[c] * ((g - w.c21[c] * um) - w.c11[c]);
            } else {  // no expansion (DwGrad): gA += gE, this thread's pixel of head c
              float& dst = gA[((b * H + c) * N + r0 + y) * N + c0 + x];
              dst += g;
            }
          }
          cen[cl * kTcLdc + q] = g;
          if (dwg && expand) {
            const double sg = warp_sum(double(g)), sgx = warp_sum(double(gxu));
            if (lane == 0) bn1w[2 * (cl * kTcWarps + warp)] = sg, bn1w[2 * (cl * kTcWarps + warp) + 1] = sgx;
          }
        }
        __syncthreads();
        if constexpr (dwg) {  // per channel: BN1's two sums (the warps' partials in order), gw_dw's k^2 taps
          if (expand && threadIdx.x < 32) {
            const int cl = threadIdx.x % 16, c = cb + cl;
            double s = 0;
            for (int v = 0; v < kTcWarps; ++v) s += bn1w[2 * (cl * kTcWarps + v) + threadIdx.x / 16];
            if (c < rH) gp[(threadIdx.x < 16 ? sl.sg : sl.sgx) + c] += s;
          }
          tc_sliced_sums(
              ipart, 16 * KK,
              [&](int it, int q0, int q1) {
                const int cl = it / KK, tap = it % KK;
                if (cb + cl >= rH) return 0.0;
                const float* gy = gyb + cl * PLPY;
                const float* e = src + cl * PLPE;  // E at (y + di - p, x + dj - p): plane (y + di + hY, x + dj + hY)
                double s = 0;
                for (int q = q0; q < q1; ++q) {
                  const int y = q / kTcCols, x = q % kTcCols;
                  s += double(gy[(y + hY) * ldY + x + hY]) * e[(y + tap / K + hY) * ldE + x + tap % K + hY];
                }
                return s;
              },
              [&](int it, double s) {
                if (cb + it / KK < rH) gp[sl.gw + (cb + it / KK) * KK + it % KK] += s;
              });
        } else {  // ExpGrad: gA's expansion path += W_exp^T gU; gw_exp[c, h] += sum_pix gU_c A_h
          tc_mix_centre(acc, cen, y0, xb,
                        [&](int h, int k) { return cb + k < rH && h < H ? w.w_exp[(cb + k) * H + h] : 0.f; });
          tc_pixel_product(
              scr, sum_n0, sum_row0, [&](int cl, int y, int x) { return cen[cl * kTcLdc + y * kTcCols + x]; },
              [&](int h, int y, int x) { return h < H ? ab[h * PLPE + (y + hE) * ldE + x + hE] : 0.f; });
          __syncthreads();
          tc_unstash(scr, [&](int cl, int h, float v) {
            if (cb + cl < rH && h < H) gp[sl.gw + (cb + cl) * H + h] += v;
          });
        }
      }
      // (no barrier: each stage c reads the planes before a barrier of its own, the sliced sums' or the
      // one before ExpGrad's unstash, after which only the scratch is read; Y3's reads only the centre
      // planes, which the next chunk writes after its step a's barrier)
    }
    if (y3 || expg)  // Y3 = the accumulators; gA (holding gZ) += them
      RF_UNROLL
      for (int i = 0; i < kTcGroups; ++i)
        RF_UNROLL
        for (int r = 0; r < 4; ++r) {
          const int h = L.g + 8 * (r / 2), y = y0 + i, x = xb + 2 * L.t + r % 2;
          if (h < H && inmap(y, x)) {
            float& dst = (y3 ? map : gA)[((b * H + h) * N + r0 + y) * N + c0 + x];
            dst = y3 ? acc[i][r] : dst + acc[i][r];
          }
        }
    __syncthreads();  // the next tile overwrites A and gY3
  }
}

}  // namespace
}  // namespace refiner
