// refine_train's passes over the expanded maps on CUDA (train_pass.h), the counterpart of the
// CPU's cpu/train_stream.cpp: no (B, rH, N, N) map is ever written.
//
// One block per (batch, tile of TR x kTrainTC pixels), grid-stride over the tiles, capped at a few
// blocks per SM. A tile stages A (and, in the gradient passes, gY3) with a halo in shared memory,
// then walks the rH expanded channels: U = W_exp A and E = relu6(BN1(U)) on the centre plus a halo
// hE, Y2 = dw(E) and D = relu6(BN2(Y2)) on the centre plus hY (hY = p when the pass needs gY2 around
// the centre for dw's transpose, else 0; hE = hY + p), then the pass's own stage. Every sum over
// pixels is a warp per item (lanes over the tile's columns, an fp64 shuffle tree) into per-block
// fp64 slots owned by one lane; the host sums the blocks' slots in fp64: deterministic.
// Moments of Y2 per tile (mean, then centred squares) are merged by Chan's update, in the block
// and then over the blocks. The pixels of the centre outside the map are skipped by every sum.
// fp32 maps with H <= 16 run on train_tc.cuh's tensor-core kernel instead (launch_train_tc), which
// fills the same slots; this kernel serves fp64, H > 16 and REFINER_CUDA_TENSOR_CORES=0.
#include "cuda/train_tc.cuh"

namespace refiner {
namespace {

constexpr int kTrainTC = 32;  // tile columns: one warp spans a tile row
constexpr int kTrainThreads = 128;
static_assert(kTrainThreads % kTrainTC == 0, "whole thread-rows");

__host__ __device__ inline bool grad_pass(int pass) { return pass >= (int)TrainPass::ProGrad; }
__host__ __device__ inline bool dw_t_pass(int pass) {  // needs gY2 around the centre: dw's transpose
  return pass == (int)TrainPass::DwGrad || pass == (int)TrainPass::ExpGrad;
}

// Shared memory of a block, in elements of F after the slots: offsets of every buffer.
struct TrainLayout {
  int hE, hY;
  bool has_u, has_acc;
  int64_t a, e, u, y2, d, g3, gy, ge, acc, total;
  __host__ __device__ TrainLayout(int pass, bool expand, int H, int k, int TR) {
    const int p = k / 2;
    hY = dw_t_pass(pass) ? p : 0;
    hE = hY + p;
    const Tile t{1, 0, 0, TR, kTrainTC};
    int64_t o = 0;
    auto take = [&](int64_t n) { const int64_t at = o; o += n; return at; };
    a = take(buf_elems<float>(t, hE, H));
    e = take(expand ? buf_elems<float>(t, hE, 1) : 0);
    has_u = expand && dw_t_pass(pass);
    u = take(has_u ? buf_elems<float>(t, hE, 1) : 0);
    y2 = take(buf_elems<float>(t, hY, 1));
    d = take(pass != (int)TrainPass::Y2Moments ? buf_elems<float>(t, hY, 1) : 0);
    g3 = take(grad_pass(pass) ? buf_elems<float>(t, hY, H) : 0);
    gy = take(dw_t_pass(pass) ? buf_elems<float>(t, hY, 1) : 0);
    ge = take(grad_pass(pass) ? buf_elems<float>(t, 0, 1) : 0);
    has_acc = pass == (int)TrainPass::Y3 || pass == (int)TrainPass::ExpGrad ||
                         (pass == (int)TrainPass::DwGrad && !expand);
    acc = take(has_acc ? buf_elems<float>(t, 0, H) : 0);
    total = o;
  }
};

template <class F>
size_t train_smem(int pass, bool expand, int H, int rH, int k, int TR) {
  return sizeof(double) * TrainSlots(pass, H, rH, k).n + sizeof(F) * TrainLayout(pass, expand, H, k, TR).total;
}

// U = sum_h W_exp[c, h] A_h and E = relu6(s1 (U - m1) + b1) over the centre plus halo eh, E zero
// outside the map (dw's zero padding); U kept when U is given.
template <class F, class Par>
__device__ void train_expand(const Par& par, int c, int H, const TrainW<F>& w, const Tile& t, const Buf<F>& A,
                             const Buf<F>& E, const Buf<F>* U) {
  const int eh = E.halo;
  const F* we = w.w_exp + (int64_t)c * H;
  const F s = w.s1[c], m = w.m1[c], b = w.b1[c];
  for (int y = -eh + par.y0(); y < t.TR + eh; y += par.ny())
    for (int x = -eh + par.x0(); x < t.TC + eh; x += par.nx()) {
      F u = F(0);
      for (int h = 0; h < H; ++h) u += we[h] * A.at(h, y, x);
      if (U) U->at(0, y, x) = u;
      E.at(0, y, x) = t.inmap(y, x) ? relu6(s * (u - m) + b) : F(0);
    }
}

// Y2 = dw(E_ce) and D = relu6(s2 (Y2 - m2) + b2) (when D is given) over the centre plus halo hY.
template <class F, class Par>
__device__ void train_y2(const Par& par, int c, int k, const TrainW<F>& w, const Tile& t, const Buf<F>& E, int ce,
                         const Buf<F>& Y2, const Buf<F>* D) {
  const F* wd = w.w_dw + (int64_t)c * k * k;
  const int h = Y2.halo;
  for (int y = -h + par.y0(); y < t.TR + h; y += par.ny())
    for (int x = -h + par.x0(); x < t.TC + h; x += par.nx()) {
      const F y2 = dw_point(E, ce, wd, k, y, x);
      Y2.at(0, y, x) = y2;
      if (D) D->at(0, y, x) = relu6(w.s2[c] * (y2 - w.m2[c]) + w.b2[c]);
    }
}

// sum_h W_pro[h, c] G3_h at (y, x) where relu6 passes D (gD2, the gradient of BN2's output).
template <class F>
__device__ F train_gd2(int c, int H, int rH, const TrainW<F>& w, const Buf<F>& G3, const Buf<F>& D, int y, int x) {
  if (!relu6_pass(D.at(0, y, x))) return F(0);
  F g = F(0);
  for (int h = 0; h < H; ++h) g += w.w_pro[(int64_t)h * rH + c] * G3.at(h, y, x);
  return g;
}

// For items [0, n): slots[slot(i)] += sum over the tile's in-map centre pixels of term(i, y, x),
// a warp per item (lanes over columns, fp64 shuffle tree), the sum added by lane 0.
template <class Term, class Slot>
__device__ void warp_items(const Tile& t, int n, double* slots, Term term, Slot slot) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int i = warp; i < n; i += nw) {
    double s = 0;
    for (int pix = lane; pix < t.TR * t.TC; pix += 32) {
      const int y = pix / t.TC, x = pix % t.TC;
      if (t.inmap(y, x)) s += double(term(i, y, x));
    }
    s = warp_sum(s);
    if (lane == 0) slots[slot(i)] += s;
  }
}

// The moments of Y2's in-map centre pixels merged into slots (n, mean, m2) of channel c, by warp c.
template <class F>
__device__ void y2_moments(const Tile& t, const Buf<F>& Y2, int c, double* nmm) {
  const int lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  if ((int)(threadIdx.x >> 5) != c % nw) return;
  double s = 0, n = 0;
  for (int pix = lane; pix < t.TR * t.TC; pix += 32) {
    const int y = pix / t.TC, x = pix % t.TC;
    if (t.inmap(y, x)) s += double(Y2.at(0, y, x)), n += 1;
  }
  n = warp_sum(n);
  const double mean = warp_sum(s) / n;
  double q = 0;
  for (int pix = lane; pix < t.TR * t.TC; pix += 32) {
    const int y = pix / t.TC, x = pix % t.TC;
    if (t.inmap(y, x)) {
      const double dv = double(Y2.at(0, y, x)) - mean;
      q += dv * dv;
    }
  }
  q = warp_sum(q);
  if (lane == 0) chan_merge(nmm[0], nmm[1], nmm[2], n, mean, q);
}

// One instance per pass (kPass): each compiles to only its own stages and registers.
template <class F, int kPass>
__global__ void __launch_bounds__(kTrainThreads) train_pass_kernel(const F* __restrict__ A, F* __restrict__ map,
                                                                   F* __restrict__ gA, TrainW<F> w, bool expand,
                                                                   int64_t B, int H, int64_t N, int rH, int k, int TR,
                                                                   double* __restrict__ gpart) {
  constexpr int pass = kPass;
  RF_DYN_SHARED(double, smd);
  const TrainSlots sl(pass, H, rH, k);
  const TrainLayout L(pass, expand, H, k, TR);
  double* slots = smd;
  F* sm = reinterpret_cast<F*>(smd + sl.n);
  for (int64_t j = threadIdx.x; j < sl.n; j += blockDim.x) slots[j] = 0;
  const CudaPar par = tile_par(kTrainTC);
  const int p = k / 2, kk = k * k;
  const int64_t ntr = (N + TR - 1) / TR, ntc = (N + kTrainTC - 1) / kTrainTC, NN = N * N;
  constexpr bool moments = pass == (int)TrainPass::Y2Moments, y3 = pass == (int)TrainPass::Y3,
                 pro = pass == (int)TrainPass::ProGrad, dwg = pass == (int)TrainPass::DwGrad,
                 expg = pass == (int)TrainPass::ExpGrad;
  for (int64_t blk = blockIdx.x; blk < B * ntr * ntc; blk += gridDim.x) {
    const int64_t b = blk / (ntr * ntc), rc = blk % (ntr * ntc);
    const Tile t{N, rc / ntc * TR, rc % ntc * kTrainTC, TR, kTrainTC};
    const Buf<F> Ab = make_buf(sm + L.a, t, L.hE), Eb = make_buf(sm + L.e, t, L.hE), Y2b = make_buf(sm + L.y2, t, L.hY),
                 Db = make_buf(sm + L.d, t, L.hY), G3b = make_buf(sm + L.g3, t, L.hY), GYb = make_buf(sm + L.gy, t, L.hY),
                 GEb = make_buf(sm + L.ge, t, 0), ACCb = make_buf(sm + L.acc, t, 0);
    const Buf<F> Ub = make_buf(sm + L.u, t, L.hE);
    load_tile(par, A + b * H * NN, H, t, Ab);
    if (grad_pass(pass)) load_tile(par, map + b * H * NN, H, t, G3b);
    if (L.has_acc)
      for (int64_t j = threadIdx.x; j < L.total - L.acc; j += blockDim.x) sm[L.acc + j] = F(0);
    __syncthreads();
    for (int c = 0; c < rH; ++c) {
      const Buf<F>& Ec = expand ? Eb : Ab;
      const int ce = expand ? 0 : c;
      if (expand) {
        train_expand(par, c, H, w, t, Ab, Eb, L.has_u ? &Ub : nullptr);
        __syncthreads();
      }
      train_y2(par, c, k, w, t, Ec, ce, Y2b, moments ? nullptr : &Db);
      __syncthreads();
      if constexpr (moments) {
        y2_moments(t, Y2b, c, slots + 3 * c);
      } else if constexpr (y3) {  // Y3_h += W_pro[h, c] D
        for (int y = par.y0(); y < t.TR; y += par.ny())
          for (int x = par.x0(); x < t.TC; x += par.nx())
            for (int h = 0; h < H; ++h) ACCb.at(h, y, x) += w.w_pro[(int64_t)h * rH + c] * Db.at(0, y, x);
      } else if constexpr (pro) {  // gD2 into GE; gw_pro and BN2's sums
        for (int y = par.y0(); y < t.TR; y += par.ny())
          for (int x = par.x0(); x < t.TC; x += par.nx()) GEb.at(0, y, x) = train_gd2(c, H, rH, w, G3b, Db, y, x);
        __syncthreads();
        const F m2 = w.m2[c];
        warp_items(
            t, H + 2, slots,
            [&](int i, int y, int x) {
              return i < H ? G3b.at(i, y, x) * Db.at(0, y, x)
                           : GEb.at(0, y, x) * (i == H ? F(1) : Y2b.at(0, y, x) - m2);
            },
            [&](int i) { return i < H ? sl.gw + (int64_t)i * rH + c : (i == H ? sl.sg : sl.sgx) + c; });
      } else {  // DwGrad, ExpGrad: gY2 = BN2's backward of gD2 around the centre, gE = dw^T(gY2)
        const F k2 = w.k2[c], c12 = w.c12[c], c22 = w.c22[c], m2 = w.m2[c];
        for (int y = -L.hY + par.y0(); y < t.TR + L.hY; y += par.ny())
          for (int x = -L.hY + par.x0(); x < t.TC + L.hY; x += par.nx())
            GYb.at(0, y, x) = t.inmap(y, x)
                                  ? k2 * ((train_gd2(c, H, rH, w, G3b, Db, y, x) - c22 * (Y2b.at(0, y, x) - m2)) - c12)
                                  : F(0);
        __syncthreads();
        const F* wd = w.w_dw + (int64_t)c * kk;
        for (int y = par.y0(); y < t.TR; y += par.ny())
          for (int x = par.x0(); x < t.TC; x += par.nx()) {
            F ge = F(0);
            for (int i = 0; i < k; ++i)
              for (int j = 0; j < k; ++j) ge += wd[i * k + j] * GYb.at(0, y - (i - p), x - (j - p));
            if (!expand) {  // gA += gE
              ACCb.at(c, y, x) = ge;
              continue;
            }
            const F e = Eb.at(0, y, x), u = Ub.at(0, y, x), g1 = relu6_pass(e) ? ge : F(0);
            if (dwg) {
              GEb.at(0, y, x) = g1;
            } else {  // gU = BN1's backward of gE1; gA += W_exp^T gU
              const F gu = w.k1[c] * ((g1 - w.c21[c] * (u - w.m1[c])) - w.c11[c]);
              GEb.at(0, y, x) = gu;
              for (int h = 0; h < H; ++h) ACCb.at(h, y, x) += w.w_exp[(int64_t)c * H + h] * gu;
            }
          }
        __syncthreads();
        if (dwg) {  // gw_dw; BN1's sums
          const int n = kk + (expand ? 2 : 0);
          const F m1 = expand ? w.m1[c] : F(0);
          warp_items(
              t, n, slots,
              [&](int i, int y, int x) {
                if (i < kk) return GYb.at(0, y, x) * Ec.at(ce, y + i / k - p, x + i % k - p);
                return GEb.at(0, y, x) * (i == kk ? F(1) : Ub.at(0, y, x) - m1);
              },
              [&](int i) { return i < kk ? sl.gw + (int64_t)c * kk + i : (i == kk ? sl.sg : sl.sgx) + c; });
        } else if (expg) {  // gw_exp
          warp_items(
              t, H, slots, [&](int i, int y, int x) { return GEb.at(0, y, x) * Ab.at(i, y, x); },
              [&](int i) { return sl.gw + (int64_t)c * H + i; });
        }
      }
      __syncthreads();
    }
    if (y3) store_tile(par, map + b * H * NN, H, t, ACCb);
    if (expg || (dwg && !expand))  // gA (holding gZ) += the tile's sum
      for (int h = 0; h < H; ++h)
        for (int y = par.y0(); y < t.TR && t.r0 + y < N; y += par.ny()) {
          F* dst = gA + ((b * H + h) * N + t.r0 + y) * N + t.c0;
          for (int x = par.x0(); x < t.TC && t.c0 + x < N; x += par.nx()) dst[x] += ACCb.at(h, y, x);
        }
    __syncthreads();
  }
  for (int64_t j = threadIdx.x; j < sl.n; j += blockDim.x) gpart[blockIdx.x * sl.n + j] = slots[j];
}

template <class F> const F* ptr(const Tensor& t) { return t.defined() ? t.data_ptr<F>() : nullptr; }

// The CUDA-core kernel: a block per tile of TR rows (as many as fit in shared memory); its partial
// sums, a row per block.
template <class F>
Tensor launch_train_pass(int pass, const TrainStreamArgs& a, const TrainW<F>& w, const TrainSlots& sl) {
  const int64_t B = a.A.size(0), H = a.A.size(1), N = a.A.size(2), rH = a.w_dw.size(0), k = a.w_dw.size(1);
  const auto smem_of = [&](int tr) { return train_smem<F>(pass, a.expand, (int)H, (int)rH, (int)k, tr); };
  const int TR = tile_rows("REFINER_CUDA_TILE_ROWS", 4, smem_of);
  const size_t smem = smem_of(TR);
  auto kernel = pass == 0   ? train_pass_kernel<F, 0>
                : pass == 1 ? train_pass_kernel<F, 1>
                : pass == 2 ? train_pass_kernel<F, 2>
                : pass == 3 ? train_pass_kernel<F, 3>
                            : train_pass_kernel<F, 4>;
  set_smem(kernel, smem, "refine_train (or REFINER_TRAIN_PATH=chunk)");
  const int64_t tiles = B * ((N + TR - 1) / TR) * ((N + kTrainTC - 1) / kTrainTC);
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(tiles, 8LL * device_attr(cudaDevAttrMultiProcessorCount)));
  auto gpart = at::empty({blocks, std::max<int64_t>(sl.n, 1)}, a.A.options().dtype(at::kDouble));
  RF_LAUNCH(kernel, (unsigned)blocks, kTrainThreads, smem, c10::cuda::getCurrentCUDAStream())(
      a.A.data_ptr<F>(), a.map.defined() ? a.map.data_ptr<F>() : nullptr, a.gA.defined() ? a.gA.data_ptr<F>() : nullptr,
      w, a.expand, B, (int)H, N, (int)rH, (int)k, TR, gpart.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gpart;
}

// The tensor-core kernel (train_tc.cuh) serves fp32 maps with H <= 16 and kernel sizes 1-7 on
// sm_80+ when its planes fit in shared memory (REFINER_CUDA_TENSOR_CORES=0: the CUDA-core kernel).
bool train_tc_usable(int pass, bool expand, int64_t H, int64_t k) {
  return H <= kTcMaxHeads && (k == 1 || k == 3 || k == 5 || k == 7) && tensor_cores_for(at::kFloat) &&
         train_tc_smem(pass, expand, H, (int)k) <= (size_t)device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin);
}

template <int K, int kPass>
Tensor launch_train_tc_k(const TrainStreamArgs& a, const TrainW<float>& w, const TrainSlots& sl) {
  const int64_t B = a.A.size(0), H = a.A.size(1), N = a.A.size(2), rH = a.w_dw.size(0);
  const size_t smem = train_tc_smem(kPass, a.expand, H, K);
  auto* kernel = train_pass_tc_kernel<K, kPass>;  // (a macro argument cannot hold the template's comma)
  set_smem(kernel, smem, "refine_train");
  const int64_t tiles = B * ((N + kTcRows - 1) / kTcRows) * ((N + kTcCols - 1) / kTcCols);
  const int64_t blocks = std::min<int64_t>(tiles, 4LL * device_attr(cudaDevAttrMultiProcessorCount));
  auto gpart = at::zeros({blocks, std::max<int64_t>(sl.n, 1)}, a.A.options().dtype(at::kDouble));
  RF_LAUNCH(kernel, (unsigned)blocks, kTcThreads, smem, c10::cuda::getCurrentCUDAStream())(
      a.A.data_ptr<float>(), a.map.defined() ? a.map.data_ptr<float>() : nullptr,
      a.gA.defined() ? a.gA.data_ptr<float>() : nullptr, w, a.expand, B, (int)H, N, (int)rH, sl,
      gpart.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gpart;
}

// The tensor-core kernel's partial sums, or an undefined tensor where it does not serve (fp64 among others).
Tensor launch_train_tc(int, const TrainStreamArgs&, const TrainW<double>&, const TrainSlots&) { return Tensor(); }
Tensor launch_train_tc(int pass, const TrainStreamArgs& a, const TrainW<float>& w, const TrainSlots& sl) {
  if (!train_tc_usable(pass, a.expand, a.A.size(1), a.w_dw.size(1))) return Tensor();
  Tensor gpart;
  with_kernel_size(a.w_dw.size(1), [&](auto K) {
    switch (pass) {
      case 0: gpart = launch_train_tc_k<K, 0>(a, w, sl); break;
      case 1: gpart = launch_train_tc_k<K, 1>(a, w, sl); break;
      case 2: gpart = launch_train_tc_k<K, 2>(a, w, sl); break;
      case 3: gpart = launch_train_tc_k<K, 3>(a, w, sl); break;
      default: gpart = launch_train_tc_k<K, 4>(a, w, sl);
    }
  });
  return gpart;
}

TrainStreamSums train_pass_cuda(TrainPass pass_, const TrainStreamArgs& a) {
  const auto ct = a.A.scalar_type();
  TORCH_CHECK(ct == at::kFloat || ct == at::kDouble, "_train_pass: A must be float32 or float64, got ", ct);
  TORCH_CHECK(a.A.dim() == 4 && a.A.is_contiguous(), "_train_pass: A must be a contiguous (B, H, N, N) map");
  c10::cuda::CUDAGuard guard(a.A.device());
  const int pass = (int)pass_;
  const int64_t H = a.A.size(1), rH = a.w_dw.size(0), k = a.w_dw.size(1);
  const TrainSlots sl(pass, (int)H, (int)rH, (int)k);
  TrainStreamSums out;
  AT_DISPATCH_FLOATING_TYPES(ct, "_train_pass", [&] {
    using F = scalar_t;
    auto c = [&](const Tensor& t) { return t.defined() ? t.to(ct).contiguous() : t; };
    const Tensor ts[] = {c(a.w_exp), c(a.w_dw), c(a.w_pro), c(a.s1), c(a.m1), c(a.b1), c(a.s2), c(a.m2),
                         c(a.b2), c(a.k2), c(a.c1_2), c(a.c2_2), c(a.k1), c(a.c1_1), c(a.c2_1)};
    const TrainW<F> w{ptr<F>(ts[0]), ptr<F>(ts[1]), ptr<F>(ts[2]), ptr<F>(ts[3]),  ptr<F>(ts[4]),
                      ptr<F>(ts[5]), ptr<F>(ts[6]), ptr<F>(ts[7]), ptr<F>(ts[8]),  ptr<F>(ts[9]),
                      ptr<F>(ts[10]), ptr<F>(ts[11]), ptr<F>(ts[12]), ptr<F>(ts[13]), ptr<F>(ts[14])};
    for (const Tensor* m : {&a.map, &a.gA})
      TORCH_CHECK(!m->defined() || (m->is_contiguous() && m->sizes() == a.A.sizes() && m->scalar_type() == ct),
                  "_train_pass: map and gA must be contiguous and shaped and typed as A");
    Tensor gpart = launch_train_tc(pass, a, w, sl);
    if (!gpart.defined()) gpart = launch_train_pass(pass, a, w, sl);
    if (pass_ == TrainPass::Y3) return;
    if (pass_ == TrainPass::Y2Moments) {  // Chan's merge of the blocks' (n, mean, m2), in fp64
      auto s = gpart.view({gpart.size(0), rH, 3});
      auto n = s.select(2, 0), mean = s.select(2, 1), m2 = s.select(2, 2);
      auto ntot = n.sum(0);
      out.mean = (n * mean).sum(0) / ntot;
      out.m2 = m2.sum(0) + (n * (mean - out.mean).square()).sum(0);
      return;
    }
    auto total = gpart.sum(0);
    const int64_t ngw = sl.sg;
    auto gw = total.narrow(0, 0, ngw).to(ct);
    out.gw = pass_ == TrainPass::ProGrad  ? gw.view({H, rH})
             : pass_ == TrainPass::DwGrad ? gw.view({rH, k, k})
                                          : gw.view({rH, H});
    if (pass_ == TrainPass::ProGrad || (pass_ == TrainPass::DwGrad && a.expand))  // BN2's / BN1's sums
      out.sum_g = total.narrow(0, sl.sg, rH).clone(), out.sum_gx = total.narrow(0, sl.sgx, rH).clone();
  });
  return out;
}

}  // namespace
}  // namespace refiner

TORCH_LIBRARY_IMPL(RF_CUDA_LIB, RF_CUDA_KEY, m) {
  m.impl("_train_pass", &refiner::train_pass_op<&refiner::train_pass_cuda>);
}
