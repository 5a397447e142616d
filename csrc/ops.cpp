// The refiner op library (schemas: schemas.h), its device-generic ops, and the Python module stub.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "head_mix.h"
#include "schemas.h"
#include "validate.h"

namespace refiner {

bool has_cuda() {
#ifdef REFINER_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// head_mix / attn_value are thin matmul ops (MKL / cuBLAS through ATen), fp32 accumulation.
static at::Tensor head_mix_impl(const at::Tensor& x, const at::Tensor& w) {
  validate_head_mix(x, w);
  const auto ct = compute_type(x);
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2), M = x.size(3);
  auto y = mix_images(w.to(ct), x.to(ct).reshape({B, C, N * M}));
  return y.reshape({B, w.size(0), N, M}).to(x.scalar_type()).contiguous();
}

static std::tuple<at::Tensor, at::Tensor> head_mix_backward_impl(const at::Tensor& g, const at::Tensor& x,
                                                                 const at::Tensor& w) {
  validate_head_mix(x, w);
  const auto ct = compute_type(x);
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2), M = x.size(3), C2 = w.size(0);
  TORCH_CHECK(g.dim() == 4 && g.size(0) == B && g.size(1) == C2 && g.size(2) == N && g.size(3) == M,
              "head_mix_backward: grad must have shape (B, C2, N, M), got ", shape_str(g));
  auto gf = g.to(ct).reshape({B, C2, N * M});
  auto xf = x.to(ct).reshape({B, C, N * M});
  auto gx = mix_images(w.to(ct).t(), gf).reshape({B, C, N, M});
  auto gw = mix_images_wgrad(gf, xf);
  return {gx.to(x.scalar_type()).contiguous(), gw.to(w.scalar_type()).contiguous()};
}

static at::Tensor attn_value_impl(const at::Tensor& a, const at::Tensor& v) {
  validate_attn_value(a, v);
  const auto ct = compute_type(a);
  return at::matmul(a.to(ct), v.to(ct)).to(a.scalar_type()).contiguous();
}

static std::tuple<at::Tensor, at::Tensor> attn_value_backward_impl(const at::Tensor& g, const at::Tensor& a,
                                                                   const at::Tensor& v) {
  validate_attn_value(a, v);
  const auto ct = compute_type(a);
  TORCH_CHECK(g.dim() == 4 && g.size(0) == a.size(0) && g.size(1) == a.size(1) && g.size(2) == a.size(2) &&
                  g.size(3) == v.size(3),
              "attn_value_backward: grad must have shape (B, H, N, d), got ", shape_str(g));
  auto gf = g.to(ct);
  auto ga = at::matmul(gf, v.to(ct).transpose(-2, -1));
  auto gv = at::matmul(a.to(ct).transpose(-2, -1), gf);
  return {ga.to(a.scalar_type()).contiguous(), gv.to(v.scalar_type()).contiguous()};
}

}  // namespace refiner

TORCH_LIBRARY(refiner, m) {
  m.def("has_cuda() -> bool", &refiner::has_cuda);
  refiner::define_kernel_ops(m);
}

TORCH_LIBRARY_IMPL(refiner, CPU, m) {
  m.impl("head_mix", &refiner::head_mix_impl);
  m.impl("head_mix_backward", &refiner::head_mix_backward_impl);
  m.impl("attn_value", &refiner::attn_value_impl);
  m.impl("attn_value_backward", &refiner::attn_value_backward_impl);
}

TORCH_LIBRARY_IMPL(refiner, CUDA, m) {
  m.impl("head_mix", &refiner::head_mix_impl);
  m.impl("head_mix_backward", &refiner::head_mix_backward_impl);
  m.impl("attn_value", &refiner::attn_value_impl);
  m.impl("attn_value_backward", &refiner::attn_value_backward_impl);
}

// `import refiner._C` loads this library (and so runs the registrations above).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "refiner custom ops (torch.ops.refiner)",
                                   -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
