// Per-op argument validation (device independent), used by the CPU and CUDA entry points.
#pragma once

#include <cmath>

#include "checks.h"

namespace refiner {

inline void validate_softmax_block(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const c10::optional<at::Tensor>& prev, double scale) {
  const char* op = "softmax_block";
  check_dim(op, "q", q, 4, "(B, H, N, d)");
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3);
  TORCH_CHECK(B >= 1 && H >= 1 && N >= 1, op, ": q must be non-empty, got ", shape_str(q));
  check_head_dim(op, "q", q, d);
  check_shape(op, "k", k, {B, H, N, d}, "(B, H, N, d)");
  check_shape(op, "v", v, {B, H, N, d}, "(B, H, N, d)");
  if (prev.has_value() && prev->defined()) {
    check_shape(op, "prev_attn", *prev, {B, H, N, N}, "(B, H, N, N)");
    check_common(op, {{"q", &q}, {"k", &k}, {"v", &v}, {"prev_attn", &*prev}});
  } else {
    check_common(op, {{"q", &q}, {"k", &k}, {"v", &v}});
  }
  TORCH_CHECK(std::isfinite(scale) && scale > 0, op, ": scale must be a positive finite number, got ", scale);
}

// Per-channel parameters (biases, BN affines): each a vector of n values; layout "(rH)" or "(H)".
inline void check_vectors(const char* op, std::initializer_list<NamedT> ts, int64_t n, const char* layout) {
  for (const auto& nt : ts) check_shape(op, nt.name, *nt.t, {n}, layout);
}

inline void validate_refine_eval(const at::Tensor& attn, const at::Tensor& v, const at::Tensor& w_exp,
                                 const at::Tensor& b_exp, const at::Tensor& w_dw, const at::Tensor& b_dw,
                                 const at::Tensor& w_pro, const at::Tensor& b_pro,
                                 const at::Tensor& alpha, const at::Tensor& beta, bool expand) {
  const char* op = "refine_eval";
  int64_t rH, k;
  check_refine_shapes(op, attn, v, w_exp, w_dw, w_pro, expand, rH, k);
  check_vectors(op, {{"b_exp", &b_exp}, {"b_dw", &b_dw}}, rH, "(rH)");
  check_vectors(op, {{"b_pro", &b_pro}, {"alpha", &alpha}, {"beta", &beta}}, attn.size(1), "(H)");
  check_common(op, {{"attn", &attn}, {"v", &v}, {"w_exp", &w_exp}, {"b_exp", &b_exp},
                    {"w_dw", &w_dw}, {"b_dw", &b_dw}, {"w_pro", &w_pro}, {"b_pro", &b_pro},
                    {"alpha", &alpha}, {"beta", &beta}});
}

// Returns rH (expanded channels).
inline int64_t validate_refine_train(const at::Tensor& attn, const at::Tensor& v, const at::Tensor& w_exp,
                                     const at::Tensor& w_dw, const at::Tensor& w_pro, const at::Tensor& g1,
                                     const at::Tensor& b1, const at::Tensor& g2, const at::Tensor& b2,
                                     const at::Tensor& g3, const at::Tensor& b3, const at::Tensor& ga,
                                     const at::Tensor& ba, double eps, bool expand) {
  const char* op = "refine_train";
  int64_t rH, k;
  check_refine_shapes(op, attn, v, w_exp, w_dw, w_pro, expand, rH, k);
  check_vectors(op, {{"g1", &g1}, {"b1", &b1}, {"g2", &g2}, {"b2", &b2}}, rH, "(rH)");
  check_vectors(op, {{"g3", &g3}, {"b3", &b3}, {"ga", &ga}, {"ba", &ba}}, attn.size(1), "(H)");
  check_common(op, {{"attn", &attn}, {"v", &v}, {"w_exp", &w_exp}, {"w_dw", &w_dw}, {"w_pro", &w_pro},
                    {"g1", &g1}, {"b1", &b1}, {"g2", &g2}, {"b2", &b2}, {"g3", &g3}, {"b3", &b3},
                    {"ga", &ga}, {"ba", &ba}});
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
  return rH;
}

// Compute dtype of the drivers: fp64 stays fp64 (CPU gradcheck), everything else runs in fp32.
inline at::ScalarType compute_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// refine_train_backward's y3: the forward's Y3 (B, H, N, N) in the compute dtype (float32, float64
// for float64 maps), or an empty tensor (the backward recomputes it).
inline void check_saved_y3(const char* op, const at::Tensor& y3, const at::Tensor& attn) {
  if (y3.numel() == 0) return;
  TORCH_CHECK(y3.sizes() == attn.sizes(), op, ": y3 must be empty or have attn's shape ", shape_str(attn), ", got ",
              shape_str(y3));
  const auto ct = compute_type(attn);
  TORCH_CHECK(y3.scalar_type() == ct, op, ": y3 must have dtype ", ct, " (attn's compute dtype), got ",
              y3.scalar_type());
  TORCH_CHECK(y3.device() == attn.device(), op, ": y3 is on ", y3.device(), " but attn is on ", attn.device());
  TORCH_CHECK(y3.is_contiguous(), op, ": y3 must be contiguous");
}

inline void validate_grad(const char* op, const char* name, const at::Tensor& g, const at::Tensor& like) {
  TORCH_CHECK(g.sizes() == like.sizes(), op, ": ", name, " must have shape ", shape_str(like),
              ", got ", shape_str(g));
  check_common(op, {{name, &g}, {"input", &like}});
}

inline void validate_map(const char* op, const char* name, const at::Tensor& x) {
  check_dim(op, name, x, 4, "(B, C, N, M)");
  check_common(op, {{name, &x}});
}

inline void validate_head_mix(const at::Tensor& x, const at::Tensor& w) {
  const char* op = "head_mix";
  validate_map(op, "x", x);
  check_dim(op, "w", w, 2, "(C2, C)");
  TORCH_CHECK(w.size(1) == x.size(1), op, ": w must have shape (C2, C) with C = x.size(1) = ",
              x.size(1), ", got ", shape_str(w));
  check_common(op, {{"x", &x}, {"w", &w}});
}

inline void validate_attn_dwconv(const at::Tensor& x, const at::Tensor& w) {
  const char* op = "attn_dwconv";
  validate_map(op, "x", x);
  check_dim(op, "w", w, 3, "(C, k, k)");
  TORCH_CHECK(w.size(0) == x.size(1) && w.size(1) == w.size(2), op,
              ": w must have shape (C, k, k) with C = x.size(1) = ", x.size(1), ", got ", shape_str(w));
  check_kernel(op, "w", w.size(1));
  check_common(op, {{"x", &x}, {"w", &w}});
}

inline void validate_attn_value(const at::Tensor& a, const at::Tensor& v) {
  const char* op = "attn_value";
  check_dim(op, "a", a, 4, "(B, H, N, M)");
  check_dim(op, "v", v, 4, "(B, H, M, d)");
  TORCH_CHECK(v.size(0) == a.size(0) && v.size(1) == a.size(1) && v.size(2) == a.size(3), op,
              ": v must have shape (B, H, M, d) = (", a.size(0), ", ", a.size(1), ", ", a.size(3),
              ", d) to match a ", shape_str(a), ", got ", shape_str(v));
  check_head_dim(op, "v", v, v.size(3));
  check_common(op, {{"a", &a}, {"v", &v}});
}

inline void validate_row_softmax(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, "row_softmax: x must have at least 1 dim, got a 0-D tensor");
  check_common("row_softmax", {{"x", &x}});
}

}  // namespace refiner
