"""Training-mode refine block (BatchNorm batch statistics) without storing expanded maps.

    X1 = W_e A;  E = relu6(BN1(X1))        (E = A when not expand)
    X2 = dw_k(E); D = relu6(BN2(X2))
    Y3 = W_p D;   Z = A + BN3(Y3)
    out = (BN_a(Z) * scale) @ v

Forward passes (every pass is a tile kernel over (heads, positions) tiles as in refine_eval, the
stencil by k*k shifted loads with the expansion recomputed per offset; per-program partial
statistics are combined on the host side with Chan's parallel formula in float64):
  F1  moments of A: per-tile mean vector and centred Gram matrix -> BN1 mean = W_e mu_A,
      var = diag(W_e Sigma_A W_e^T) (BN1 of a linear layer costs a reduction, not a tensor).
      (expand only)
  F2  BN2 statistics of X2 (E recomputed with BN1 folded into W_e).
  F3  BN3 statistics of Y3; Y3 stored (an fp32 A-sized buffer, freed at the end of the forward).
  F4  BN_a statistics of Z, from the values of Z (not from moments of A and Y3: at zero BN3
      variance the algebra amplifies rounding by 1/(var3 + eps)); Z from A and the stored Y3.
  F5  R = BN_a(Z) * scale stored (A-sized, fp32), then out = R @ v (batched matmul).
Numerical robustness (a constant map, where every BN variance is 0 and each BN amplifies
position-to-position rounding differences by 1/sqrt(eps); a map with a large mean and a small
spread):
  - every statistic is a shifted per-tile moment (shift = the tile's first value, so a constant
    channel gives exactly mean = value, M2 = 0), merged with Chan's formula in float64;
  - A enters the expansion as W_e (A - K) and Z as (A - Kz) + ..., K and Kz an element of A per
    head, and Y3 as W_p (D - Dk) + W_p Dk with Dk = D at the BN2 mean: the folded BN affines never
    cancel large terms, and a constant map gives bit-identical values at every position;
  - Z (and Zhat, Y3hat) is one expression (`_zhat`) in every pass, with the statistics rounded to
    fp32 as the backward receives them, so forward, statistics and backward see the same values.
Backward (recompute; exact gradient through the batch statistics):
  Y3: the forward's buffer, kept (save_y3(), the default), or recomputed into a new one by F3's
  pass (bit-identical); R, B1, B2 and B3 read it: only F2, F3, B2 and B3 (and the backward's Y3
  pass when not kept) run the expansion and the stencil (recomputing Y3 in every pass instead
  measured 26.0 against 18.3 ms on the H100). fp16/bf16 maps: TF32 dots (_dot_precision).
  R recomputed (F5's pass) -> dv = R^T dO, dR = dO v^T (A-sized).
  B1  sums of dRn, dRn*Zhat, dRn*Y3hat, Zhat*Y3hat per head -> dga, dba, dg3, db3.
  B2  dY3 per position, dW_p partials, sums of dD', dD'*X2hat per channel -> dg2, db2.
  B3  halo-extended tiles: dX2, dW_dw partials (E staged over the tile in a small per-program
      scratch buffer), transposed stencil of dX2 staged the same way -> dE -> dX1' ; partial sums
      for dg1, db1, dW_e and dA except the BN1 mean/variance terms, which are an H x H mix of
      A - K plus a bias, added last by one pass over dA and A (_rt_mix) that writes dA in A's dtype.
Memory: a few A-sized (B,H,N,N) tensors and O(programs * channels) partials; no (B,rH,N,N).
Candidates (REFINER_TRITON_TRAIN_X2, see _x2_mode): "halo", the passes that form X2 (F2, F3, the
backward's Y3, B2) run on halo tiles whose owned interiors tile the map, and E is staged once per
channel chunk through a per-program scratch instead of recomputed at every stencil offset;
"gather", those passes on column-halo tiles, E formed once per stencil row shift and moved to the
column shifts by tl.gather.
"""
from __future__ import annotations

import contextlib
import os

import torch

from ._common import (batch_chunks, check_inputs, check_image_map, gpu_autotune, interpreting, next_pow2, num_warps_for,
                      token_major, triton, tl, unit_head_stride, use_tuned)
from .blocks import bmm
from .settings import switch
from . import kernels_refine_eval as _eval

CC = 16
# rows of the per-head constant pack
# (a3 = g3 rs3, b3, muZ - Kz, rsa, mu3 - W_p Dk, rs3 | ka, dba/n, dga/n, k3, db3/n, dg3/n | ga, ba, Kz); see _hv
H_A3, H_B3, H_MUZ, H_RSA, H_MU3, H_RS3, H_KA, H_DBA, H_DGA, H_K3, H_DB3, H_DG3, H_GA, H_BA, H_KZ = range(15)
NHC = 15
# rows of the per-expanded-channel constant pack
# (C_MU1: BN1 mean of W_e (A - K); C_DK: the shift Dk of D in Y3 = W_p (D - Dk) + W_p Dk); see _cv
C_A2, C_C2, C_MU2, C_RS2, C_K2, C_DB2, C_DG2, C_MU1, C_RS1, C_K1, C_DK = range(11)
NCC = 11


if triton is not None:
    from .kernels_refine_eval import (dot, dw_wgrad_staged, gather_tile, halo_tile, stencil_gathered, stencil_recomputed,
                                      stencil_staged)

    @triton.jit
    def _x2_staged(a0s, inmap, we, be, wdw_ptr, cc, mc, scr, p, pm, pj,
                   KS: tl.constexpr, RELU_E: tl.constexpr, PREC: tl.constexpr, CC: tl.constexpr, TM: tl.constexpr,
                   TJ: tl.constexpr):
        """X2 = dw(E) exact at a halo tile's owned positions, E computed once over the tile from
        a0s = A - K (kernels_refine_eval.stencil_staged)."""
        e = dot(we, a0s, PREC) + be[:, None]
        if RELU_E:
            e = tl.minimum(tl.maximum(e, 0.0), 6.0)
        return stencil_staged(e, inmap, wdw_ptr, cc, mc, scr, p, pm, pj, KS, CC, TM, TJ)

    @triton.jit
    def _x2(a_ptr, base_a, hoff, row, col, N, mh, ks, we, be, wdw_ptr, cc, mc, a0s, inmap, scr, p, pm, pj,
            KS: tl.constexpr, RELU_E: tl.constexpr, PREC: tl.constexpr, CC: tl.constexpr, TM: tl.constexpr,
            TJ: tl.constexpr, HALO: tl.constexpr, GATHER: tl.constexpr):
        """X2 of channels cc: staged (HALO tiles), column shifts gathered (GATHER tiles; both exact at
        the owned positions) or recomputed per offset."""
        if HALO:
            x2 = _x2_staged(a0s, inmap, we, be, wdw_ptr, cc, mc, scr, p, pm, pj, KS, RELU_E, PREC, CC, TM, TJ)
        elif GATHER:
            x2 = stencil_gathered(a_ptr + base_a, hoff, row, col, N, mh, ks, we, be, wdw_ptr, KS * KS, 1, cc, mc, KS,
                                  RELU_E, PREC, False, CC, TM, TJ)
        else:
            x2 = stencil_recomputed(a_ptr, base_a, hoff, row, col, p >= 0, N, mh, ks, we, be, wdw_ptr, cc, mc, KS,
                                    RELU_E, PREC, CC, TM * TJ)
        return x2

    @triton.jit
    def _y3_at(a_ptr, base_a, hoff, row, col, N, H, RH, RHP, hh, mh, ks, we_ptr, be_ptr, wdw_ptr, wp_ptr,
               cv_ptr, a0s, inmap, scr, p, pm, pj, KS: tl.constexpr, RELU_E: tl.constexpr,
               PREC: tl.constexpr, CC: tl.constexpr, TM: tl.constexpr, TJ: tl.constexpr, HP: tl.constexpr,
               HALO: tl.constexpr, GATHER: tl.constexpr):
        P: tl.constexpr = TM * TJ
        y = tl.zeros((HP, P), tl.float32)
        for c0 in range(0, RH, CC):
            cc = c0 + tl.arange(0, CC)
            mc = cc < RH
            we = tl.load(we_ptr + cc[:, None] * H + hh[None, :], mask=mc[:, None] & mh[None, :], other=0.0)
            be = tl.load(be_ptr + cc, mask=mc, other=0.0)
            x2 = _x2(a_ptr, base_a, hoff, row, col, N, mh, ks, we, be, wdw_ptr, cc, mc, a0s, inmap, scr, p, pm, pj,
                     KS, RELU_E, PREC, CC, TM, TJ, HALO, GATHER)
            a2 = tl.load(cv_ptr + 0 * RHP + cc, mask=mc, other=0.0)
            c2 = tl.load(cv_ptr + 1 * RHP + cc, mask=mc, other=0.0)
            dk = tl.load(cv_ptr + 10 * RHP + cc, mask=mc, other=0.0)
            d = tl.where(mc[:, None], tl.minimum(tl.maximum(a2[:, None] * x2 + c2[:, None], 0.0), 6.0) - dk[:, None],
                         0.0)
            wp = tl.load(wp_ptr + hh[:, None] * RH + cc[None, :], mask=mh[:, None] & mc[None, :], other=0.0)
            y += dot(wp, d, PREC)
        return y

    @triton.jit
    def _hconst(hv_ptr, i, hh, mh, HP: tl.constexpr):
        return tl.load(hv_ptr + i * HP + hh, mask=mh, other=0.0)

    @triton.jit
    def _moments(x, ok, first):
        """Shifted per-tile moments of x (C, P) over the valid positions `ok`: the shift is the value
        at the tile's first position (always valid), so a constant channel gives exactly
        (shift, 0, 0) and a large mean never meets its small spread in one fp32 sum.
        Returns (shift, mean of x - shift, centred values x - shift - that mean, 0 where invalid)."""
        sh = tl.sum(tl.where(first, x, 0.0), axis=1)
        d = tl.where(ok, x - sh[:, None], 0.0)
        okf = tl.where(ok, 1.0, 0.0)
        md = tl.sum(d, axis=1) / tl.maximum(tl.sum(okf, axis=1), 1.0)
        return sh, md, tl.where(ok, d - md[:, None], 0.0)

    @triton.jit
    def _zhat(a0, y, hv_ptr, hh, mh, HP: tl.constexpr):
        """The one expression of Z (and of the normalised Z, Y3) every pass uses, so that all passes
        see bit-identical values: Z - Kz = (A - Kz) + (g3 (Y3 - mu3) rs3 + b3), Zhat = (Z - muZ) rs_a,
        with a per-head shift Kz (an element of A: a large mean of A never enters an fp32 sum)."""
        yc = y - _hconst(hv_ptr, 4, hh, mh, HP)[:, None]
        z = (a0 - _hconst(hv_ptr, 14, hh, mh, HP)[:, None]) + (_hconst(hv_ptr, 0, hh, mh, HP)[:, None] * yc + _hconst(hv_ptr, 1, hh, mh, HP)[:, None])
        zhat = (z - _hconst(hv_ptr, 2, hh, mh, HP)[:, None]) * _hconst(hv_ptr, 3, hh, mh, HP)[:, None]
        yhat = yc * _hconst(hv_ptr, 5, hh, mh, HP)[:, None]
        return z, zhat, yhat

    @triton.jit
    def _dz_dy3(dr, zhat, yhat, hv_ptr, hh, mh, m2, HP: tl.constexpr):
        """dZ and dY3 (0 off m2) from dR (scale applied) through BN_a's and BN3's backward."""
        dz = _hconst(hv_ptr, 6, hh, mh, HP)[:, None] * (
            dr - _hconst(hv_ptr, 7, hh, mh, HP)[:, None] - zhat * _hconst(hv_ptr, 8, hh, mh, HP)[:, None])
        dz = tl.where(m2, dz, 0.0)
        dy3 = _hconst(hv_ptr, 9, hh, mh, HP)[:, None] * (
            dz - _hconst(hv_ptr, 10, hh, mh, HP)[:, None] - yhat * _hconst(hv_ptr, 11, hh, mh, HP)[:, None])
        return dz, tl.where(m2, dy3, 0.0)

    @triton.jit
    def _dx2(x2, dy3, wp_ptr, cv_ptr, cc, mc, hh, mh, RH, RHP, PREC: tl.constexpr):
        """dX2 of channels cc: W_p^T dY3 through relu6 and BN2's backward (rows 4-6 of the channel
        constants: k2, db2/n, dg2/n)."""
        pre = tl.load(cv_ptr + 0 * RHP + cc, mask=mc, other=0.0)[:, None] * x2 + \
            tl.load(cv_ptr + 1 * RHP + cc, mask=mc, other=0.0)[:, None]
        wpt = tl.load(wp_ptr + hh[None, :] * RH + cc[:, None], mask=mh[None, :] & mc[:, None], other=0.0)
        ddp = tl.where((pre > 0.0) & (pre < 6.0), dot(wpt, dy3, PREC), 0.0)
        x2hat = (x2 - tl.load(cv_ptr + 2 * RHP + cc, mask=mc, other=0.0)[:, None]) * \
            tl.load(cv_ptr + 3 * RHP + cc, mask=mc, other=0.0)[:, None]
        return tl.load(cv_ptr + 4 * RHP + cc, mask=mc, other=0.0)[:, None] * (
            ddp - tl.load(cv_ptr + 5 * RHP + cc, mask=mc, other=0.0)[:, None]
            - x2hat * tl.load(cv_ptr + 6 * RHP + cc, mask=mc, other=0.0)[:, None])

    @triton.jit
    def _dx1(de, a0s, wer_ptr, cv_ptr, cc, mc, hh, mh, H, RHP, pbase, pm_row, RELU_E: tl.constexpr,
             PREC: tl.constexpr, HP: tl.constexpr):
        """BN1's backward for channels cc given dE (0 off the positions summed over): stores the
        partial sums of db1 and dg1 (pbase rows 0, 1) and M = sum dX1' (A - K)^T (pm_row: the
        program's (RHP, HP) block) when expand, and returns dA's term (k1 W_e)^T dE."""
        wer = tl.load(wer_ptr + cc[:, None] * H + hh[None, :], mask=mc[:, None] & mh[None, :], other=0.0)
        if RELU_E:
            x1hat = (dot(wer, a0s, PREC)
                     - tl.load(cv_ptr + 7 * RHP + cc, mask=mc, other=0.0)[:, None]) * \
                tl.load(cv_ptr + 8 * RHP + cc, mask=mc, other=0.0)[:, None]
            tl.store(pbase + 0 * RHP + cc, tl.sum(de, axis=1))
            tl.store(pbase + 1 * RHP + cc, tl.sum(de * x1hat, axis=1))
            tl.store(pm_row + cc[:, None] * HP + hh[None, :], dot(de, tl.trans(a0s), PREC))
        k1 = tl.load(cv_ptr + 9 * RHP + cc, mask=mc, other=0.0)
        return dot(tl.trans(wer * k1[:, None]), de, PREC)

    @triton.jit
    def _rt_tile(a_ptr, dr_ptr, y_ptr, we_ptr, be_ptr, wdw_ptr, wp_ptr, cv_ptr, hv_ptr, ks_ptr, part_ptr, pn_ptr,
                 pwp_ptr, scr_ptr, N, H, RH, RHP, NTJ, scale,
                 MODE: tl.constexpr, KS: tl.constexpr, RELU_E: tl.constexpr, PREC: tl.constexpr, HP: tl.constexpr,
                 CC: tl.constexpr, TM: tl.constexpr, TJ: tl.constexpr, W: tl.constexpr, HALO: tl.constexpr,
                 GATHER: tl.constexpr = False):
        """Tile pass over non-overlapping tiles, or (HALO) over halo tiles whose owned interiors tile
        the map, X2 then staged through scr_ptr (_x2_staged), or (GATHER) over gather tiles (column
        tiles overlapping by the halo; kernels_refine_eval.gather_tile), X2 by stencil_gathered.
        MODE 1: moments of A (F1). 2: BN2 stats of X2 (F2). 3: BN3 stats of Y3 (F3). 6: BN_a stats of Z (F4). 7: R stored to dr_ptr (F5, and the
        backward's recompute). 4: B1 sums. 5: B2 (dW_p partials, dg2/db2 sums).
        MODE 3 stores the tile's Y3 - W_p Dk to y_ptr (fp32, A-sized); the later modes load it from
        there instead of recomputing the expansion, the stencil and the reduction.
        Statistics are shifted per-tile moments (`_moments`): rows 0, 1, 2 of the partials hold
        shift, mean - shift and the centred sum of squares (MODE 1: the centred Gram matrix)."""
        P: tl.constexpr = TM * TJ
        pid_t = tl.program_id(1)
        b = tl.program_id(0).to(tl.int64)
        prog = b * tl.num_programs(1) + pid_t
        PAD: tl.constexpr = KS // 2
        hh = tl.arange(0, HP)
        mh = hh < H
        if HALO:  # `valid`: the owned positions (every statistic and output); `inmap`: all in the map
            p, pm, pj, row, col, inmap, valid = halo_tile(pid_t, NTJ, N, KS, TM, TJ)
            first = (p == PAD * TJ + PAD)[None, :]  # the first owned position (the moments' shift)
        elif GATHER:
            p = tl.arange(0, P)
            pm = p // TJ
            pj = p % TJ
            row, col, inmap, valid = gather_tile(pid_t // NTJ, pid_t % NTJ, N, KS, TM, TJ)
            first = (p == PAD)[None, :]
        else:
            p = tl.arange(0, P)
            pm = p // TJ
            pj = p % TJ
            row = (pid_t // NTJ) * TM + pm
            col = (pid_t % NTJ) * TJ + pj
            inmap = (row < N) & (col < N)
            valid = inmap
            first = (p == 0)[None, :]
        vf = tl.where(valid, 1.0, 0.0)
        nt = tl.sum(vf, axis=0)
        tl.store(pn_ptr + prog, nt)
        base_a = b * H * N * N
        hoff = hh[:, None] * (N * N)  # int32 offsets off the image base (_common.check_image_map)
        ks = tl.load(ks_ptr + hh, mask=mh, other=0.0)  # per-head shift of A in the expansion (0: none)
        m2 = mh[:, None] & valid[None, :]
        a0 = tl.load(a_ptr + base_a + (hoff + (row * N + col)[None, :]), mask=mh[:, None] & inmap[None, :],
                     other=0.0).to(tl.float32)
        a0s = tl.where(mh[:, None] & inmap[None, :], a0 - ks[:, None], 0.0)  # the expansion's input (HALO)
        scr = scr_ptr + prog * (CC * P)
        pbase = part_ptr + prog * 8 * W
        if MODE == 1:
            sh, md, ac = _moments(a0, m2, first)
            tl.store(pbase + 0 * W + hh, sh)
            tl.store(pbase + 1 * W + hh, md)
            gram = tl.dot(ac, tl.trans(ac), input_precision="ieee")
            tl.store(pwp_ptr + prog * HP * HP + hh[:, None] * HP + hh[None, :], gram)
        if MODE == 2:
            for c0 in range(0, RH, CC):
                cc = c0 + tl.arange(0, CC)
                mc = cc < RH
                we = tl.load(we_ptr + cc[:, None] * H + hh[None, :], mask=mc[:, None] & mh[None, :], other=0.0)
                be = tl.load(be_ptr + cc, mask=mc, other=0.0)
                x2 = _x2(a_ptr, base_a, hoff, row, col, N, mh, ks, we, be, wdw_ptr, cc, mc, a0s, inmap, scr, p, pm,
                         pj, KS, RELU_E, PREC, CC, TM, TJ, HALO, GATHER)
                sh, md, xc = _moments(x2, mc[:, None] & valid[None, :], first)
                tl.store(pbase + 0 * W + cc, sh, mask=mc)
                tl.store(pbase + 1 * W + cc, md, mask=mc)
                tl.store(pbase + 2 * W + cc, tl.sum(xc * xc, axis=1), mask=mc)
        if MODE >= 3:
            if MODE == 3:
                y = _y3_at(a_ptr, base_a, hoff, row, col, N, H, RH, RHP, hh, mh, ks, we_ptr, be_ptr, wdw_ptr, wp_ptr,
                           cv_ptr, a0s, inmap, scr, p, pm, pj, KS, RELU_E, PREC, CC, TM, TJ, HP, HALO, GATHER)
                y = tl.where(m2, y, 0.0)
                tl.store(y_ptr + base_a + (hoff + (row * N + col)[None, :]), y, mask=m2)
            else:
                y = tl.load(y_ptr + base_a + (hoff + (row * N + col)[None, :]), mask=m2, other=0.0)
            if MODE == 3:
                sh, md, yc = _moments(y, m2, first)
                tl.store(pbase + 0 * W + hh, sh)
                tl.store(pbase + 1 * W + hh, md)
                tl.store(pbase + 2 * W + hh, tl.sum(yc * yc, axis=1))
            else:
                z, zhat, yhat = _zhat(a0, y, hv_ptr, hh, mh, HP)
                if MODE == 6:
                    sh, md, zc = _moments(z, m2, first)
                    tl.store(pbase + 0 * W + hh, sh)
                    tl.store(pbase + 1 * W + hh, md)
                    tl.store(pbase + 2 * W + hh, tl.sum(zc * zc, axis=1))
                if MODE == 7:
                    r = (zhat * _hconst(hv_ptr, 12, hh, mh, HP)[:, None] + _hconst(hv_ptr, 13, hh, mh, HP)[:, None]) \
                        * scale
                    tl.store(dr_ptr + base_a + (hoff + (row * N + col)[None, :]), r, mask=m2)
                if MODE == 4:
                    dr = tl.load(dr_ptr + base_a + (hoff + (row * N + col)[None, :]), mask=m2, other=0.0) * scale
                    tl.store(pbase + 0 * W + hh, tl.sum(dr, axis=1))
                    tl.store(pbase + 1 * W + hh, tl.sum(tl.where(m2, dr * zhat, 0.0), axis=1))
                    tl.store(pbase + 2 * W + hh, tl.sum(tl.where(m2, dr * yhat, 0.0), axis=1))
                    tl.store(pbase + 3 * W + hh, tl.sum(tl.where(m2, zhat * yhat, 0.0), axis=1))
                if MODE == 5:
                    dr = tl.load(dr_ptr + base_a + (hoff + (row * N + col)[None, :]), mask=m2, other=0.0) * scale
                    _, dy3 = _dz_dy3(dr, zhat, yhat, hv_ptr, hh, mh, m2, HP)
                    for c0 in range(0, RH, CC):
                        cc = c0 + tl.arange(0, CC)
                        mc = cc < RH
                        we = tl.load(we_ptr + cc[:, None] * H + hh[None, :], mask=mc[:, None] & mh[None, :], other=0.0)
                        be = tl.load(be_ptr + cc, mask=mc, other=0.0)
                        x2 = _x2(a_ptr, base_a, hoff, row, col, N, mh, ks, we, be, wdw_ptr, cc, mc, a0s, inmap, scr, p,
                                 pm, pj, KS, RELU_E, PREC, CC, TM, TJ, HALO, GATHER)
                        a2 = tl.load(cv_ptr + 0 * RHP + cc, mask=mc, other=0.0)
                        c2 = tl.load(cv_ptr + 1 * RHP + cc, mask=mc, other=0.0)
                        pre = a2[:, None] * x2 + c2[:, None]
                        d = tl.where(mc[:, None] & valid[None, :], tl.minimum(tl.maximum(pre, 0.0), 6.0), 0.0)
                        tl.store(pwp_ptr + prog * HP * RHP + hh[:, None] * RHP + cc[None, :],
                                 dot(dy3, tl.trans(d), PREC))
                        wpt = tl.load(wp_ptr + hh[None, :] * RH + cc[:, None], mask=mh[None, :] & mc[:, None],
                                      other=0.0)
                        dd = dot(wpt, dy3, PREC)
                        ddp = tl.where((pre > 0.0) & (pre < 6.0) & mc[:, None] & valid[None, :], dd, 0.0)
                        x2hat = (x2 - tl.load(cv_ptr + 2 * RHP + cc, mask=mc, other=0.0)[:, None]) * \
                            tl.load(cv_ptr + 3 * RHP + cc, mask=mc, other=0.0)[:, None]
                        tl.store(pbase + 0 * W + cc, tl.sum(ddp, axis=1), mask=mc)
                        tl.store(pbase + 1 * W + cc, tl.sum(ddp * x2hat, axis=1), mask=mc)

    @triton.jit
    def _rt_b3(a_ptr, dr_ptr, y_ptr, we_ptr, be_ptr, wer_ptr, wdw_ptr, wp_ptr, cv_ptr, hv_ptr, ks_ptr,
               da_ptr, scr_ptr, part_ptr, pwdw_ptr, pm_ptr, N, H, RH, RHP, NTJ, scale,
               KS: tl.constexpr, RELU_E: tl.constexpr, PREC: tl.constexpr, HP: tl.constexpr, CC: tl.constexpr,
               TM: tl.constexpr, TJ: tl.constexpr):
        """Halo-extended tiles: dX2, dW_dw partials, transposed stencil, dX1', dA (partial).
        Y3 loaded from the buffer y_ptr (see _rt_tile)."""
        P: tl.constexpr = TM * TJ
        KK: tl.constexpr = KS * KS
        pid_t = tl.program_id(1)
        b = tl.program_id(0).to(tl.int64)
        prog = b * tl.num_programs(1) + pid_t
        hh = tl.arange(0, HP)
        mh = hh < H
        p, pm, pj, row, col, inmap, own = halo_tile(pid_t, NTJ, N, KS, TM, TJ)
        ownf = tl.where(own, 1.0, 0.0)
        base_a = b * H * N * N
        hoff = hh[:, None] * (N * N)  # int32 offsets off the image base (_common.check_image_map)
        ks = tl.load(ks_ptr + hh, mask=mh, other=0.0)  # per-head shift of A in the expansion (0: none)
        m2 = mh[:, None] & inmap[None, :]
        a0 = tl.load(a_ptr + base_a + (hoff + (row * N + col)[None, :]), mask=m2, other=0.0).to(tl.float32)
        a0s = tl.where(m2, a0 - ks[:, None], 0.0)
        dr = tl.load(dr_ptr + base_a + (hoff + (row * N + col)[None, :]), mask=m2, other=0.0) * scale
        # Y3 from the buffer (0 off the map: dz and dy3 are masked there)
        y = tl.load(y_ptr + base_a + (hoff + (row * N + col)[None, :]), mask=m2, other=0.0)
        _, zhat, yhat = _zhat(a0, y, hv_ptr, hh, mh, HP)
        da, dy3 = _dz_dy3(dr, zhat, yhat, hv_ptr, hh, mh, m2, HP)
        scr = scr_ptr + prog * (CC * P)
        pbase = part_ptr + prog * 2 * RHP
        for c0 in range(0, RH, CC):
            cc = c0 + tl.arange(0, CC)
            mc = cc < RH
            we = tl.load(we_ptr + cc[:, None] * H + hh[None, :], mask=mc[:, None] & mh[None, :], other=0.0)
            be = tl.load(be_ptr + cc, mask=mc, other=0.0)
            x2 = stencil_recomputed(a_ptr, base_a, hoff, row, col, p >= 0, N, mh, ks, we, be, wdw_ptr, cc, mc, KS,
                                    RELU_E, PREC, CC, P)
            dx2 = tl.where(mc[:, None] & inmap[None, :], _dx2(x2, dy3, wp_ptr, cv_ptr, cc, mc, hh, mh, RH, RHP, PREC),
                           0.0)
            dx2_own = dx2 * ownf[None, :]
            # dW_dw partials from E computed once over the tile (not once per offset)
            x1pre = dot(we, a0s, PREC) + be[:, None]
            e0 = tl.minimum(tl.maximum(x1pre, 0.0), 6.0) if RELU_E else x1pre
            dw_wgrad_staged(e0, inmap, dx2_own, scr, p, pm, pj, pwdw_ptr + prog * RHP * KK + cc * KK, KS, CC, TM, TJ)
            de = stencil_staged(dx2, inmap, wdw_ptr, cc, mc, scr, p, pm, pj, KS, CC, TM, TJ, True)  # dw_k^T
            if RELU_E:
                de = tl.where((x1pre > 0.0) & (x1pre < 6.0), de, 0.0)
            de = tl.where(mc[:, None] & own[None, :], de, 0.0)
            da += _dx1(de, a0s, wer_ptr, cv_ptr, cc, mc, hh, mh, H, RHP, pbase, pm_ptr + prog * RHP * HP, RELU_E,
                       PREC, HP)
        tl.store(da_ptr + base_a + (hoff + (row * N + col)[None, :]), da.to(da_ptr.dtype.element_ty),
                 mask=mh[:, None] & own[None, :])

    @triton.jit
    def _rt_mix(a_ptr, da_ptr, out_ptr, mx_ptr, ks_ptr, bx_ptr, N, H, HP: tl.constexpr, P: tl.constexpr):
        """dA's last terms at P flat positions of one image, in one pass: out = (dA + mx (A - K)) + bx
        in A's dtype (dA: B3's fp32 partial; mx, bx: BN1's mean/variance terms, an H x H mix and a
        per-head bias; K: the expansion's per-head shift of A, as the forward subtracted it). The mix
        is H outer products on CUDA cores (an fp32 tl.dot held ~200 registers a thread here)."""
        base = tl.program_id(1).to(tl.int64) * H * N * N  # int32 offsets within the image
        q = tl.program_id(0) * P + tl.arange(0, P)
        hh = tl.arange(0, HP)
        mh = hh < H
        valid = q < N * N
        m2 = mh[:, None] & valid[None, :]
        off = hh[:, None] * (N * N) + q[None, :]
        acc = tl.load(da_ptr + base + off, mask=m2, other=0.0)
        for j in range(0, H):
            a_j = tl.load(a_ptr + base + j * N * N + q, mask=valid, other=0.0).to(tl.float32) - tl.load(ks_ptr + j)
            acc += tl.load(mx_ptr + hh * H + j, mask=mh, other=0.0)[:, None] * a_j[None, :]
        acc += tl.load(bx_ptr + hh, mask=mh, other=0.0)[:, None]
        tl.store(out_ptr + base + off, acc.to(out_ptr.dtype.element_ty), mask=m2)


if triton is not None:
    # Warps (and pipelining) of the passes on plain tiles and of B3, tuned on the GPU: ptxas (sm_90) gives
    # F3 234 registers at 8 warps (one block an SM) and 128 at 16 (two), the TF32 X2 passes fit 16 warps
    # an SM either way; which wins is the GPU's to say (two configs: each is compiled for every pass
    # and precision). The halo-tile passes stay untuned (their scratch staging needs num_stages=1).
    _rt_tile_tuned = gpu_autotune(
        [triton.Config({}, num_warps=w, num_stages=s) for w, s in [(8, 3), (16, 1)]],
        key=["N", "H", "RH", "MODE", "KS", "RELU_E", "PREC"])(_rt_tile)
    _rt_b3_tuned = gpu_autotune([triton.Config({}, num_warps=w, num_stages=1) for w in (8, 16)],
                                key=["N", "H", "RH", "KS", "RELU_E", "PREC"])(_rt_b3)
else:
    _rt_tile_tuned = _rt_b3_tuned = None


def _tile_cfg(N: int, halo: int = 0):
    tm = max(16, next_pow2(2 * halo + 8))  # halo tiles: at least 8 owned rows/columns
    if interpreting():
        return tm, max(tm, next_pow2(N + 2 * halo))
    return tm, tm  # (16 x 256) fp32 tiles for k <= 7: the B3 kernel keeps ~10 of them live


def _f32(t):
    return t.detach().to(torch.float32).contiguous()


def _pack(rows, width):
    """Equal-length vectors as the rows of an fp32 (rows, width) table, zero-padded: a few kernels
    for the whole table (a copy per row was most of the ~500 small launches of a layer's step)."""
    packed = torch.stack(rows).to(torch.float32)
    return torch.nn.functional.pad(packed, (0, width - packed.shape[1])).contiguous()


GATHER_ROWS = 8  # REFINER_TRITON_TRAIN_X2=gather: 8 x 32 tiles, the plain tiles' 256 positions (tests set it)


def _x2_mode(device=None) -> str:
    """REFINER_TRITON_TRAIN_X2, how the passes that need X2 = dw_k(E) (F2, F3, B2) get E:
    "offsets" (default): the expansion recomputed at each of the k*k stencil offsets, over
      non-overlapping tiles (B3: halo tiles);
    "halo": those passes on halo tiles, E computed once per channel chunk and staged through a
      per-program scratch (_x2_staged). H100, round 2: forward+backward 19.8 against 18.3 ms;
      round 3 with TF32 dots: 16.8 against 13.9 ms (B=32, N=197, bf16). Kept as a candidate.
    "gather" (a candidate, not yet timed on a GPU): those passes on gather tiles (8 rows by 32
      columns overlapping by the halo, kernels_refine_eval.gather_tile), E formed at each of the k
      row shifts and moved to the column shifts by tl.gather (kernels_refine_eval.stencil_gathered).
      ptxas (sm_90, bf16, TF32 dots, per 16-channel chunk and 256 positions, with the halo
      columns): F2 0.88x, F3 0.63x, B2 0.78x the SASS instructions of "offsets".
    (A third, "split", stored E for an L2-sized batch chunk on zero-bordered planes and loaded it
    at the shifts, with B3 as two passes over flat position blocks: removed after the H200
    measured it slower, fwd+bwd 36.8 against 13.7 ms, B=32, N=197, bf16.)
    The default applies unless the variable is set or a value is tuned for the GPU model (settings.py)."""
    return switch("REFINER_TRITON_TRAIN_X2", device)


PROFILE_PREFIX = "refine_train pass "  # profiler ranges of the passes (benchmarks/profile_models.py)
_PASS_NAMES = {1: "F1 moments of A", 2: "F2 BN2 stats (X2)", 3: "F3 Y3 + BN3 stats", 6: "F4 BN_a stats",
               7: "F5 R", 4: "B1 sums", 5: "B2 dY3 dW_p dD", "b3": "B3 dX2 dW_dw dA", "rv": "F6 out = R v",
               "dvdr": "B0 dv = R^T dO, dR = dO v^T", "mix": "B4 BN1 terms of dA"}


def _pass_label(mode, x2="offsets") -> str:
    return PROFILE_PREFIX + _PASS_NAMES[mode] + ("" if x2 == "offsets" else f" [{x2}]")


# None, or a callable(label) returning a context manager that times one pass's kernels
# (benchmarks/bench_train_passes.py: CUDA events around them; no device-side profiler attribution)
PASS_TIMER = None


@contextlib.contextmanager
def _pass(label):
    """One training pass's launches: a profiler range, timed when PASS_TIMER is set."""
    with torch.profiler.record_function(label), (PASS_TIMER(label) if PASS_TIMER else contextlib.nullcontext()):
        yield


def _dot_precision(attn) -> str:
    """REFINER_TRITON_TRAIN_DOT: "auto" (default: TF32 for bf16 maps, IEEE otherwise), "tf32" (TF32
    for fp16 and bf16 maps), "ieee" (fp32 FMA dots) or "tf32x3" (every map dtype: three TF32 dots
    on the tensor cores, about fp32's accuracy; a candidate not yet timed on a GPU). (bf16 operands
    were a candidate until the H200 measured them slower and less accurate: B=32 N=197 fwd+bwd 16.2
    against 13.3 ms, worst gradient 8.5% off the fp32 reference against 2.9%, and at k = 5 beyond
    the bf16 reference's own error.) The choice goes to
    the dots of the expansion, the stencil's recompute, the reduction and the gradients; the BN1
    Gram matrix is always IEEE, and "tf32" leaves fp32 maps IEEE.
    H100, bf16, B=32 N=197 fwd+bwd: 14.9 ms against 18.1 (IEEE); Refiner-ViT-S training 1.35x the
    images/s with the saved Y3 (benchmarks/results, round 3).
    Accuracy: TF32 keeps 10 mantissa bits, bf16 8: every gradient is closer to the fp32 reference
    than the reference's own gradients computed in bf16 (test_refine_train_half_tf32 with emulated
    TF32 on the CPU, test_refine_train_gpu); fp16 keeps 10 bits too, so fp16 maps stay IEEE unless
    asked. Elementwise, a few gradient entries move more than a bf16 ulp: a ReLU6 whose input lies
    within TF32 rounding of 0 or 6 gates its gradient the other way (tests/utils.assert_no_worse_than).
    (refine_eval's backward stays IEEE: with TF32 dots ptxas gives it 32 registers and a 7 KB stack
    frame, sm_90, and with 3xTF32 32 registers, 41 KB of spills and a 13 KB stack frame. Here,
    3xTF32: B3 255 registers and 240 bytes of spills (IEEE: 255 and 128), the stencil passes 163-255
    registers and at most 40 bytes; `python -m refiner_kernels._aot_check _rt_tile _rt_b3`.)
    The default applies unless the variable is set or a value is tuned for the GPU model (settings.py)."""
    mode = switch("REFINER_TRITON_TRAIN_DOT", attn.device)
    if mode == "tf32x3":
        return mode
    if mode == "tf32":
        return mode if attn.dtype in (torch.float16, torch.bfloat16) else "ieee"
    return "tf32" if mode == "auto" and attn.dtype == torch.bfloat16 else "ieee"


def _launch_tile(mode, attn, dr, we, be, wdw, wp, cv, hv, ks, scale, relu, y3=None):
    """One _rt_tile pass; y3: the Y3 buffer (_y3_buffer), written by mode 3, read by the later modes."""
    B, H, N, _ = attn.shape
    RH, KS = wdw.shape[0], wdw.shape[-1]
    x2 = _x2_mode(attn.device) if mode in (2, 3, 5) else "offsets"
    halo, gather = x2 == "halo", x2 == "gather"
    if gather:  # GATHER_ROWS rows by 32 columns on the GPU, the columns overlapping by the halo
        TM, TJ = _eval.gather_tiles(N, KS, GATHER_ROWS)
        nti, ntj = triton.cdiv(N, TM), triton.cdiv(N, TJ - 2 * (KS // 2))
    else:  # plain tiles, or halo tiles overlapping by the halo both ways
        pad = KS // 2 if halo else 0
        TM, TJ = _tile_cfg(N, pad)
        nti, ntj = triton.cdiv(N, TM - 2 * pad), triton.cdiv(N, TJ - 2 * pad)
    ppi = nti * ntj  # programs per image
    HP = max(16, next_pow2(H))
    RHP = triton.cdiv(RH, CC) * CC
    W = max(HP, RHP)
    dev = attn.device
    part = torch.zeros(B * ppi, 8, W, dtype=torch.float32, device=dev)
    pn = torch.zeros(B * ppi, dtype=torch.float32, device=dev)
    pwp = torch.zeros(B * ppi, HP, HP if mode == 1 else (RHP if mode == 5 else 1), dtype=torch.float32, device=dev)
    # halo: batch chunks that bound the per-program scratch (one launch otherwise)
    chunks = list(batch_chunks(B, ppi, CC * TM * TJ * 4)) if halo else [(0, B)]
    scr = torch.empty(ppi * max(hi - lo for lo, hi in chunks), CC, TM * TJ, dtype=torch.float32,
                      device=dev) if halo else part  # (unused without halo tiles)
    if use_tuned(_rt_tile_tuned, attn) and not halo:
        kernel, launch = _rt_tile_tuned, {}
    else:  # scratch staging (halo): no pipelining across barriers
        kernel, launch = _rt_tile, dict(num_warps=num_warps_for(HP * TM * TJ), num_stages=1 if halo else 3)
    prec = _dot_precision(attn)
    # a profiler range per pass (benchmarks/profile_models.py lists their device times)
    with _pass(_pass_label(mode, x2)):
        for lo, hi in chunks:
            pick = lambda t: t[lo:hi] if t is not None else attn[lo:hi]  # noqa: E731
            kernel[(hi - lo, ppi)](attn[lo:hi], pick(dr), pick(y3), we, be, wdw, wp, cv, hv, ks, part[lo * ppi:],
                                   pn[lo * ppi:], pwp[lo * ppi:], scr, N, H, RH, RHP, ntj, float(scale),
                                   MODE=mode, KS=KS, RELU_E=relu, PREC=prec, HP=HP, CC=CC, TM=TM, TJ=TJ, W=W,
                                   HALO=halo, GATHER=gather, **launch)
    return part.double(), pn.double(), pwp


def _chan(nt, part, C):
    """Chan et al.: combine per-tile shifted moments (rows: shift, mean - shift, centred sum of
    squares) into the batch mean and the centred sum of squares, in float64."""
    n = nt.sum()
    means = part[:, 0, :C] + part[:, 1, :C]
    mean = (nt[:, None] * means).sum(0) / n
    return mean, (part[:, 2, :C] + nt[:, None] * (means - mean) ** 2).sum(0)


def _fold(attn, w_exp, w_dw, w_pro, g1, b1, g2, b2, g3, b3, ga, ba, eps, expand, st):
    """Host-side (float64) folding of the four BatchNorms given their batch statistics."""
    H = attn.shape[1]
    RH = w_dw.shape[0]
    d = {}
    dd = lambda t: t.detach().double()  # noqa: E731
    if expand:
        We = dd(w_exp)
        d["rs1"] = torch.rsqrt(st["var1"] + eps)
        d["a1"] = dd(g1) * d["rs1"]
        d["we_f"] = d["a1"][:, None] * We
        d["mu1s"] = We @ st["mAs"]  # BN1 mean of W_e (A - K)
        d["be_f"] = dd(b1) - d["a1"] * d["mu1s"]
        d["wer"] = We
        d["k1"] = d["a1"]
    else:
        eye = torch.eye(H, dtype=torch.float64, device=attn.device)
        d["rs1"] = torch.ones(RH, dtype=torch.float64, device=attn.device)
        d["we_f"] = d["wer"] = eye
        d["be_f"] = torch.zeros(RH, dtype=torch.float64, device=attn.device)
        d["k1"] = torch.ones(RH, dtype=torch.float64, device=attn.device)
    if "var2" in st:
        d["rs2"] = torch.rsqrt(st["var2"] + eps)
        d["a2"] = dd(g2) * d["rs2"]
        d["c2"] = dd(b2) - d["a2"] * st["mu2"]
        # shift of D in Y3 = W_p (D - Dk) + W_p Dk: D at the BN2 mean (any value would do; near the
        # values of D, it keeps the rounding of W_p D away from BN3's centring)
        d["dk"] = (d["a2"].float() * st["mu2"].float() + d["c2"].float()).clamp(0.0, 6.0).double()
    if "var3" in st:
        d["rs3"] = torch.rsqrt(st["var3"] + eps)
        d["a3"] = dd(g3) * d["rs3"]
        d["b3"] = dd(b3)
    if "varZ" in st:
        d["rsa"] = torch.rsqrt(st["varZ"] + eps)
    return d


def _aux_layout(H, RH):
    return [("mu1", RH), ("var1", RH), ("mu2", RH), ("var2", RH), ("mu3", H), ("var3", H), ("muZ", H),
            ("varZ", H), ("mAs", H), ("Gc", H * H), ("mu3s", H), ("muZs", H)]


def aux_size(H, RH):
    return sum(s for _, s in _aux_layout(H, RH))


def _as_aux(st):
    """Statistics rounded as the backward sees them (aux is fp32): forward and backward fold the
    same values, so Z is bit-identical in every pass. (One round trip for all of them: views of it.)"""
    flat = torch.cat([t.reshape(-1) for t in st.values()]).float().double()
    out, i = {}, 0
    for k, t in st.items():
        out[k] = flat[i:i + t.numel()].view(t.shape)
        i += t.numel()
    return out


def _hv(f, st, ga, ba, HP, rest=None):
    """Per-head constants of `_zhat` (rows 0-5, 14), the backward's (6-11), BN_a's affine (12, 13)."""
    H = st["mu3"].numel()
    zero = torch.zeros(H, dtype=torch.float64, device=st["mu3"].device)
    rows = [f["a3"], f["b3"], st.get("muZs", zero), f.get("rsa", zero), st["mu3s"], f["rs3"]]
    return _pack(rows + (rest or [zero] * 6) + [ga.detach().double(), ba.detach().double(), st["Kz"]], HP)


def _cv(f, RHP, rest=None):
    """Per-expanded-channel constants: a2, c2 (BN2 folded), then the backward's rows 2-9, Dk (10)."""
    zero = torch.zeros_like(f["a2"])
    return _pack([f["a2"], f["c2"]] + (rest or [zero] * 8) + [f["dk"]], RHP)


def _shift(attn, expand, HP):
    """Per-head shifts of A, an element of A: Kz for Z, K in the expansion W_e (A - K) (0 when not
    expand). A constant or large-mean map then meets BN1 and BN_a without cancellation."""
    kz = attn[0, :, 0, 0].detach().float()
    k = kz if expand else torch.zeros_like(kz)
    return k.double(), kz.double(), _pack([k], HP)


def _r(attn, we_f, be_f, wdw, wp, cv, hv, ks, scale, relu, y3):
    """R = BN_a(Z) * scale (fp32, A-sized), by the same code as every statistic of Z."""
    r = torch.empty(attn.shape, dtype=torch.float32, device=attn.device)
    _launch_tile(7, attn, r, we_f, be_f, wdw, wp, cv, hv, ks, scale, relu, y3)
    return r


def _y3_buffer(attn):
    """The Y3 buffer (fp32, A-sized) that spares the passes after F3 (and after the backward's Y3
    pass) the recompute of the expansion, the stencil and the reduction: 5 instead of 10 such
    recomputes per training step, for one transient A-sized buffer."""
    return torch.empty(attn.shape, dtype=torch.float32, device=attn.device)


def save_y3() -> bool:
    """REFINER_TRITON_TRAIN_SAVE_Y3=1 (default): the forward's Y3 buffer is kept for the backward,
    which then skips its rerun of F3 (the expansion, the stencil and the reduction once more: one of
    a step's five stencil passes), for an fp32 A-sized map held from the forward to the backward of
    each layer; bit-identical results. 0: the backward recomputes it (the memory-lean choice).
    H100, bf16: fwd+bwd 16.5 against 18.1 ms (B=32 N=197); Refiner-ViT-S batch 256 training
    226 against 208 images/s, peak memory 21.2 against 17.5 GB (the reference: 60.9)."""
    mode = os.environ.get("REFINER_TRITON_TRAIN_SAVE_Y3", "1")
    if mode not in ("0", "1"):
        raise ValueError(f"REFINER_TRITON_TRAIN_SAVE_Y3: expected '0' or '1', got {mode!r}")
    return mode == "1"


def refine_train_fwd(attn, v, w_exp, w_dw, w_pro, g1, b1, g2, b2, g3, b3, ga, ba, eps, scale, expand,
                     keep_y3=True):
    """Returns out, the stats dict (float64), aux (fp32 vector for the backward) and the Y3 buffer
    for the backward (keep_y3, the caller's save_y3(); else an empty tensor)."""
    check_inputs(attn, v)
    check_image_map(attn)
    attn, v = attn.contiguous(), unit_head_stride(v)  # v: read through its strides by F5's matmul
    B, H, N, _ = attn.shape
    RH, KS = w_dw.shape[0], w_dw.shape[-1]
    n = float(B * N * N)
    HP = max(16, next_pow2(H))
    RHP = triton.cdiv(RH, CC) * CC
    dev = attn.device
    wdw, wp = _f32(w_dw), _f32(w_pro)
    dummy = torch.zeros(16, dtype=torch.float32, device=dev)
    args = (attn, w_exp, w_dw, w_pro, g1, b1, g2, b2, g3, b3, ga, ba, eps, expand)
    st = {}
    st["K"], st["Kz"], ks = _shift(attn, expand, HP)
    if expand:
        # F1: moments of A -> BN1 (mean W_e mu_A, variance diag(W_e Sigma_A W_e^T))
        part, pn, gram = _launch_tile(1, attn, None, dummy, dummy, wdw, wp, dummy, dummy, ks, scale, False)
        mA, _ = _chan(pn, part, H)
        st["mAs"] = mA - st["K"]  # aux is fp32: keep the mean of A as its (small) offset from K
        dm = part[:, 0, :H] + part[:, 1, :H] - mA
        st["Gc"] = gram[:, :H, :H].sum(0, dtype=torch.float64) + torch.einsum("p,pi,pj->ij", pn, dm, dm)
        We = w_exp.detach().double()
        st["mu1"] = We @ mA
        st["var1"] = ((We @ st["Gc"]) * We).sum(1) / n
    else:
        st["mAs"] = torch.zeros(H, dtype=torch.float64, device=dev)
        st["Gc"] = torch.zeros(H, H, dtype=torch.float64, device=dev)
    st = _as_aux(st)
    f = _fold(*args, st)
    we_f, be_f = _f32(f["we_f"]), _f32(f["be_f"])
    # F2: BN2 statistics
    part, pn, _ = _launch_tile(2, attn, None, we_f, be_f, wdw, wp, dummy, dummy, ks, scale, expand)
    st["mu2"], m2 = _chan(pn, part, RH)
    st["var2"] = m2 / n
    st = _as_aux(st)
    f = _fold(*args, st)
    cv = _cv(f, RHP)
    # F3: BN3 statistics of Y3 (the kernels see Y3 - W_p Dk), Y3 kept for F4 and F5
    y3 = _y3_buffer(attn)
    part, pn, _ = _launch_tile(3, attn, None, we_f, be_f, wdw, wp, cv, dummy, ks, scale, expand, y3)
    st["mu3s"], m2 = _chan(pn, part, H)
    st["mu3"] = st["mu3s"] + w_pro.detach().double() @ f["dk"]
    st["var3"] = m2 / n
    st = _as_aux(st)
    f = _fold(*args, st)
    # F4: BN_a statistics from the values of Z themselves (no algebra on moments: a zero-variance
    # BN3 would amplify its rounding by 1/(var3 + eps))
    part, pn, _ = _launch_tile(6, attn, None, we_f, be_f, wdw, wp, cv, _hv(f, st, ga, ba, HP), ks, scale, expand,
                               y3)
    st["muZs"], m2 = _chan(pn, part, H)
    st["muZ"] = st["muZs"] + st["Kz"]
    st["varZ"] = m2 / n
    st = _as_aux(st)
    f = _fold(*args, st)
    # F5: R, then R @ v
    r = _r(attn, we_f, be_f, wdw, wp, cv, _hv(f, st, ga, ba, HP), ks, scale, expand, y3)
    y3 = y3 if keep_y3 else y3.new_empty(0)
    with _pass(_pass_label("rv")):
        out = bmm(r, v, out=token_major(B, H, N, v.shape[-1], v))
    if not expand:
        st["mu1"] = torch.zeros(RH, dtype=torch.float64, device=dev)
        st["var1"] = torch.zeros(RH, dtype=torch.float64, device=dev)
    aux = torch.cat([st[k].reshape(-1) for k, _ in _aux_layout(H, RH)]).to(torch.float32)
    for k in ("K", "Kz", "mu3s", "mAs", "muZs"):
        del st[k]
    return out, st, aux, y3


def _b3_parts(nprog, RH, KS, HP, dev):
    """B3's per-program partial sums: (db1, dg1) rows, dW_dw, M; and their float64 totals."""
    RHP = triton.cdiv(RH, CC) * CC
    f32 = dict(dtype=torch.float32, device=dev)
    parts = (torch.zeros(nprog, 2, RHP, **f32), torch.empty(nprog, RHP, KS * KS, **f32),
             torch.zeros(nprog, RHP, HP, **f32))
    return parts, [torch.zeros(t.shape[1:], dtype=torch.float64, device=dev) for t in parts]


def _b3_halo(attn, dr, y3, we_f, be_f, wer, wdw, wp, cv, hv, ks, scale, expand, prec):
    """B3 on halo tiles (_rt_b3), E recomputed: dA without BN1's mean/variance terms (fp32) and the
    summed partials of _b3_parts."""
    B, H, N, _ = attn.shape
    RH, KS = wdw.shape[0], wdw.shape[-1]
    HP, RHP, PAD = max(16, next_pow2(H)), triton.cdiv(RH, CC) * CC, KS // 2
    TM, TJ = _tile_cfg(N, PAD)
    nti, ntj = triton.cdiv(N, TM - 2 * PAD), triton.cdiv(N, TJ - 2 * PAD)
    da = torch.empty(B, H, N, N, dtype=torch.float32, device=attn.device)
    chunks = list(batch_chunks(B, nti * ntj, CC * TM * TJ * 4))
    nprog = nti * ntj * max(hi - lo for lo, hi in chunks)
    scr = torch.empty(nprog, CC, TM * TJ, dtype=torch.float32, device=attn.device)
    parts, sums = _b3_parts(nprog, RH, KS, HP, attn.device)
    tuned = use_tuned(_rt_b3_tuned, attn)
    kernel = _rt_b3_tuned if tuned else _rt_b3
    launch = {} if tuned else dict(num_warps=num_warps_for(HP * TM * TJ), num_stages=1)  # (scratch: no pipelining)
    for lo, hi in chunks:  # bounded scratch: batch chunks run one after another on the stream
        kernel[(hi - lo, nti * ntj)](attn[lo:hi], dr[lo:hi], y3[lo:hi], we_f, be_f, wer, wdw, wp, cv, hv, ks,
                                     da[lo:hi], scr, *parts, N, H, RH, RHP, ntj, float(scale), KS=KS,
                                     RELU_E=expand, PREC=prec, HP=HP, CC=CC, TM=TM, TJ=TJ, **launch)
        used = nti * ntj * (hi - lo)
        for acc, t in zip(sums, parts):
            acc += t[:used].sum(0, dtype=torch.float64)  # no float64 copy of the table
    return da, sums


def refine_train_bwd(dout, attn, v, w_exp, w_dw, w_pro, g1, b1, g2, b2, g3, b3, ga, ba, aux, y3,
                     eps, scale, expand):
    """y3: the forward's Y3 buffer (save_y3()), or an empty tensor: F3's pass runs again."""
    check_image_map(attn)
    attn = attn.contiguous()  # dout and v only meet bmm, which reads them through their strides
    B, H, N, _ = attn.shape
    RH, KS = w_dw.shape[0], w_dw.shape[-1]
    n = float(B * N * N)
    HP = max(16, next_pow2(H))
    RHP = triton.cdiv(RH, CC) * CC
    dev = attn.device
    st, i = {}, 0
    auxd = aux.double()
    for k, s in _aux_layout(H, RH):
        st[k] = auxd[i:i + s]
        i += s
    st["Gc"] = st["Gc"].reshape(H, H)
    st["K"], st["Kz"], ks = _shift(attn, expand, HP)
    f = _fold(attn, w_exp, w_dw, w_pro, g1, b1, g2, b2, g3, b3, ga, ba, eps, expand, st)
    rsa, rs3 = f["rsa"], f["rs3"]
    gad = ga.detach().double()
    wdw, wp = _f32(w_dw), _f32(w_pro)
    we_f, be_f, wer = _f32(f["we_f"]), _f32(f["be_f"]), _f32(f["wer"])
    cv = _cv(f, RHP, [st["mu2"], f["rs2"]] + [torch.zeros_like(f["a2"])] * 6)
    if y3.numel() == 0:  # F3's pass again (same inputs, same values), its moments unused
        y3 = _y3_buffer(attn)
        _launch_tile(3, attn, None, we_f, be_f, wdw, wp, cv, torch.zeros(16, dtype=torch.float32, device=dev), ks,
                     scale, expand, y3)
    elif y3.shape != attn.shape or y3.dtype != torch.float32 or not y3.is_contiguous():
        raise ValueError(f"y3: expected the forward's contiguous float32 Y3 of shape {tuple(attn.shape)} or an "
                         f"empty tensor, got {y3.dtype} of shape {tuple(y3.shape)}")
    r = _r(attn, we_f, be_f, wdw, wp, cv, _hv(f, st, ga, ba, HP), ks, scale, expand, y3)
    with _pass(_pass_label("dvdr")):
        dv = bmm(r.transpose(-1, -2), dout, out_dtype=v.dtype)
        del r
        dr = bmm(dout, v.transpose(-1, -2), out_dtype=torch.float32)
    # B1
    part, pn, _ = _launch_tile(4, attn, dr, we_f, be_f, wdw, wp, cv, _hv(f, st, ga, ba, HP), ks, scale, expand,
                               y3)
    dba = part[:, 0, :H].sum(0)
    dga = part[:, 1, :H].sum(0)
    s_dry = part[:, 2, :H].sum(0)
    s_zy = part[:, 3, :H].sum(0)
    ka = gad * rsa
    dg3 = ka * (s_dry - dga / n * s_zy)
    db3 = torch.zeros_like(dg3)  # sum(dZ) = ka (sum dRn - n mean dRn - dga/n sum Zhat) = 0 exactly
    k3 = g3.detach().double() * rs3
    hv = _hv(f, st, ga, ba, HP, [ka, dba / n, dga / n, k3, db3 / n, dg3 / n])
    # B2
    part, pn, pwp = _launch_tile(5, attn, dr, we_f, be_f, wdw, wp, cv, hv, ks, scale, expand, y3)
    dwp = pwp.sum(0, dtype=torch.float64)[:H, :RH]
    db2 = part[:, 0, :RH].sum(0)
    dg2 = part[:, 1, :RH].sum(0)
    k2 = g2.detach().double() * f["rs2"]
    mu1s = f["mu1s"] if expand else torch.zeros(RH, dtype=torch.float64, device=dev)
    cv = _cv(f, RHP, [st["mu2"], f["rs2"], k2, db2 / n, dg2 / n, mu1s, f["rs1"], f["k1"]])
    # B3
    with _pass(_pass_label("b3")):
        da, sums = _b3_halo(attn, dr, y3, we_f, be_f, wer, wdw, wp, cv, hv, ks, scale, expand, _dot_precision(attn))
    part3, pwdw, pm = sums  # float64, summed over the programs
    dwdw = pwdw[:RH].reshape(RH, KS, KS)
    if expand:
        db1 = part3[0, :RH]
        dg1 = part3[1, :RH]
        M = pm[:RH, :H]
        We = w_exp.detach().double()
        k1, rs1 = f["k1"], f["rs1"]
        # M = sum dX1' (A - K)^T: the shift keeps a large mean of A out of the fp32 partial sums
        dwe = k1[:, None] * (M - (db1 / n)[:, None] * (n * st["mAs"])[None, :]
                             - (dg1 / n * rs1)[:, None] * (We @ st["Gc"]))
        # BN1 mean/variance terms of dA: an H x H mix of A plus a per-head bias
        mx = -(We.t() * (k1 * dg1 * rs1 / n)[None, :]) @ We
        bx = We.t() @ (k1 * (dg1 * rs1 * mu1s - db1) / n)  # applied to A - K
        with _pass(_pass_label("mix")):
            da = _mix_into(da, attn, _f32(mx), ks, _f32(bx))
    else:
        dwe = torch.zeros_like(w_exp, dtype=torch.float64)
        dg1 = torch.zeros_like(g1, dtype=torch.float64)
        db1 = torch.zeros_like(b1, dtype=torch.float64)
    grads = [dwe, dwdw, dwp, dg1, db1, dg2, db2, dg3, db3, dga, dba]
    refs = [w_exp, w_dw, w_pro, g1, b1, g2, b2, g3, b3, ga, ba]
    return [da.to(attn.dtype), dv] + [g.to(t.dtype) for g, t in zip(grads, refs)]


def _mix_into(da, attn, mx, ks, bx):
    """(dA + mx (A - K)) + bx in A's dtype by _rt_mix: one pass over dA and A (in place of A's fp32
    copy, its shift, a batched matmul and two additions, each a map-sized pass)."""
    B, H, N, _ = attn.shape
    HP = max(16, next_pow2(H))
    # memory-bound; ptxas (sm_90): 73 registers a thread at 256 positions and 8 warps (3 blocks an SM)
    P = min(4096, next_pow2(N * N)) if interpreting() else 256
    out = torch.empty_like(attn)
    for lo in range(0, B, _eval.MAX_GRID_Y):  # the grid's batch axis
        hi = min(B, lo + _eval.MAX_GRID_Y)
        _rt_mix[(triton.cdiv(N * N, P), hi - lo)](attn[lo:hi], da[lo:hi], out[lo:hi], mx, ks, bx, N, H, HP=HP, P=P,
                                                   num_warps=8)
    return out
