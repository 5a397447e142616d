// refine_train: the training-mode refine block with BatchNorm batch statistics, forward and
// backward, without ever holding a (B, rH, N, N) tensor.
//
// The passes over the rH-channel maps (E, Y2, D) are streamed (train_pass.h: CPU rows in
// cpu/train_stream.cpp, CUDA tiles in cuda/train_cuda.cu; no expanded map is ever written); what
// is left here works on H-channel maps, chunk by chunk of images, with ATen (the CPU's own fused
// kernels where cpu_kernels(); REFINER_CPU_PORTABLE=1 runs the ATen side, the CUDA backend's code).
// REFINER_TRAIN_PATH=chunk instead recomputes every map of a chunk with ATen ops (the first
// implementation, kept as a second one to compare with). Order of stages:
//   forward : BN1 from the moments of A (mean vector + H x H Gram matrix: U = W_e A is linear),
//             pass 1 sums of Y2 = dw(E) (BN2), pass 2 Y3 = W_p D (BN3), kept in a buffer the
//             size of A (and returned for the backward), then Z = A + BN3(Y3) chunk by chunk,
//             BN_a from the actual Z values, and out = (BN_a(Z) * scale) @ v from the same Z
//             (made again).
//             Numerics: means and variances by Welford per chunk, merged in fp64 (Moments);
//             every BN is applied in centred form s (x - mean) + b. A zero-variance channel
//             (s ~ 1/sqrt(eps)) then only amplifies fp32 rounding of the values themselves,
//             not the cancellation of E[x^2] - E[x]^2 or of a folded offset.
//   backward: one reduction (sum gy, sum gy*xhat) per BN backward: BN_a, BN3, BN2, BN1, then the
//             final input/weight gradients. Streamed: Y3 from the forward (keep_y3) or once more
//             into a buffer the size of A, BN_a and BN3 on H-channel maps, then three passes for
//             BN2, BN1 and the final gradients.
//             Chunk path: five recompute passes of every map.
// Chunk size (chunk_images): the widest map of a chunk stays below a quarter of A: on the chunk
// path the expanded (c, rH, N, N) maps, so the ~10 of them alive at once in the backward cost
// ~2.5x A, while a large batch on a GPU needs only ~4r chunks per pass instead of B (launch bound
// otherwise); beside the streamed passes on a GPU (H-channel maps only) 4 chunks.
// Peak extra memory, streamed: the forward's Y3 buffer (kept for the backward with keep_y3); in
// the backward gY3 (in place of a recomputed Y3 without keep_y3) and gA, plus H-channel chunk
// temporaries; a copy of A in the compute dtype for fp16/bf16 inputs. Chunk path: one buffer the
// size of A plus the chunk's maps.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>

#include "cpu/channel_ops.h"
#include "cpu/portable.h"
#include "cpu/train_stream.h"
#include "train_pass.h"
#include "head_mix.h"
#include "validate.h"

namespace refiner {
namespace {

using at::Tensor;

struct TrainArgs {
  Tensor attn;  // input dtype (converted to ct chunk by chunk)
  Tensor v, w_exp, w_dw, w_pro, g1, b1, g2, b2, g3, b3, ga, ba;  // compute dtype
  int64_t B, H, N, d, rH, k, chunk;
  bool expand;
  bool stream;  // the streamed passes (else the chunk path)
  at::ScalarType ct;
};

// The rH-channel passes: the streamed passes of train_pass.h (CPU rows, CUDA tiles) unless
// REFINER_TRAIN_PATH=chunk picks the ATen chunk passes (a second implementation to compare with,
// and the way out for shapes whose CUDA tiles do not fit in shared memory: H beyond ~100).
bool chunk_path_requested() {
  const char* s = std::getenv("REFINER_TRAIN_PATH");
  if (!s || !*s || std::string(s) == "stream") return false;
  TORCH_CHECK(std::string(s) == "chunk", "refine_train: REFINER_TRAIN_PATH must be 'stream' or 'chunk', got '", s, "'");
  return true;
}

// Images per chunk: REFINER_TRAIN_CHUNK when set (tests, tuning), else B / (4 r): the chunk
// path's expanded (c, rH, N, N) maps stay within a quarter of A. Beside the streamed passes on a
// GPU the widest chunk map has H channels: B / 4, so that every H-channel stage is a few large
// launches (B / (4 r) would make ~13 chunks of ~30 launches per pass at B = 256, r = 3).
int64_t chunk_images(int64_t B, int64_t H, int64_t rH, bool stream, bool cuda) {
  if (const char* s = std::getenv("REFINER_TRAIN_CHUNK")) {
    const long long c = std::atoll(s);
    TORCH_CHECK(c > 0, "refine_train: REFINER_TRAIN_CHUNK must be a positive integer, got '", s, "'");
    return std::min<int64_t>(c, B);
  }
  const int64_t r = stream && cuda ? 1 : std::max<int64_t>(1, rH / H);
  return std::max<int64_t>(1, B / (4 * r));
}

// Arguments validated by the caller (validate_refine_train), before any copy or device work.
TrainArgs prep_train(const Tensor& attn, const Tensor& v, const Tensor& w_exp, const Tensor& w_dw,
                     const Tensor& w_pro, const Tensor& g1, const Tensor& b1, const Tensor& g2, const Tensor& b2,
                     const Tensor& g3, const Tensor& b3, const Tensor& ga, const Tensor& ba, bool expand) {
  const int64_t H = attn.size(1), rH = w_dw.size(0), k = w_dw.size(1);
  const auto ct = compute_type(attn);
  auto c = [&](const Tensor& t) { return t.to(ct).contiguous(); };
  const int64_t B = attn.size(0);
  const bool stream = !chunk_path_requested();
  return {attn.contiguous(), c(v), c(w_exp), c(w_dw), c(w_pro), c(g1), c(b1), c(g2), c(b2), c(g3), c(b3), c(ga),
          c(ba), B, H, attn.size(2), v.size(3), rH, k, chunk_images(B, H, rH, stream, attn.is_cuda()), expand, stream, ct};
}

// The chunks of the batch: [b0, b0 + n).
template <class Fn>
void for_chunks(const TrainArgs& a, Fn&& fn) {
  for (int64_t b0 = 0; b0 < a.B; b0 += a.chunk) fn(b0, std::min(a.chunk, a.B - b0));
}

// Maps of a chunk: X (n, C, N, N). Sums run over the images and pixels of the chunk.
Tensor mix(const Tensor& w, const Tensor& x) {  // 1x1 conv over channels
  const int64_t n = x.size(0), N = x.size(2), M = x.size(3);
  return mix_images(w, x.reshape({n, x.size(1), N * M})).view({n, w.size(0), N, M});
}
Tensor mix_wgrad(const Tensor& g, const Tensor& x) {  // sum over images of g x^T: (Cg, Cx)
  const int64_t n = x.size(0), NM = x.size(2) * x.size(3);
  return mix_images_wgrad(g.reshape({n, g.size(1), NM}), x.reshape({n, x.size(1), NM}));
}
// The depthwise conv (zero 'same' padding, cross-correlation) and its gradients, through ATen
// (cuDNN on CUDA). Only the chunk path (REFINER_TRAIN_PATH=chunk) uses them.
Tensor dw(const Tensor& x, const Tensor& w) {
  const int64_t k = w.size(-1);
  return at::conv2d(x, w.unsqueeze(1), {}, 1, k / 2, 1, x.size(1));
}
// Gradients of dw(x, w) from g: (grad of x, grad of w (C, k, k) or undefined).
std::pair<Tensor, Tensor> dw_backward(const Tensor& g, const Tensor& x, const Tensor& w, bool need_w) {
  const int64_t k = w.size(-1);
  auto r = at::convolution_backward(g, x, w.unsqueeze(1), c10::nullopt, {1, 1}, {k / 2, k / 2}, {1, 1}, false,
                                    {0, 0}, x.size(1), {true, need_w, false});
  auto gw = std::get<1>(r);
  return {std::get<0>(r), need_w ? gw.squeeze(1) : Tensor()};
}
// g = 0 in place where relu6 is flat, from its output y: y <= 0 or y >= 6 (same as pre <= 0 or
// pre >= 6), even for a non-finite g. hardtanh_backward is exactly that, in one fused pass.
Tensor relu6_grad_(Tensor g, const Tensor& y) { return at::hardtanh_backward_out(g, g, y, 0, 6); }
Tensor col(const Tensor& t) { return t.view({-1, 1, 1}); }
Tensor sums(const Tensor& x) { return x.sum({0, 2, 3}); }  // per channel

// Batch statistics and the BN scales derived from them (BNs are applied in centred form, so
// no folded offsets).
struct Folded {
  Tensor m1, v1, m2, v2, m3, v3, ma, va;   // stats (compute dtype)
  Tensor sd1, sd2, sd3, sda;               // sd_i = sqrt(v_i + eps) (sd1: expansion only)
  Tensor s1, s2, s3, sa;                   // s_i = g_i / sd_i
};

void fold(const TrainArgs& a, Folded& f, double eps) {
  if (a.expand) f.sd1 = at::sqrt(f.v1 + eps), f.s1 = a.g1 / f.sd1;
  f.sd2 = at::sqrt(f.v2 + eps), f.s2 = a.g2 / f.sd2;
  f.sd3 = at::sqrt(f.v3 + eps), f.s3 = a.g3 / f.sd3;
  f.sda = at::sqrt(f.va + eps), f.sa = a.ga / f.sda;
}

// Every BN is applied in centred form, s (x - mean) + b, never s x + (b - s mean): with zero
// variance s ~ 1/sqrt(eps) and the folded offset would cancel catastrophically in fp32.
// (CPU kernels: one fused pass; ATen: one temporary.) relu6: clamped to [0, 6].
Tensor bn_apply(const Tensor& x, const Tensor& s, const Tensor& m, const Tensor& b, bool relu6 = false) {
  if (cpu_kernels(x) && !relu6) return cpu::channel_affine(x, s, m, b);  // (relu6: chunk passes only)
  auto y = (x - col(m)).mul_(col(s)).add_(col(b));
  return relu6 ? y.clamp_(0, 6) : y;
}
// Through a batch-statistics BN over M values per channel: k (g - S1/M - xhat S2/M), xhat =
// (x - m)/sd, with S1 = sum g and S2 = sum g xhat (one temporary). Written into `out` when given
// (a contiguous slice of a buffer, which may be x itself): no copy of a map-sized result.
Tensor bn_backward(const Tensor& g, const Tensor& x, const Tensor& m, const Tensor& sd, const Tensor& k,
                   const Tensor& S1, const Tensor& S2, double M, Tensor out = Tensor()) {
  if (cpu_kernels(x)) return cpu::channel_bn_grad(g, x, m, S2 / (sd * M), S1 / M, k, out);
  auto t = (x - col(m)).mul_(col(S2 / (sd * M)));
  if (!out.defined()) return t.neg_().add_(g).sub_(col(S1 / M)).mul_(col(k));
  return at::sub_out(out, g, t).sub_(col(S1 / M)).mul_(col(k));  // g - t = -t + g exactly
}
// Per channel sum g xhat = sum g (x - m) / sd.
Tensor sum_g_xhat(const Tensor& g, const Tensor& x, const Tensor& m, const Tensor& sd) {
  if (cpu_kernels(x)) return cpu::channel_centred_dot(x, m, g).to(x.scalar_type()) / sd;
  return sums((x - col(m)).mul_(g)) / sd;
}
// Z = A + BN3(Y3): the one expression used by the BN_a statistics, the output and the backward.
// Into `out` when given (as bn_backward).
Tensor make_z(const TrainArgs& a, const Folded& f, const Tensor& A, const Tensor& Y3, Tensor out = Tensor()) {
  if (cpu_kernels(Y3)) return cpu::channel_affine(Y3, f.s3, f.m3, a.b3, A, out);
  if (!out.defined()) return A + bn_apply(Y3, f.s3, f.m3, a.b3);
  return at::add_out(out, A, bn_apply(Y3, f.s3, f.m3, a.b3));
}
// r = BN_a(Z) * scale (out = r @ v), in centred form; the forward and both backwards use it.
Tensor r_of(const TrainArgs& a, const Folded& f, const Tensor& Z, double scale) {
  return bn_apply(Z, f.sa * scale, f.ma, a.ba * scale);
}

Tensor attn_chunk(const TrainArgs& a, int64_t b0, int64_t n) { return a.attn.narrow(0, b0, n).to(a.ct); }

// All maps of a chunk (recomputed from A).
struct Maps {
  Tensor A, U, E, Y2, D, Y3, Z;
};

Maps recompute(const TrainArgs& a, const Folded& f, int64_t b0, int64_t n, bool need_z, bool need_y3 = true) {
  Maps m;
  m.A = attn_chunk(a, b0, n);
  if (a.expand) {
    m.U = mix(a.w_exp, m.A);
    m.E = bn_apply(m.U, f.s1, f.m1, a.b1, true);
  } else {
    m.E = m.A;
  }
  m.Y2 = dw(m.E, a.w_dw);
  if (!need_y3) return m;
  m.D = bn_apply(m.Y2, f.s2, f.m2, a.b2, true);
  m.Y3 = mix(a.w_pro, m.D);
  if (need_z) m.Z = make_z(a, f, m.A, m.Y3);
  return m;
}

// Per-channel mean and variance of chunk maps (n, C, N, N), merged over the chunks: each chunk by
// at::var_mean (Welford; on CPU cpu::channel_moments, two passes per plane in fp64), chunks
// combined in fp64 by Chan's pairwise update. No cancellation of E[x^2] - E[x]^2 when
// |mean| >> std, and no fp64 copy of any map. var_mean returns its mean rounded to fp32; the sum
// of the residuals x - mean recovers the lost digits, which the merge (delta^2 terms) and BN1
// (W_e mean(A), with cancellation across heads) need.
struct Moments {
  Tensor mean, m2;  // fp64; m2 = sum of squared deviations
  double n = 0;
  void add(const Tensor& x) {
    const double nc = double(x.numel() / x.size(1));
    Tensor mc, m2c;
    if (cpu_kernels(x)) {
      std::tie(mc, m2c) = cpu::channel_moments(x);
    } else {
      auto [var_c, mean_f] = at::var_mean(x, at::IntArrayRef({0, 2, 3}), /*unbiased=*/false, /*keepdim=*/false);
      auto resid = (x - col(mean_f)).sum({0, 2, 3}).to(at::kDouble);
      mc = mean_f.to(at::kDouble) + resid / nc, m2c = var_c.to(at::kDouble) * nc;
    }
    add_stats(mc, m2c, nc);
  }
  // Adds the mean and sum of squared deviations (fp64, per channel) of nc more values.
  void add_stats(const Tensor& mc, const Tensor& m2c, double nc) {
    if (n == 0) {
      mean = mc, m2 = m2c;
    } else {
      auto delta = mc - mean;
      const double tot = n + nc;
      mean = mean + delta * (nc / tot);
      m2 = m2 + m2c + delta * delta * (n * nc / tot);
    }
    n += nc;
  }
  void finish(at::ScalarType ct, Tensor& mean_out, Tensor& var_out) const {
    mean_out = mean.to(ct);
    var_out = (m2 / n).clamp_min(0).to(ct);
  }
};

// The streamed passes' inputs: A, the weights and BN1 / BN2 as far as they are known in f;
// `map`: Y3 out or gY3 in.
TrainStreamArgs stream_args(const TrainArgs& a, const Folded& f, const Tensor& map = Tensor()) {
  TrainStreamArgs s;
  s.A = a.attn.to(a.ct).contiguous();
  s.w_exp = a.w_exp, s.w_dw = a.w_dw, s.w_pro = a.w_pro, s.expand = a.expand;
  if (a.expand) s.s1 = f.s1, s.m1 = f.m1, s.b1 = a.b1;
  if (f.s2.defined()) s.s2 = f.s2, s.m2 = f.m2, s.b2 = a.b2;
  s.map = map;
  return s;
}

// Forward: batch statistics and the output.
//   BN1: mean + covariance of A (centred Gram matrix) through the linear W_e.
//   pass 1: moments of Y2 (BN2).
//   pass 2: Y3 per chunk, kept in a buffer of the size of A (returned with keep_y3: the backward
//   keeps it), its moments (BN3).
//   then Z = make_z(A, Y3) per chunk, BN_a statistics from those actual Z values (not derived
//   algebraically from moments of A and Y3), and out = (BN_a(Z) * scale) @ v from the same Z:
//   every consumer sees the same rounded Z, so a zero-variance channel stays ~0. Without keep_y3
//   Z replaces Y3 in the buffer; with it, Z is made again (the same expression) for the output.
std::pair<Tensor, Tensor> forward_pass(const TrainArgs& a, Folded& f, double eps, double scale, bool keep_y3) {
  const auto st = at::kDouble;
  const double M = double(a.B) * a.N * a.N;
  const auto opt = a.v.options().dtype(st);
  if (a.expand) {
    // U = W_e A is linear: its mean is W_e mean(A) and its variance diag(W_e Cov(A) W_e^T), with
    // Cov(A) the H x H Gram matrix of the centred maps. In fp64 (chunk by chunk, H channels): an
    // fp32 product summed over B N^2 pixels is ~sqrt(B N^2) ulps off (var(U) 3e-5 off at N = 1025),
    // enough to flip relu6 masks where BN1 amplifies by 1/sqrt(var + eps).
    Moments moA;
    for_chunks(a, [&](int64_t b0, int64_t n) { moA.add(attn_chunk(a, b0, n)); });
    auto gram = at::zeros({a.H, a.H}, opt);
    for_chunks(a, [&](int64_t b0, int64_t n) {
      auto Ac = attn_chunk(a, b0, n).to(st).reshape({n, a.H, -1}) - moA.mean.view({-1, 1});
      gram += at::matmul(Ac, Ac.transpose(1, 2)).sum(0);
    });
    auto cov = gram / M;
    auto we = a.w_exp.to(st);
    f.m1 = at::matmul(we, moA.mean).to(a.ct);
    f.v1 = (at::matmul(we, cov) * we).sum(1).clamp_min(0).to(a.ct);
    f.s1 = a.g1 / at::sqrt(f.v1 + eps);
  } else {
    f.m1 = at::zeros({a.rH}, a.v.options());
    f.v1 = at::zeros({a.rH}, a.v.options());
  }
  Moments mo2;
  auto buf = at::empty(a.attn.sizes(), a.v.options());
  TrainStreamArgs sa;
  if (a.stream) {
    sa = stream_args(a, f);
    auto y2 = train_pass(TrainPass::Y2Moments, sa);
    mo2.add_stats(y2.mean, y2.m2, M);
  } else {
    for_chunks(a, [&](int64_t b0, int64_t n) { mo2.add(recompute(a, f, b0, n, false, false).Y2); });
  }
  mo2.finish(a.ct, f.m2, f.v2);
  f.s2 = a.g2 / at::sqrt(f.v2 + eps);
  if (a.stream) {
    sa.s2 = f.s2, sa.m2 = f.m2, sa.b2 = a.b2, sa.map = buf;
    train_pass(TrainPass::Y3, sa);
  } else {
    for_chunks(a, [&](int64_t b0, int64_t n) { buf.narrow(0, b0, n).copy_(recompute(a, f, b0, n, false).Y3); });
  }
  Moments mo3;
  for_chunks(a, [&](int64_t b0, int64_t n) { mo3.add(buf.narrow(0, b0, n)); });
  mo3.finish(a.ct, f.m3, f.v3);
  f.s3 = a.g3 / at::sqrt(f.v3 + eps);
  auto z_of = [&](int64_t b0, int64_t n, bool again) {
    auto y = buf.narrow(0, b0, n);
    if (again && !keep_y3) return y;  // Z is already there
    return make_z(a, f, attn_chunk(a, b0, n), y, keep_y3 ? Tensor() : y);
  };
  Moments moa;
  for_chunks(a, [&](int64_t b0, int64_t n) { moa.add(z_of(b0, n, false)); });
  moa.finish(a.ct, f.ma, f.va);
  fold(a, f, eps);
  auto out = at::empty_like(a.v);
  for_chunks(a, [&](int64_t b0, int64_t n) {
    out.narrow(0, b0, n).copy_(at::matmul(r_of(a, f, z_of(b0, n, true), scale), a.v.narrow(0, b0, n)));
  });
  return {out, keep_y3 ? buf : at::empty({0}, buf.options())};
}

// Returns out, the batch statistics (m1, v1, m2, v2, m3, v3, ma, va) and y3: with keep_y3 the
// forward's Y3 in the compute dtype, for the backward to skip its Y3 pass (one of a step's six
// streamed passes; the same values, the pass being deterministic), else an empty tensor (the
// memory-lean choice: the backward recomputes it). The Python side picks keep_y3
// (REFINER_TRAIN_SAVE_Y3); the chunk path's backward recomputes Y3 either way.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> refine_train_impl(
    const Tensor& attn, const Tensor& v, const Tensor& w_exp, const Tensor& w_dw, const Tensor& w_pro,
    const Tensor& g1, const Tensor& b1, const Tensor& g2, const Tensor& b2, const Tensor& g3, const Tensor& b3,
    const Tensor& ga, const Tensor& ba, double eps, double scale, bool expand, bool keep_y3) {
  validate_refine_train(attn, v, w_exp, w_dw, w_pro, g1, b1, g2, b2, g3, b3, ga, ba, eps, expand);
  auto a = prep_train(attn, v, w_exp, w_dw, w_pro, g1, b1, g2, b2, g3, b3, ga, ba, expand);
  Folded f;
  auto [out, y3] = forward_pass(a, f, eps, scale, keep_y3);
  const auto st = attn.scalar_type();
  return {out.to(st), f.m1.to(st), f.v1.to(st), f.m2.to(st), f.v2.to(st), f.m3.to(st), f.v3.to(st), f.ma.to(st),
          f.va.to(st), y3};
}

// go: the gradient of out in the compute dtype; f: folded (fold).
std::vector<Tensor> refine_train_backward_chunked(const Tensor& go, const TrainArgs& a, const Folded& f, double scale) {
  const double M = double(a.B) * a.N * a.N;
  const auto opt = a.v.options();
  const Tensor &sd_a = f.sda, &sd3 = f.sd3, &sd2 = f.sd2, &sd1 = f.sd1;
  auto gA = at::empty_like(a.attn), gv = at::empty_like(a.v);  // gA in the input dtype
  auto Sa1 = at::zeros({a.H}, opt), Sa2 = at::zeros({a.H}, opt);
  auto S31 = at::zeros({a.H}, opt), S32 = at::zeros({a.H}, opt);
  auto S21 = at::zeros({a.rH}, opt), S22 = at::zeros({a.rH}, opt);
  auto S11 = at::zeros({a.rH}, opt), S12 = at::zeros({a.rH}, opt);
  auto gw_pro = at::zeros_like(a.w_pro), gw_dw = at::zeros_like(a.w_dw), gw_exp = at::zeros_like(a.w_exp);
  // gradient of BN_a's output r (out = (r * scale) @ v) and of v
  auto grad_r = [&](const Maps& m, int64_t b0, int64_t n, bool with_gv) {
    auto gob = go.narrow(0, b0, n);
    if (with_gv) gv.narrow(0, b0, n).copy_(at::matmul(r_of(a, f, m.Z, scale).transpose(-2, -1), gob));
    return scale * at::matmul(gob, a.v.narrow(0, b0, n).transpose(-2, -1));
  };
  auto bn_grad = [&](const Tensor& g, const Tensor& x, const Tensor& m, const Tensor& sd, const Tensor& k,
                     const Tensor& S1, const Tensor& S2) { return bn_backward(g, x, m, sd, k, S1, S2, M); };
  auto grad_z = [&](const Maps& m, int64_t b0, int64_t n) {
    return bn_grad(grad_r(m, b0, n, false), m.Z, f.ma, sd_a, f.sa, Sa1, Sa2);
  };
  auto grad_y3 = [&](const Maps& m, const Tensor& gz) { return bn_grad(gz, m.Y3, f.m3, sd3, a.g3 / sd3, S31, S32); };
  auto grad_d2 = [&](const Maps& m, const Tensor& gy3) {  // grad of BN2's output (pre-relu6)
    return relu6_grad_(mix(a.w_pro.t(), gy3), m.D);
  };
  // B1: BN_a reductions (and gv)
  for_chunks(a, [&](int64_t b0, int64_t n) {
    auto m = recompute(a, f, b0, n, true);
    auto gr = grad_r(m, b0, n, true);
    Sa1 += sums(gr);
    Sa2 += sum_g_xhat(gr, m.Z, f.ma, sd_a);
  });
  // B2: BN3 reductions
  for_chunks(a, [&](int64_t b0, int64_t n) {
    auto m = recompute(a, f, b0, n, true);
    auto gz = grad_z(m, b0, n);
    S31 += sums(gz);
    S32 += sum_g_xhat(gz, m.Y3, f.m3, sd3);
  });
  // B3: BN2 reductions, grad w_pro
  for_chunks(a, [&](int64_t b0, int64_t n) {
    auto m = recompute(a, f, b0, n, true);
    auto gy3 = grad_y3(m, grad_z(m, b0, n));
    gw_pro += mix_wgrad(gy3, m.D);
    auto gd2 = grad_d2(m, gy3);
    S21 += sums(gd2);
    S22 += sum_g_xhat(gd2, m.Y2, f.m2, sd2);
  });
  // B4: BN1 reductions, grad w_dw (and gA when there is no expansion)
  auto grad_e = [&](const Maps& m, int64_t b0, int64_t n, bool acc_w) {
    auto gz = grad_z(m, b0, n);
    auto gd2 = grad_d2(m, grad_y3(m, gz));
    auto gy2 = bn_grad(gd2, m.Y2, f.m2, sd2, a.g2 / sd2, S21, S22);
    auto [ge, gw] = dw_backward(gy2, m.E, a.w_dw, acc_w);
    if (acc_w) gw_dw += gw;
    return std::make_pair(ge, gz);
  };
  for_chunks(a, [&](int64_t b0, int64_t n) {
    auto m = recompute(a, f, b0, n, true);
    auto [ge, gz] = grad_e(m, b0, n, true);
    if (a.expand) {
      auto ge1 = relu6_grad_(ge, m.E);
      S11 += sums(ge1);
      S12 += sum_g_xhat(ge1, m.U, f.m1, sd1);
    } else {
      gA.narrow(0, b0, n).copy_(gz + ge);
    }
  });
  // B5: grad w_exp and gA through the expansion
  if (a.expand)
    for_chunks(a, [&](int64_t b0, int64_t n) {
      auto m = recompute(a, f, b0, n, true);
      auto [ge, gz] = grad_e(m, b0, n, false);
      auto ge1 = relu6_grad_(ge, m.E);
      auto gu = bn_grad(ge1, m.U, f.m1, sd1, a.g1 / sd1, S11, S12);
      gw_exp += mix_wgrad(gu, m.A);
      gA.narrow(0, b0, n).copy_(gz + mix(a.w_exp.t(), gu));
    });
  Tensor gg1 = a.expand ? S12 : at::zeros({a.rH}, opt), gb1 = a.expand ? S11 : at::zeros({a.rH}, opt);
  return {gA, gv, gw_exp, gw_dw, gw_pro, gg1, gb1, S22, S21, S32, S31, Sa2, Sa1};
}

// Backward, streamed: Y3 kept from the forward (saved_y3), or else by a pass into a buffer the
// size of A; the BN_a and BN3 stages on H-channel maps per chunk (gZ kept in gA's buffer, gY3 in
// a buffer of its own, or in place of a recomputed Y3); then three streamed passes for BN2's sums
// with gw_pro, BN1's sums with gw_dw, and gw_exp with gA (without the expansion the second pass
// finishes gA).
std::vector<Tensor> refine_train_backward_streamed(const Tensor& go, const TrainArgs& a, const Folded& f,
                                                   double scale, const Tensor& saved_y3) {
  const double M = double(a.B) * a.N * a.N;
  const auto opt = a.v.options();
  const Tensor &sd_a = f.sda, &sd3 = f.sd3, &sd2 = f.sd2, &sd1 = f.sd1;
  auto gA = at::empty(a.attn.sizes(), opt), gv = at::empty_like(a.v);
  const bool kept = saved_y3.numel() > 0;
  auto y3 = kept ? saved_y3 : at::empty(a.attn.sizes(), opt);
  auto gy3 = kept ? at::empty(a.attn.sizes(), opt) : y3;  // autograd's saved Y3 stays as it is
  auto sa = stream_args(a, f, y3);
  if (!kept) train_pass(TrainPass::Y3, sa);
  auto go_s = go * scale;
  auto gr_of = [&](int64_t b0, int64_t n) {  // gradient of r, out = r @ v
    return at::matmul(go_s.narrow(0, b0, n), a.v.narrow(0, b0, n).transpose(-2, -1));
  };
  auto Sa1 = at::zeros({a.H}, opt), Sa2 = at::zeros({a.H}, opt), S31 = at::zeros({a.H}, opt),
       S32 = at::zeros({a.H}, opt);
  for_chunks(a, [&](int64_t b0, int64_t n) {  // Z (kept in gA's buffer), BN_a's sums, gv
    auto z = make_z(a, f, sa.A.narrow(0, b0, n), y3.narrow(0, b0, n), gA.narrow(0, b0, n));
    gv.narrow(0, b0, n).copy_(at::matmul(r_of(a, f, z, scale).transpose(-2, -1), go.narrow(0, b0, n)));
    auto gr = gr_of(b0, n);
    Sa1 += sums(gr);
    Sa2 += sum_g_xhat(gr, z, f.ma, sd_a);
  });
  for_chunks(a, [&](int64_t b0, int64_t n) {  // gZ (the part of gA that skips the DLA) over Z, BN3's sums
    auto gAc = gA.narrow(0, b0, n);
    auto gz = bn_backward(gr_of(b0, n), gAc, f.ma, sd_a, f.sa, Sa1, Sa2, M, gAc);
    S31 += sums(gz);
    S32 += sum_g_xhat(gz, y3.narrow(0, b0, n), f.m3, sd3);
  });
  for_chunks(a, [&](int64_t b0, int64_t n) {  // gY3
    bn_backward(gA.narrow(0, b0, n), y3.narrow(0, b0, n), f.m3, sd3, a.g3 / sd3, S31, S32, M, gy3.narrow(0, b0, n));
  });
  sa.map = gy3;
  auto pro = train_pass(TrainPass::ProGrad, sa);
  auto S21 = pro.sum_g.to(a.ct), S22 = pro.sum_gx.to(a.ct) / sd2;
  sa.k2 = a.g2 / sd2, sa.c1_2 = S21 / M, sa.c2_2 = S22 / (sd2 * M), sa.gA = gA;
  auto dwg = train_pass(TrainPass::DwGrad, sa);
  Tensor gw_exp = at::zeros_like(a.w_exp), S11 = at::zeros({a.rH}, opt), S12 = at::zeros({a.rH}, opt);
  if (a.expand) {
    S11 = dwg.sum_g.to(a.ct), S12 = dwg.sum_gx.to(a.ct) / sd1;
    sa.k1 = a.g1 / sd1, sa.c1_1 = S11 / M, sa.c2_1 = S12 / (sd1 * M);
    gw_exp = train_pass(TrainPass::ExpGrad, sa).gw;
  }
  return {gA, gv, gw_exp, dwg.gw, pro.gw, S12, S11, S22, S21, S32, S31, Sa2, Sa1};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
refine_train_backward_impl(const Tensor& gout, const Tensor& attn, const Tensor& v, const Tensor& w_exp,
                           const Tensor& w_dw, const Tensor& w_pro, const Tensor& g1, const Tensor& b1,
                           const Tensor& g2, const Tensor& b2, const Tensor& g3, const Tensor& b3, const Tensor& ga,
                           const Tensor& ba, const Tensor& m1, const Tensor& v1, const Tensor& m2, const Tensor& v2,
                           const Tensor& m3, const Tensor& v3, const Tensor& ma, const Tensor& va,
                           const Tensor& y3, double eps, double scale, bool expand) {
  // the forward's arguments, grad_out and the forward's batch statistics (m1, v1, m2, v2 per expanded
  // channel; m3, v3, ma, va per head), all before any copy or device work
  const int64_t rH = validate_refine_train(attn, v, w_exp, w_dw, w_pro, g1, b1, g2, b2, g3, b3, ga, ba, eps, expand);
  const char* op = "refine_train_backward";
  validate_grad(op, "grad_out", gout, v);
  check_vectors(op, {{"m1", &m1}, {"v1", &v1}, {"m2", &m2}, {"v2", &v2}}, rH, "(rH)");
  check_vectors(op, {{"m3", &m3}, {"v3", &v3}, {"ma", &ma}, {"va", &va}}, attn.size(1), "(H)");
  check_common(op, {{"attn", &attn}, {"m1", &m1}, {"v1", &v1}, {"m2", &m2}, {"v2", &v2}, {"m3", &m3}, {"v3", &v3},
                    {"ma", &ma}, {"va", &va}});
  check_saved_y3(op, y3, attn);
  auto a = prep_train(attn, v, w_exp, w_dw, w_pro, g1, b1, g2, b2, g3, b3, ga, ba, expand);
  Folded f;
  auto c = [&](const Tensor& t) { return t.to(a.ct).contiguous(); };
  f.m1 = c(m1), f.v1 = c(v1), f.m2 = c(m2), f.v2 = c(v2), f.m3 = c(m3), f.v3 = c(v3), f.ma = c(ma), f.va = c(va);
  fold(a, f, eps);
  auto go = gout.to(a.ct).contiguous();
  auto g = a.stream ? refine_train_backward_streamed(go, a, f, scale, y3)
                    : refine_train_backward_chunked(go, a, f, scale);
  const auto st = attn.scalar_type();
  for (auto& t : g) t = t.to(st).contiguous();  // each is its own fresh tensor: no aliasing
  return {g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10], g[11], g[12]};
}

}  // namespace

TrainStreamSums train_pass(TrainPass pass, const TrainStreamArgs& a) {
  using Sig = TrainPassOut(int64_t, const Tensor&, const TensorList&, const c10::optional<Tensor>&,
                           const c10::optional<Tensor>&, bool);
  const char* name = std::getenv("REFINER_TRAIN_PASS_OP");
  const auto op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow(name && *name ? name : "refiner::_train_pass", "")
                      .typed<Sig>();
  auto [mean, m2, gw, sg, sgx] = op.call((int64_t)pass, a.A, pack_train_params(a), as_optional(a.map),
                                         as_optional(a.gA), a.expand);
  auto d = [](const Tensor& t) { return t.numel() ? t : Tensor(); };  // empty: not a sum of this pass
  return {d(mean), d(m2), d(gw), d(sg), d(sgx)};
}

}  // namespace refiner

TORCH_LIBRARY_FRAGMENT(refiner, m) {
  m.def("refine_train(Tensor attn, Tensor v, Tensor w_exp, Tensor w_dw, Tensor w_pro, Tensor g1, Tensor b1, "
        "Tensor g2, Tensor b2, Tensor g3, Tensor b3, Tensor ga, Tensor ba, float eps, float scale, bool expand, "
        "bool keep_y3=True) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("refine_train_backward(Tensor grad_out, Tensor attn, Tensor v, Tensor w_exp, Tensor w_dw, Tensor w_pro, "
        "Tensor g1, Tensor b1, Tensor g2, Tensor b2, Tensor g3, Tensor b3, Tensor ga, Tensor ba, "
        "Tensor m1, Tensor v1, Tensor m2, Tensor v2, Tensor m3, Tensor v3, Tensor ma, Tensor va, Tensor y3, "
        "float eps, float scale, bool expand) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(refiner, CPU, m) {
  m.impl("_train_pass", &refiner::train_pass_op<&refiner::cpu::train_stream_pass>);
  m.impl("refine_train", &refiner::refine_train_impl);
  m.impl("refine_train_backward", &refiner::refine_train_backward_impl);
}
TORCH_LIBRARY_IMPL(refiner, CUDA, m) {
  m.impl("refine_train", &refiner::refine_train_impl);
  m.impl("refine_train_backward", &refiner::refine_train_backward_impl);
}
