// What refine_train's two CUDA kernels for its passes share (train_cuda.cu's CUDA-core
// train_pass_kernel, train_tc.cuh's tensor-core train_pass_tc_kernel): the weights they read and
// the layout of a block's fp64 partial sums, which the host reduces the same way for both.
#pragma once

#include "cuda/cuda_common.cuh"
#include "train_pass.h"

namespace refiner {
namespace {

template <class F> struct TrainW {  // device pointers; null where the pass does not use them
  const F *w_exp, *w_dw, *w_pro, *s1, *m1, *b1, *s2, *m2, *b2, *k2, *c12, *c22, *k1, *c11, *c21;
};

// Per-block fp64 slots of a pass: Y2Moments (n, mean, m2) per channel; otherwise the weight
// gradient (gw) then BN's sum g (sg) and sum g (x - m) (sgx) per channel.
struct TrainSlots {
  int64_t gw, sg, sgx, n;
  __host__ __device__ TrainSlots(int pass, int H, int rH, int k) {
    const int64_t ngw = pass == (int)TrainPass::ProGrad  ? (int64_t)H * rH
                        : pass == (int)TrainPass::DwGrad ? (int64_t)rH * k * k
                        : pass == (int)TrainPass::ExpGrad ? (int64_t)rH * H
                                                          : 0;
    gw = 0, sg = ngw, sgx = ngw + rH;
    n = pass == (int)TrainPass::Y2Moments ? 3 * (int64_t)rH : pass == (int)TrainPass::Y3 ? 0 : ngw + 2 * rH;
  }
};

}  // namespace
}  // namespace refiner
