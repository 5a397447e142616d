// refine_train's rH-channel passes on CPU, streamed by rows (see train_stream.h). One work item is
// a tile of kRows rows of one image; with lead row j, up to three stages run with lags of p = k/2:
//   A (row j)      U = W_exp A (head_mix), E = relu6(s1 (U - m1) + b1), into rings of k rows
//                  (E's p columns each side zero: dw's zero padding);
//   B (row j - p)  Y2 = dw(E), D = relu6(s2 (Y2 - m2) + b2); then per pass: Y2's moments / Y3 =
//                  W_pro D / gD2 = W_pro^T gY3 where 0 < D < 6 with its sums and gw_pro / gY2 =
//                  BN2's backward of gD2 into a ring of k rows, with gw_dw;
//   C (row j - 2p) gE = dw^T(gY2) (flipped taps), gE1 = gE where 0 < E < 6: BN1's sums, or gU =
//                  BN1's backward of gE1 with gw_exp and gA += W_exp^T gU (without the expansion
//                  gA += gE).
// Stage B runs on the tile's rows plus a halo of p when stage C needs them. Every sum over pixels
// stays in vector lanes per item (zero padding columns where they enter) and items are summed in a
// fixed order in fp64: deterministic. Y2's moments: per row mean and centred squares (two passes
// over the L1-resident row), merged by Chan's update in fp64.
#include "cpu/train_stream.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/refine_tile.h"
#include "cpu/micro_kernels.h"

namespace refiner {
namespace cpu {

namespace {

constexpr int kRows = 32;  // rows per work item

template <class F> struct Ptrs {
  const F *A, *w_exp, *w_dw, *w_pro, *s1, *m1, *b1, *s2, *m2, *b2, *k2, *c1_2, *c2_2, *k1, *c1_1, *c2_1;
  F *map, *gA;
  int64_t H, N, rH;
  int k;
  bool expand;
};

// Per-item sums (vector lanes, then one value each): the pass's weight gradient, sum g, sum g x.
struct Slots {
  int64_t gw, sg, sgx, n;
  Slots(int64_t ngw, int64_t rH) : gw(0), sg(ngw), sgx(ngw + rH), n(ngw + 2 * rH) {}
};

// Mean and sum of squared deviations of x[0, n): a vector sum, then centred squares about its
// rounded mean plus the sum of the residuals, which recovers what the rounding lost.
template <class F> inline RF_INLINE void row_moments(const F* x, int64_t n, double& mean, double& m2) {
  constexpr int L = Vec<F>::L;
  const int64_t nv = n / L * L;
  vec_t<F> sv{};
  for (int64_t i = 0; i < nv; i += L) sv += vload(x + i);
  double s = 0;
  for (int l = 0; l < L; ++l) s += sv[l];
  for (int64_t i = nv; i < n; ++i) s += x[i];
  const F mu = F(s / double(n));
  const vec_t<F> muv = vec_t<F>{} + mu;
  vec_t<F> qv{}, rv{};
  for (int64_t i = 0; i < nv; i += L) {
    const vec_t<F> d = vload(x + i) - muv;
    qv += d * d;
    rv += d;
  }
  double q = 0, r = 0;
  for (int l = 0; l < L; ++l) q += qv[l], r += rv[l];
  for (int64_t i = nv; i < n; ++i) {
    const double d = double(x[i] - mu);
    q += d * d;
    r += d;
  }
  mean = double(mu) + r / double(n);
  m2 = std::max(0.0, q - r * r / double(n));
}

template <class F>
inline RF_INLINE void train_items(TrainPass pass, const Ptrs<F>& a, const Slots& sl, F* part, double* mom, int64_t s,
                                  int64_t e) {
  using VecF = vec_t<F>;
  constexpr int L = Vec<F>::L;
  const int64_t N = a.N, H = a.H, rH = a.rH, NN = N * N;
  const int k = a.k, p = k / 2, kk = k * k;
  const bool need_d = pass != TrainPass::Y2Moments;
  const bool need_c = pass == TrainPass::DwGrad || pass == TrainPass::ExpGrad;
  const bool keep_u = need_c && a.expand;
  const int hb = need_c ? p : 0;  // halo of the stage-B rows
  const int64_t ntiles = (N + kRows - 1) / kRows;
  // ldD: plain rows; ld: rows with borders (every read of a row stays inside it)
  const int64_t ldD = vec_pad<F>(N), ld = ldD + 2 * vec_pad<F>(2 * p), aplane = (kRows + 4 * p) * ld;
  const int64_t ring = k * rH * ld, slack = 2 * L;
  std::vector<F> abuf(H * aplane + slack), ering(a.expand ? ring + slack : 0), uring(keep_u ? ring + slack : 0),
      gyring(need_c ? ring + slack : 0), y2row(rH * ldD), drow(rH * ldD), g3row(H * ldD), gerow(rH * ldD),
      orow(H * ldD), acc(sl.n * L);
  std::vector<double> y2n(rH), y2mean(rH), y2m2(rH);  // the item's Y2 moments
  const Buf<F> Ab{abuf.data(), 2 * p, (int)ld, (int)aplane};
  std::vector<F> wt_exp(a.expand ? H * rH : 0), wt_pro(rH * H), wflip(rH * kk);  // W_exp^T, W_pro^T, flipped taps
  for (int64_t c = 0; c < rH; ++c) {
    for (int64_t h = 0; h < H; ++h) {
      if (a.expand) wt_exp[h * rH + c] = a.w_exp[c * H + h];
      wt_pro[c * H + h] = a.w_pro[h * rH + c];
    }
    for (int t = 0; t < kk; ++t) wflip[c * kk + t] = a.w_dw[c * kk + kk - 1 - t];
  }
  const int64_t nexp = a.expand ? rH : 0, nb = need_c ? rH : 0, nb1 = pass == TrainPass::ExpGrad ? rH : 0;
  const F six_s = 6, zero_s = 0;
  const Splat<F> wexp(a.w_exp, nexp * H), wexpT(wt_exp.data(), nexp * H), wpro(a.w_pro, H * rH),
      wproT(wt_pro.data(), rH * H), wdw(a.w_dw, rH * kk), wdwT(wflip.data(), rH * kk), s1(a.s1, nexp),
      m1(a.m1, nexp), b1(a.b1, nexp), s2(a.s2, need_d ? rH : 0), m2(a.m2, need_d ? rH : 0),
      b2(a.b2, need_d ? rH : 0), k2(a.k2, nb), c12(a.c1_2, nb), c22(a.c2_2, nb), k1(a.k1, nb1), c11(a.c1_1, nb1),
      c21(a.c2_1, nb1), six(&six_s, 1), zero(&zero_s, 1);
  const VecF vzero = zero[0], vsix = six[0];
  auto e_row = [&](int y, int64_t c) -> const F* RF_INLINE {  // E row y of channel c, column -p
    return a.expand ? ering.data() + (((y + 2 * p) % k) * rH + c) * ld : Ab.row((int)c, y) - p;
  };
  auto u_row = [&](int y, int64_t c) -> const F* RF_INLINE {  // U row y, column -p
    return uring.data() + (((y + 2 * p) % k) * rH + c) * ld;
  };
  auto gy_row = [&](int y, int64_t c) -> F* RF_INLINE {  // gY2 row y, column -p
    return gyring.data() + (((y + p) % k) * rH + c) * ld;
  };
  auto zero_pad = [&](F* row) RF_INLINE { std::fill(row + N, row + ldD, F(0)); };  // columns [N, vec_pad(N))
  auto slot = [&](int64_t i) RF_INLINE { return acc.data() + i * L; };
  auto vsum = [&](F* sl_, const F* g) RF_INLINE {  // g zero past N
    VecF sv = vload(sl_);
    for (int64_t x = 0; x < ldD; x += L) sv += vload(g + x);
    vstore(sl_, sv);
  };
  auto vdot = [&](F* sl_, const F* g, const F* xr, VecF m) RF_INLINE {  // sum g (x - m), g zero past N
    VecF sv = vload(sl_);
    for (int64_t x = 0; x < ldD; x += L) sv += vload(g + x) * (vload(xr + x) - m);
    vstore(sl_, sv);
  };
  // rows `row` of the C planes of gA_b (N columns each) += the C rows of src (stride ldD)
  auto add_rows = [&](F* gA_b, int64_t C, int64_t row, const F* src) RF_INLINE {
    for (int64_t c = 0; c < C; ++c) {
      F* dst = gA_b + c * NN + row * N;
      const F* sr = src + c * ldD;
      for (int64_t x = 0; x < N; ++x) dst[x] += sr[x];
    }
  };
  SerialPar par;
  for (int64_t idx = s; idx < e; ++idx) {
    const int64_t b = idx / ntiles, r0 = (idx % ntiles) * kRows;
    const Tile t{N, r0, 0, (int)std::min<int64_t>(kRows, N - r0), (int)N};
    std::fill(acc.begin(), acc.end(), F(0));
    std::fill(y2n.begin(), y2n.end(), 0.0);
    std::fill(y2mean.begin(), y2mean.end(), 0.0);
    std::fill(y2m2.begin(), y2m2.end(), 0.0);
    load_tile_rows(par, a.A + b * H * NN, (int)H, t, Ab);
    F* map_b = a.map ? a.map + b * H * NN : nullptr;
    F* gA_b = a.gA ? a.gA + b * H * NN : nullptr;
    for (int j = -hb - p; j < t.TR + hb + p; ++j) {
      // --- stage A: U, E row j
      if (a.expand) {
        F* er = ering.data() + ((j + 2 * p) % k) * rH * ld;
        F* ur = keep_u ? uring.data() + ((j + 2 * p) % k) * rH * ld : nullptr;
        if (!map_row(t, j)) {
          std::fill(er, er + rH * ld, F(0));
        } else {
          head_mix<F>((int)rH, (int)H, N + 2 * p, wexp.data(), Ab.row(0, j) - p, aplane,
                      [&](int m, int64_t x, VecF v) RF_INLINE {
                        if (ur) vstore(ur + m * ld + x, v);
                        vstore(er + m * ld + x, relu6_vec<F>(s1[m] * (v - m1[m]) + b1[m], vsix));
                      });
          for (int64_t c = 0; c < rH; ++c)
            for (int i = 0; i < p; ++i) er[c * ld + i] = er[c * ld + p + N + i] = F(0);
        }
      }
      // --- stage B: row yy
      const int yy = j - p;
      if (yy >= -hb && yy < t.TR + hb) {
        const bool centre = yy >= 0 && yy < t.TR;
        if (!map_row(t, yy)) {  // (only halo rows, for stage C: gY2 is zero off the map)
          for (int64_t c = 0; c < rH; ++c) std::fill(gy_row(yy, c), gy_row(yy, c) + ld, F(0));
        } else {
          const F* rows[7];
          for (int64_t c = 0; c < rH; ++c) {  // Y2 = dw(E), D = relu6(BN2(Y2))
            for (int i = 0; i < k; ++i) rows[i] = e_row(yy - p + i, c);
            F *y2 = y2row.data() + c * ldD, *dr = drow.data() + c * ldD;
            // (per-channel constants in locals: the stores below may alias the Splat storage, so
            // the compiler would reload them for every vector)
            const VecF s2c = need_d ? s2[c] : vzero, m2c = need_d ? m2[c] : vzero, b2c = need_d ? b2[c] : vzero;
            if (need_d)
              dw_row_apply_k<F>(k, rows, wdw.data() + c * kk * L, vzero, N, [&](int64_t x, VecF v) RF_INLINE {
                vstore(y2 + x, v);
                vstore(dr + x, relu6_vec<F>(s2c * (v - m2c) + b2c, vsix));
              });
            else
              dw_row_apply_k<F>(k, rows, wdw.data() + c * kk * L, vzero, N,
                                [&](int64_t x, VecF v) RF_INLINE { vstore(y2 + x, v); });
          }
          const int64_t grow = r0 + yy;  // the map row
          if (pass == TrainPass::Y2Moments) {
            for (int64_t c = 0; c < rH; ++c) {
              double rmean, rm2;
              row_moments(y2row.data() + c * ldD, N, rmean, rm2);
              chan_merge(y2n[c], y2mean[c], y2m2[c], double(N), rmean, rm2);
            }
          } else if (pass == TrainPass::Y3) {
            head_mix<F>((int)H, (int)rH, N, wpro.data(), drow.data(), ldD, [&](int m, int64_t x, VecF v) RF_INLINE {
              vstore(orow.data() + m * ldD + x, v);
            });
            for (int64_t h = 0; h < H; ++h)
              std::copy(orow.data() + h * ldD, orow.data() + h * ldD + N, map_b + h * NN + grow * N);
          } else {
            for (int64_t h = 0; h < H; ++h) {  // gY3 row, zero past N
              const F* src = map_b + h * NN + grow * N;
              std::copy(src, src + N, g3row.data() + h * ldD);
              zero_pad(g3row.data() + h * ldD);
            }
            if (pass == TrainPass::ProGrad) {
              mix_wgrad_row<F>((int)H, (int)rH, ldD, g3row.data(), ldD, drow.data(), ldD, slot(sl.gw));
              // gD2 = W_pro^T gY3 where 0 < D < 6, and BN2's sums
              head_mix<F>((int)rH, (int)H, N, wproT.data(), g3row.data(), ldD, [&](int c, int64_t x, VecF v) RF_INLINE {
                const VecF dv = vload(drow.data() + c * ldD + x);
                vstore(gerow.data() + c * ldD + x, (dv > vzero) & (dv < vsix) ? v : vzero);
              });
              for (int64_t c = 0; c < rH; ++c) {
                F* g = gerow.data() + c * ldD;
                zero_pad(g);
                vsum(slot(sl.sg + c), g);
                vdot(slot(sl.sgx + c), g, y2row.data() + c * ldD, m2[c]);
              }
            } else {  // gY2 = BN2's backward of gD2, into the ring
              head_mix<F>((int)rH, (int)H, N, wproT.data(), g3row.data(), ldD, [&](int c, int64_t x, VecF v) RF_INLINE {
                const VecF dv = vload(drow.data() + c * ldD + x);
                const VecF gd = (dv > vzero) & (dv < vsix) ? v : vzero;
                const VecF y2 = vload(y2row.data() + c * ldD + x);
                vstore(gy_row(yy, c) + p + x, k2[c] * ((gd - c22[c] * (y2 - m2[c])) - c12[c]));
              });
              for (int64_t c = 0; c < rH; ++c) zero_pad(gy_row(yy, c) + p);
              if (centre && pass == TrainPass::DwGrad)
                for (int64_t c = 0; c < rH; ++c) {
                  for (int i = 0; i < k; ++i) rows[i] = e_row(yy - p + i, c);
                  F* aw = slot(sl.gw + c * kk);
                  VecF av[49];
                  for (int tap = 0; tap < kk; ++tap) av[tap] = vload(aw + tap * L);
                  dw_wgrad_row_k<F>(k, av, gy_row(yy, c) + p, rows, ldD);
                  for (int tap = 0; tap < kk; ++tap) vstore(aw + tap * L, av[tap]);
                }
            }
          }
        }
      }
      // --- stage C: row y
      const int y = j - 2 * p;
      if (!need_c || y < 0 || y >= t.TR) continue;
      const F* rows[7];
      for (int64_t c = 0; c < rH; ++c) {
        for (int i = 0; i < k; ++i) rows[i] = gy_row(y - p + i, c);
        F* ge = gerow.data() + c * ldD;
        if (!a.expand) {  // gA += gE
          dw_row_apply_k<F>(k, rows, wdwT.data() + c * kk * L, vzero, N, [&](int64_t x, VecF v) RF_INLINE {
            vstore(ge + x, v);
          });
          continue;
        }
        const F *er = e_row(y, c) + p, *ur = u_row(y, c) + p;
        const bool to_gu = pass == TrainPass::ExpGrad;
        if (to_gu) {  // gU = BN1's backward of gE1
          const VecF k1c = k1[c], c21c = c21[c], m1c = m1[c], c11c = c11[c];
          dw_row_apply_k<F>(k, rows, wdwT.data() + c * kk * L, vzero, N, [&](int64_t x, VecF v) RF_INLINE {
            const VecF ev = vload(er + x), g = (ev > vzero) & (ev < vsix) ? v : vzero;
            vstore(ge + x, k1c * ((g - c21c * (vload(ur + x) - m1c)) - c11c));
          });
        } else {
          dw_row_apply_k<F>(k, rows, wdwT.data() + c * kk * L, vzero, N, [&](int64_t x, VecF v) RF_INLINE {
            const VecF ev = vload(er + x);
            vstore(ge + x, (ev > vzero) & (ev < vsix) ? v : vzero);
          });
        }
        zero_pad(ge);
        if (!to_gu) {
          vsum(slot(sl.sg + c), ge);
          vdot(slot(sl.sgx + c), ge, ur, m1[c]);
        }
      }
      if (!a.expand) {
        add_rows(gA_b, H, r0 + y, gerow.data());
      } else if (pass == TrainPass::ExpGrad) {  // gw_exp += gU A^T; gA += W_exp^T gU
        mix_wgrad_row<F>((int)rH, (int)H, ldD, gerow.data(), ldD, Ab.row(0, y), aplane, slot(sl.gw));
        head_mix<F>((int)H, (int)rH, N, wexpT.data(), gerow.data(), ldD, [&](int m, int64_t x, VecF v) RF_INLINE {
          vstore(orow.data() + m * ldD + x, v);
        });
        add_rows(gA_b, H, r0 + y, orow.data());
      }
    }
    lane_sums(acc.data(), sl.n, part + idx * sl.n);
    if (mom)
      for (int64_t c = 0; c < rH; ++c) mom[(idx * rH + c) * 2] = y2mean[c], mom[(idx * rH + c) * 2 + 1] = y2m2[c];
  }
}

RF_CLONES void train_items_f32(TrainPass pass, const Ptrs<float>& a, const Slots& sl, float* part, double* mom,
                               int64_t s, int64_t e) {
  train_items<float>(pass, a, sl, part, mom, s, e);
}
void train_items_any(TrainPass pass, const Ptrs<float>& a, const Slots& sl, float* part, double* mom, int64_t s,
                     int64_t e) {
  train_items_f32(pass, a, sl, part, mom, s, e);
}
void train_items_any(TrainPass pass, const Ptrs<double>& a, const Slots& sl, double* part, double* mom, int64_t s,
                     int64_t e) {
  train_items<double>(pass, a, sl, part, mom, s, e);
}

template <class F> const F* cptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<F>() : nullptr; }

}  // namespace

TrainStreamSums train_stream_pass(TrainPass pass, const TrainStreamArgs& a) {
  const int64_t B = a.A.size(0), H = a.A.size(1), N = a.A.size(2), rH = a.w_dw.size(0), k = a.w_dw.size(1);
  TORCH_CHECK(a.A.is_contiguous() && (!a.map.defined() || a.map.is_contiguous()) &&
                  (!a.gA.defined() || a.gA.is_contiguous()),
              "train_stream_pass: maps must be contiguous");
  const int64_t ntiles = (N + kRows - 1) / kRows, items = B * ntiles;
  const int64_t ngw = pass == TrainPass::ProGrad ? H * rH
                      : pass == TrainPass::DwGrad ? rH * k * k
                      : pass == TrainPass::ExpGrad ? rH * H
                                                   : 0;
  const Slots sl(ngw, rH);
  TrainStreamSums out;
  AT_DISPATCH_FLOATING_TYPES(a.A.scalar_type(), "train_stream_pass", [&] {
    using F = scalar_t;
    const Ptrs<F> p{a.A.data_ptr<F>(), cptr<F>(a.w_exp), cptr<F>(a.w_dw), cptr<F>(a.w_pro), cptr<F>(a.s1),
                    cptr<F>(a.m1), cptr<F>(a.b1), cptr<F>(a.s2), cptr<F>(a.m2), cptr<F>(a.b2), cptr<F>(a.k2),
                    cptr<F>(a.c1_2), cptr<F>(a.c2_2), cptr<F>(a.k1), cptr<F>(a.c1_1), cptr<F>(a.c2_1),
                    a.map.defined() ? a.map.data_ptr<F>() : nullptr, a.gA.defined() ? a.gA.data_ptr<F>() : nullptr,
                    H, N, rH, (int)k, a.expand};
    std::vector<F> part(items * sl.n);
    std::vector<double> mom(pass == TrainPass::Y2Moments ? items * rH * 2 : 0);
    at::parallel_for(0, items, 1, [&](int64_t s, int64_t e) {
      train_items_any(pass, p, sl, part.data(), mom.empty() ? nullptr : mom.data(), s, e);
    });
    const auto dopt = at::TensorOptions().dtype(at::kDouble);
    if (pass == TrainPass::Y2Moments) {  // merge the items' moments in item order
      out.mean = at::empty({rH}, dopt), out.m2 = at::empty({rH}, dopt);
      double *mp = out.mean.data_ptr<double>(), *m2p = out.m2.data_ptr<double>();
      for (int64_t c = 0; c < rH; ++c) {
        double n = 0, mean = 0, m2 = 0;
        for (int64_t i = 0; i < items; ++i) {
          const double rows = double(std::min<int64_t>(kRows, N - (i % ntiles) * kRows));
          chan_merge(n, mean, m2, rows * N, mom[(i * rH + c) * 2], mom[(i * rH + c) * 2 + 1]);
        }
        mp[c] = mean, m2p[c] = m2;
      }
      return;
    }
    auto total = at::zeros({sl.n}, dopt);  // item sums in item order
    double* tp = total.data_ptr<double>();
    for (int64_t i = 0; i < items; ++i)
      for (int64_t t = 0; t < sl.n; ++t) tp[t] += part[i * sl.n + t];
    if (ngw) {
      auto gw = total.narrow(0, sl.gw, ngw).to(a.A.scalar_type());
      out.gw = pass == TrainPass::ProGrad ? gw.view({H, rH})
               : pass == TrainPass::DwGrad ? gw.view({rH, k, k})
                                           : gw.view({rH, H});
    }
    if (pass == TrainPass::ProGrad || (pass == TrainPass::DwGrad && a.expand)) {  // BN2's / BN1's sums
      out.sum_g = total.narrow(0, sl.sg, rH).clone();
      out.sum_gx = total.narrow(0, sl.sgx, rH).clone();
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace refiner
