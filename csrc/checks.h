// Argument validation shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <string>
#include <vector>

namespace refiner {

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + ")";
}

struct NamedT {
  const char* name;
  const at::Tensor* t;
};

// dtype (fp32/fp16/bf16, + fp64 on CPU), one dtype and one device for all.
inline void check_common(const char* op, std::initializer_list<NamedT> ts) {
  const at::Tensor* first = nullptr;
  const char* first_name = nullptr;
  for (const auto& nt : ts) {
    const at::Tensor& t = *nt.t;
    TORCH_CHECK(t.defined(), op, ": ", nt.name, " is undefined");
    const auto st = t.scalar_type();
    const bool ok = st == at::kFloat || st == at::kHalf || st == at::kBFloat16 ||
                    (st == at::kDouble && t.device().is_cpu());
    TORCH_CHECK(ok, op, ": ", nt.name, " must be float32, float16 or bfloat16",
                " (float64 on CPU only), got ", st, " on ", t.device());
    if (!first) {
      first = &t;
      first_name = nt.name;
      continue;
    }
    TORCH_CHECK(st == first->scalar_type(), op, ": ", nt.name, " has dtype ", st, " but ",
                first_name, " has dtype ", first->scalar_type(), " (all tensors must share one dtype)");
    TORCH_CHECK(t.device() == first->device(), op, ": ", nt.name, " is on ", t.device(), " but ",
                first_name, " is on ", first->device(), " (all tensors must be on one device)");
  }
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                      const char* layout) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D ", layout, ", got ",
              t.dim(), "-D tensor of shape ", shape_str(t));
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t,
                        std::vector<int64_t> want, const char* layout) {
  check_dim(op, name, t, (int64_t)want.size(), layout);
  bool ok = true;
  for (size_t i = 0; i < want.size(); ++i) ok = ok && t.size((int64_t)i) == want[i];
  std::string w = "(";
  for (size_t i = 0; i < want.size(); ++i) w += (i ? ", " : "") + std::to_string(want[i]);
  w += ")";
  TORCH_CHECK(ok, op, ": ", name, " must have shape ", layout, " = ", w, ", got ", shape_str(t));
}

constexpr int64_t kMaxHeadDimCuda = 128;

inline void check_head_dim(const char* op, const char* name, const at::Tensor& t, int64_t d) {
  TORCH_CHECK(d >= 1, op, ": ", name, " head size must be >= 1, got ", d);
  if (t.is_cuda())
    TORCH_CHECK(d <= kMaxHeadDimCuda, op, ": ", name, " head size must be <= ", kMaxHeadDimCuda,
                " on CUDA, got ", d);
}

inline void check_kernel(const char* op, const char* name, int64_t k) {
  TORCH_CHECK(k >= 1 && k <= 7 && k % 2 == 1, op, ": ", name,
              " kernel size must be odd and in 1..7, got ", k);
}

// Shapes of refine_eval / refine_train parameters; returns rH and k.
inline void check_refine_shapes(const char* op, const at::Tensor& attn, const at::Tensor& v,
                                const at::Tensor& w_exp, const at::Tensor& w_dw,
                                const at::Tensor& w_pro, bool expand, int64_t& rH, int64_t& k) {
  check_dim(op, "attn", attn, 4, "(B, H, N, N)");
  const int64_t B = attn.size(0), H = attn.size(1), N = attn.size(2);
  TORCH_CHECK(attn.size(3) == N, op, ": attn must be square in its last two dims (B, H, N, N), got ",
              shape_str(attn));
  TORCH_CHECK(B >= 1 && H >= 1 && N >= 1, op, ": attn must be non-empty, got ", shape_str(attn));
  check_dim(op, "v", v, 4, "(B, H, N, d)");
  TORCH_CHECK(v.size(0) == B && v.size(1) == H && v.size(2) == N, op,
              ": v must have shape (B, H, N, d) = (", B, ", ", H, ", ", N, ", d) to match attn ",
              shape_str(attn), ", got ", shape_str(v));
  check_head_dim(op, "v", v, v.size(3));
  check_dim(op, "w_dw", w_dw, 3, "(rH, k, k)");
  rH = w_dw.size(0);
  k = w_dw.size(1);
  TORCH_CHECK(w_dw.size(2) == k, op, ": w_dw must be (rH, k, k) with a square kernel, got ",
              shape_str(w_dw));
  check_kernel(op, "w_dw", k);
  TORCH_CHECK(rH % H == 0 && rH / H >= 1 && rH / H <= 6, op,
              ": expansion: w_dw.size(0) = rH must be a multiple r*H of H = ", H,
              " with ratio r in 1..6, got rH = ", rH);
  if (!expand)
    TORCH_CHECK(rH == H, op, ": with expand=False the hidden width must equal H = ", H,
                ", got w_dw of shape ", shape_str(w_dw));
  check_shape(op, "w_exp", w_exp, {rH, H}, "(rH, H)");
  check_shape(op, "w_pro", w_pro, {H, rH}, "(H, rH)");
}

}  // namespace refiner
