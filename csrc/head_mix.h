// The 1x1 head mix as matrix products over (n, C, P) maps, shared by the head_mix building block
// (ops.cpp) and refine_train (train.cpp).
#pragma once

#include <ATen/ATen.h>

#include "cpu/portable.h"

namespace refiner {

// y[b] = w @ x[b]: x (n, C, P), w (C2, C) -> (n, C2, P). On CPU one mm per image: matmul folds a
// 2-D @ 3-D product through a transposed copy of x, which costs more than the product itself.
inline at::Tensor mix_images(const at::Tensor& w, const at::Tensor& x) {
  if (!cpu_kernels(x)) return at::matmul(w, x);
  auto out = at::empty({x.size(0), w.size(0), x.size(2)}, x.options());
  for (int64_t i = 0; i < x.size(0); ++i) {
    auto oi = out[i];
    at::mm_out(oi, w, x[i]);
  }
  return out;
}

// sum over images of g[b] x[b]^T: g (n, C2, P), x (n, C, P) -> (C2, C). On CPU per image, BLAS
// taking x^T as a transposed operand (bmm would copy it), summed in image order.
inline at::Tensor mix_images_wgrad(const at::Tensor& g, const at::Tensor& x) {
  if (!cpu_kernels(x)) return at::bmm(g, x.transpose(1, 2)).sum(0);
  at::Tensor out = at::mm(g[0], x[0].t());
  for (int64_t i = 1; i < x.size(0); ++i) out.addmm_(g[i], x[i].t());
  return out;
}

}  // namespace refiner
