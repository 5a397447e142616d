// refine_train's passes over the expanded (rH-channel) maps, one backend-neutral interface. Each
// pass recomputes E = relu6(BN1(W_exp A)), Y2 = dw(E), D = relu6(BN2(Y2)) from A tile by tile (or
// row by row) and never writes a (B, rH, N, N) map; train.cpp calls them for the rH-channel stages.
// Implementations: cpu/train_stream.cpp (CPU, rows in rings) and cuda/train_cuda.cu (CUDA, tiles in
// shared memory), registered as the private op refiner::_train_pass, which train.cpp calls through
// the dispatcher (tests can point it at the CUDA emulator's registration, see train_pass()).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <utility>
#include <tuple>
#include <vector>

namespace refiner {

enum class TrainPass : int64_t {
  Y2Moments = 0,  // per-channel mean and sum of squared deviations of Y2 (BN2's batch statistics)
  Y3,             // writes Y3 = W_pro D into `map`
  ProGrad,        // from gY3 in `map`: gw_pro, and for BN2's backward sum gD2 and sum gD2 (Y2 - m2)
  DwGrad,         // gw_dw; with the expansion sum gE1 and sum gE1 (U - m1) for BN1's backward, without
                  // it gA += gE (then final)
  ExpGrad,        // gw_exp and gA += W_exp^T gU (expansion only)
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

// One pass on a's device, through refiner::_train_pass. REFINER_TRAIN_PASS_OP=ns::name (tests)
// calls another registration of the same schema instead (the CUDA emulator's, for CPU tensors).
TrainStreamSums train_pass(TrainPass pass, const TrainStreamArgs& a);

// ---- the op's boxed form (schema in schemas.h): the tensors as a list, the sums as a tuple
using TrainPassOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using TrainPassFn = TrainStreamSums (*)(TrainPass, const TrainStreamArgs&);

using TensorList = c10::List<c10::optional<at::Tensor>>;

// The tensors a pass reads or writes are all given.
inline void check_train_args(TrainPass pass, const TrainStreamArgs& a) {
  const bool dw_t = pass >= TrainPass::DwGrad;
  const std::pair<const at::Tensor*, const char*> need[] = {
      {&a.w_dw, "w_dw"}, {a.expand ? &a.w_exp : nullptr, "w_exp"}, {a.expand ? &a.s1 : nullptr, "s1"},
      {a.expand ? &a.m1 : nullptr, "m1"}, {a.expand ? &a.b1 : nullptr, "b1"},
      {pass != TrainPass::Y2Moments ? &a.w_pro : nullptr, "w_pro"}, {pass != TrainPass::Y2Moments ? &a.s2 : nullptr, "s2"},
      {pass != TrainPass::Y2Moments ? &a.m2 : nullptr, "m2"}, {pass != TrainPass::Y2Moments ? &a.b2 : nullptr, "b2"},
      {pass != TrainPass::Y2Moments ? &a.map : nullptr, "map"}, {dw_t ? &a.k2 : nullptr, "k2"},
      {dw_t ? &a.c1_2 : nullptr, "c1_2"}, {dw_t ? &a.c2_2 : nullptr, "c2_2"},
      {pass == TrainPass::ExpGrad ? &a.k1 : nullptr, "k1"}, {pass == TrainPass::ExpGrad ? &a.c1_1 : nullptr, "c1_1"},
      {pass == TrainPass::ExpGrad ? &a.c2_1 : nullptr, "c2_1"},
      {pass == TrainPass::ExpGrad || (pass == TrainPass::DwGrad && !a.expand) ? &a.gA : nullptr, "gA"}};
  for (const auto& [t, name] : need)
    TORCH_CHECK(!t || t->defined(), "_train_pass: pass ", (int64_t)pass, " needs ", name);
  TORCH_CHECK(a.A.dim() == 4 && a.w_dw.dim() == 3, "_train_pass: A must be (B, H, N, N) and w_dw (rH, k, k)");
}

inline TrainStreamArgs unpack_train_args(TrainPass pass, const at::Tensor& A, const TensorList& t,
                                         const c10::optional<at::Tensor>& map, const c10::optional<at::Tensor>& gA,
                                         bool expand) {
  TORCH_CHECK(t.size() == 15, "_train_pass: expected 15 optional parameter tensors, got ", t.size());
  auto g = [&](size_t i) -> at::Tensor {
    c10::optional<at::Tensor> o = t.get(i);
    return o.has_value() ? *o : at::Tensor();
  };
  TrainStreamArgs a;
  a.A = A, a.expand = expand;
  a.w_exp = g(0), a.w_dw = g(1), a.w_pro = g(2), a.s1 = g(3), a.m1 = g(4), a.b1 = g(5), a.s2 = g(6), a.m2 = g(7);
  a.b2 = g(8), a.k2 = g(9), a.c1_2 = g(10), a.c2_2 = g(11), a.k1 = g(12), a.c1_1 = g(13), a.c2_1 = g(14);
  if (map.has_value()) a.map = *map;
  if (gA.has_value()) a.gA = *gA;
  check_train_args(pass, a);
  return a;
}

inline c10::optional<at::Tensor> as_optional(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}
inline TensorList pack_train_params(const TrainStreamArgs& a) {
  TensorList l;
  for (const at::Tensor* t : {&a.w_exp, &a.w_dw, &a.w_pro, &a.s1, &a.m1, &a.b1, &a.s2, &a.m2, &a.b2, &a.k2, &a.c1_2,
                              &a.c2_2, &a.k1, &a.c1_1, &a.c2_1})
    l.push_back(as_optional(*t));
  return l;
}

// The op's kernel from a backend's pass function (undefined sums become empty tensors).
template <TrainPassFn Fn>
TrainPassOut train_pass_op(int64_t pass, const at::Tensor& A, const TensorList& params,
                           const c10::optional<at::Tensor>& map, const c10::optional<at::Tensor>& gA, bool expand) {
  TORCH_CHECK(pass >= 0 && pass <= (int64_t)TrainPass::ExpGrad, "_train_pass: pass must be in [0, 4], got ", pass);
  const TrainStreamSums s = Fn((TrainPass)pass, unpack_train_args((TrainPass)pass, A, params, map, gA, expand));
  auto e = [&](const at::Tensor& x) { return x.defined() ? x : at::empty({0}, A.options().dtype(at::kDouble)); };
  return {e(s.mean), e(s.m2), e(s.gw), e(s.sum_g), e(s.sum_gx)};
}

}  // namespace refiner
