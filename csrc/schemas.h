// Schemas of the refiner ops with a CPU or CUDA kernel (refine_train's are in train.cpp). One
// definition for torch.ops.refiner (ops.cpp) and for the CUDA emulator's test library.
#pragma once

#include <torch/library.h>

namespace refiner {

inline void define_kernel_ops(torch::Library& m) {
  m.def("softmax_block(Tensor q, Tensor k, Tensor v, Tensor? prev_attn, float scale) -> (Tensor, Tensor)");
  // Returns grad q, k, v and the total gradient of attn (grad of prev_attn = scale * it).
  m.def("softmax_block_backward(Tensor grad_out, Tensor grad_attn, Tensor q, Tensor k, Tensor v, "
        "Tensor attn, float scale) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("refine_eval(Tensor attn, Tensor v, Tensor w_exp, Tensor b_exp, Tensor w_dw, Tensor b_dw, "
        "Tensor w_pro, Tensor b_pro, Tensor alpha, Tensor beta, bool expand) -> Tensor");
  // Recomputing backward; returns grads of attn, v, w_exp, b_exp, w_dw, b_dw, w_pro, b_pro, alpha, beta.
  m.def("refine_eval_backward(Tensor grad_out, Tensor attn, Tensor v, Tensor w_exp, Tensor b_exp, "
        "Tensor w_dw, Tensor b_dw, Tensor w_pro, Tensor b_pro, Tensor alpha, Tensor beta, bool expand) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("head_mix(Tensor x, Tensor w) -> Tensor");
  m.def("head_mix_backward(Tensor grad, Tensor x, Tensor w) -> (Tensor, Tensor)");
  m.def("attn_dwconv(Tensor x, Tensor w) -> Tensor");
  m.def("attn_dwconv_backward(Tensor grad, Tensor x, Tensor w) -> (Tensor, Tensor)");
  m.def("row_softmax(Tensor x) -> Tensor");
  m.def("row_softmax_backward(Tensor grad, Tensor y) -> Tensor");
  m.def("attn_value(Tensor a, Tensor v) -> Tensor");
  m.def("attn_value_backward(Tensor grad, Tensor a, Tensor v) -> (Tensor, Tensor)");
  // refine_train's passes over the expanded maps (train_pass.h; private): params are w_exp, w_dw,
  // w_pro, s1, m1, b1, s2, m2, b2, k2, c1_2, c2_2, k1, c1_1, c2_1; returns mean, m2, gw, sum_g, sum_gx.
  m.def("_train_pass(int which, Tensor A, Tensor?[] params, Tensor(a!)? map, Tensor(b!)? gA, bool expand) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

}  // namespace refiner
