// Per-channel element-wise passes of refine_train's batch norms on CPU: each is one pass over
// contiguous (n, C, P) maps, where the ATen expressions they replace take 3-4 passes and
// temporaries (the chunked training refine is memory-bound on CPU). Same centred forms and
// operation order as those expressions; the CUDA path keeps the ATen ones.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <utility>
#include <vector>

namespace refiner {
namespace cpu {

// Elements per (image, channel) plane of an (n, C, ...) tensor.
inline int64_t plane_size(const at::Tensor& x) { return x.numel() / std::max<int64_t>(1, x.size(0) * x.size(1)); }

// fn(plane_index, channel) over the n * C planes of a contiguous (n, C, ...) tensor.
template <class Fn>
void for_planes(const at::Tensor& x, Fn&& fn) {
  const int64_t C = x.size(1), planes = x.size(0) * C;
  at::parallel_for(0, planes, 1, [&](int64_t s, int64_t e) {
    for (int64_t i = s; i < e; ++i) fn(i, i % C);
  });
}

// The result's tensor: `into` when given (contiguous, x's shape and dtype; it may be x itself,
// each element being read before it is written), else a new one.
inline at::Tensor result_like(const at::Tensor& x, const at::Tensor& into, const char* op) {
  if (!into.defined()) return at::empty_like(x);
  TORCH_CHECK(into.is_contiguous() && into.sizes() == x.sizes() && into.scalar_type() == x.scalar_type(), op,
              ": bad `into` tensor");
  return into;
}

// s_c (x - m_c) + b_c; with `add` (same shape as x), add + (s_c (x - m_c) + b_c). Into `into` if given.
inline at::Tensor channel_affine(const at::Tensor& x, const at::Tensor& s, const at::Tensor& m, const at::Tensor& b,
                                 const at::Tensor& add = at::Tensor(), const at::Tensor& into = at::Tensor()) {
  const auto xc = x.contiguous();
  const auto ac = add.defined() ? add.to(x.scalar_type()).contiguous() : add;
  TORCH_CHECK(!ac.defined() || ac.sizes() == xc.sizes(), "channel_affine: bad residual");
  auto y = result_like(xc, into, "channel_affine");
  const int64_t P = plane_size(xc);
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "channel_affine", [&] {
    const scalar_t *xp = xc.data_ptr<scalar_t>(), *sp = s.data_ptr<scalar_t>(), *mp = m.data_ptr<scalar_t>(),
                   *bp = b.data_ptr<scalar_t>(), *ap = ac.defined() ? ac.data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    for_planes(xc, [&](int64_t i, int64_t c) {
      const scalar_t sc = sp[c], mc = mp[c], bc = bp[c];
      const scalar_t* xi = xp + i * P;
      scalar_t* yi = yp + i * P;
      if (ap)
        for (int64_t j = 0, o = i * P; j < P; ++j) yi[j] = ap[o + j] + (sc * (xi[j] - mc) + bc);
      else
        for (int64_t j = 0; j < P; ++j) yi[j] = sc * (xi[j] - mc) + bc;
    });
  });
  return y;
}

// Through a batch-statistics BN: k_c ((g - c2_c (x - m_c)) - c1_c). Into `into` if given.
inline at::Tensor channel_bn_grad(const at::Tensor& g, const at::Tensor& x, const at::Tensor& m, const at::Tensor& c2,
                                  const at::Tensor& c1, const at::Tensor& k, const at::Tensor& into = at::Tensor()) {
  const auto xc = x.contiguous(), gc = g.contiguous();
  auto out = result_like(xc, into, "channel_bn_grad");
  const int64_t P = plane_size(xc);
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "channel_bn_grad", [&] {
    const scalar_t *xp = xc.data_ptr<scalar_t>(), *gp = gc.data_ptr<scalar_t>(), *mp = m.data_ptr<scalar_t>(),
                   *c2p = c2.data_ptr<scalar_t>(), *c1p = c1.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    for_planes(xc, [&](int64_t i, int64_t c) {
      const scalar_t mc = mp[c], c2c = c2p[c], c1c = c1p[c], kc = kp[c];
      const scalar_t *xi = xp + i * P, *gi = gp + i * P;
      scalar_t* oi = op + i * P;
      for (int64_t j = 0; j < P; ++j) oi[j] = kc * ((gi[j] - c2c * (xi[j] - mc)) - c1c);
    });
  });
  return out;
}

// Per channel, in fp64: the sum over images and pixels of (x - m_c) g (of x - m_c when g is
// undefined).
// 16 independent lanes per plane (the fixed-width loop vectorises and rounds better than one
// running sum), planes summed in double and then over images in a fixed order: deterministic.
inline at::Tensor channel_centred_dot(const at::Tensor& x, const at::Tensor& m, const at::Tensor& g) {
  const auto xc = x.contiguous();
  const auto gc = g.defined() ? g.contiguous() : at::Tensor();
  const int64_t n = xc.size(0), C = xc.size(1), P = plane_size(xc);
  std::vector<double> part(n * C);
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "channel_centred_dot", [&] {
    const scalar_t *xp = xc.data_ptr<scalar_t>(), *mp = m.data_ptr<scalar_t>();
    const scalar_t* gp = gc.defined() ? gc.data_ptr<scalar_t>() : nullptr;
    for_planes(xc, [&](int64_t i, int64_t c) {
      constexpr int W = 16;
      scalar_t lane[W] = {};
      const scalar_t mc = mp[c];
      const scalar_t *xi = xp + i * P, *gi = gp ? gp + i * P : nullptr;
      const int64_t Pw = P / W * W;
      double total = 0;
      if (gi) {
        for (int64_t j = 0; j < Pw; j += W)
          for (int l = 0; l < W; ++l) lane[l] += (xi[j + l] - mc) * gi[j + l];
        for (int64_t j = Pw; j < P; ++j) total += (xi[j] - mc) * gi[j];
      } else {
        for (int64_t j = 0; j < Pw; j += W)
          for (int l = 0; l < W; ++l) lane[l] += xi[j + l] - mc;
        for (int64_t j = Pw; j < P; ++j) total += xi[j] - mc;
      }
      for (int l = 0; l < W; ++l) total += lane[l];
      part[i] = total;
    });
  });
  auto out = at::zeros({C}, xc.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int64_t b = 0; b < n; ++b)
    for (int64_t c = 0; c < C; ++c) o[c] += part[b * C + c];
  return out;
}

// Per-channel mean and sum of squared deviations (fp64) of (n, C, P) maps: two passes over each
// plane while it is in cache (mean, then centred squares, both in fp64 lanes), planes merged per
// channel by Chan's update in image order. For refine_train's Moments; ATen's var_mean on these
// shapes is ~10x slower and returns an fp32 mean.
inline std::pair<at::Tensor, at::Tensor> channel_moments(const at::Tensor& x) {
  const auto xc = x.contiguous();
  const int64_t n = xc.size(0), C = xc.size(1), P = plane_size(xc);
  std::vector<double> pmean(n * C), pm2(n * C);
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "channel_moments", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    for_planes(xc, [&](int64_t i, int64_t) {
      constexpr int W = 8;
      const scalar_t* xi = xp + i * P;
      const int64_t Pw = P / W * W;
      double lane[W] = {}, total = 0;
      for (int64_t j = 0; j < Pw; j += W)
        for (int l = 0; l < W; ++l) lane[l] += double(xi[j + l]);
      for (int64_t j = Pw; j < P; ++j) total += double(xi[j]);
      for (int l = 0; l < W; ++l) total += lane[l], lane[l] = 0;
      const double mu = P ? total / double(P) : 0.0;
      double sq = 0;
      for (int64_t j = 0; j < Pw; j += W)
        for (int l = 0; l < W; ++l) {
          const double dv = double(xi[j + l]) - mu;
          lane[l] += dv * dv;
        }
      for (int64_t j = Pw; j < P; ++j) sq += (double(xi[j]) - mu) * (double(xi[j]) - mu);
      for (int l = 0; l < W; ++l) sq += lane[l];
      pmean[i] = mu, pm2[i] = sq;
    });
  });
  auto mean = at::empty({C}, xc.options().dtype(at::kDouble)), m2 = at::empty({C}, xc.options().dtype(at::kDouble));
  double *mo = mean.data_ptr<double>(), *m2o = m2.data_ptr<double>();
  for (int64_t c = 0; c < C; ++c) {
    double mu = pmean[c], s2 = pm2[c];
    for (int64_t b = 1; b < n; ++b) {  // Chan: merge b planes of P values with one more
      const double delta = pmean[b * C + c] - mu;
      mu += delta / double(b + 1);
      s2 += pm2[b * C + c] + delta * delta * double(P) * double(b) / double(b + 1);
    }
    mo[c] = mu, m2o[c] = s2;
  }
  return {mean, m2};
}

}  // namespace cpu
}  // namespace refiner
