// refine_train's passes over the expanded maps on CPU, streamed by rows (cpu/train_stream.cpp):
// each pass recomputes E = relu6(BN1(W_exp A)), Y2 = dw(E), D = relu6(BN2(Y2)) row by row in
// rings of k rows, as the eval kernels do, and never writes a (B, rH, N, N) map. train.cpp calls
// them for the rH-channel stages; what is left there works on H-channel maps.
#pragma once

#include <ATen/ATen.h>

namespace refiner {
namespace cpu {

enum class TrainPass {
  Y2Moments,  // per-channel mean and sum of squared deviations of Y2 (BN2's batch statistics)
  Y3,         // writes Y3 = W_pro D into `map`
  ProGrad,    // from gY3 in `map`: gw_pro, and for BN2's backward sum gD2 and sum gD2 (Y2 - m2)
  DwGrad,     // gw_dw; with the expansion sum gE1 and sum gE1 (U - m1) for BN1's backward, without
              // it gA += gE (then final)
  ExpGrad,    // gw_exp and gA += W_exp^T gU (expansion only)
};

struct TrainStreamArgs {
  at::Tensor A;                              // (B, H, N, N), compute dtype, contiguous
  at::Tensor w_exp, w_dw, w_pro;             // (rH, H), (rH, k, k), (H, rH)
  at::Tensor s1, m1, b1, s2, m2, b2;         // BN1 (expansion only) and BN2, applied s (x - m) + b
  at::Tensor k2, c1_2, c2_2, k1, c1_1, c2_1; // BN backward g -> k ((g - c2 (x - m)) - c1): BN2 from
                                             // DwGrad on, BN1 in ExpGrad
  at::Tensor map;                            // Y3 (written by Y3) or gY3 (read by the gradient passes)
  at::Tensor gA;                             // (B, H, N, N) compute dtype: holds gZ, DwGrad / ExpGrad add
  bool expand = true;
};

struct TrainStreamSums {
  at::Tensor mean, m2;         // Y2Moments (fp64, rH); count B N N
  at::Tensor gw;               // ProGrad gw_pro (H, rH); DwGrad gw_dw (rH, k, k); ExpGrad gw_exp (rH, H)
  at::Tensor sum_g, sum_gx;    // ProGrad: BN2's sums; DwGrad (expansion): BN1's (fp64, rH; sum_gx
                               // not yet divided by the standard deviation)
};

TrainStreamSums train_stream_pass(TrainPass pass, const TrainStreamArgs& a);

}  // namespace cpu
}  // namespace refiner
