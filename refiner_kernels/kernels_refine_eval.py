"""Fused evaluation-mode refine block (all BatchNorms folded, see refiner.reference.fold_refine).

    E = relu6(w_exp A + b_exp)   (E = A when not expand)
    D = relu6(dw_k(E) + b_dw)    zero padding of E at the map border
    R = alpha (A + w_pro D + b_pro) + beta;   out = R @ v

Tile layout: a tile is (heads, positions): HP = max(16, pow2(H)) head rows (masked; tl.dot wants
dims >= 16) by P = TM * TJ positions of a TM-row x TJ-column patch of the N x N map, flattened.
The expansion is tl.dot(w_exp[chunk] (CC x HP), A (HP x P)) over expanded channels in chunks of
CC = 16, so no tile ever holds all rH channels.

Forward, "split" (the default, see forward_variant): one pass stores E = relu6(w_exp A + b_exp)
(input dtype) for a batch chunk small enough to stay in L2, a second loads E at the k*k shifts
(masked loads outside the map are the zero padding), applies b_dw, relu6, the reduction dot and
the affine residual and stores R; then out = R @ v by the batched matmul kernel.

Forward, "gather" (a candidate): one program per (image, TM-row, 32-column tile), the column tiles
overlapping by the stencil's halo; per channel chunk and stencil row offset, E from A loaded at that
row shift by a tensor-core dot, moved to the column shifts by tl.gather (warp shuffles); E is never
stored. Then the reduction dot, the affine residual, R stored; out = R @ v.

Forward, "tile" (one program per (query-row tile, batch); loop over column tiles): Triton cannot shift a
register tile, so the k x k stencil loads A at each of the k*k shifted offsets and recomputes the
expansion there (tensor-core work instead of a trip through global memory); E at shifted
positions outside the map is forced to 0 (zero padding of E, not relu6(b_exp)). Then the
reduction dot, the affine residual, and R @ v as a batched (per-head) 3-D tl.dot accumulated
over column tiles. No (B, rH, N, N) tensor is ever written.

Backward: R (B,H,N,N) is recomputed in fp32 by the forward (IEEE dots), dv = R^T dO and
dR = dO v^T by a batched matmul kernel, then one kernel per halo-extended tile recomputes E and
D, forms g = dL/d(dw_k(E)) on the extended tile, stages E (for dW_dw) and then g (for the
transposed stencil) through a small per-program scratch buffer (CC x P floats, reused across
channel chunks), and produces dA plus per-program partial weight gradients (summed afterwards;
deterministic).
"""
from __future__ import annotations

import torch

from ._common import (batch_chunks, check_inputs, check_image_map, gpu_autotune, interpreting, next_pow2, num_warps_for,
                      bhn_strides, token_major, triton, tl, unit_head_stride, use_tuned)
from .blocks import bmm
from .settings import switch

CC = 16  # expanded channels per chunk
HALF_TF32 = True  # fp16/bf16 inputs: TF32 dots in the forward kernels on the GPU (see forward_precision)


if triton is not None:

    @triton.jit
    def expansion_chunk(we_ptr, be_ptr, cc, mc, hh, mh, H):
        """The expansion's weights (CC x HP) and bias (CC) of channels cc, fp32, 0 where masked."""
        we = tl.load(we_ptr + cc[:, None] * H + hh[None, :], mask=mc[:, None] & mh[None, :], other=0.0)
        be = tl.load(be_ptr + cc, mask=mc, other=0.0)
        return we.to(tl.float32), be.to(tl.float32)

    @triton.jit
    def tf32_round(x):
        """fp32 x rounded to TF32 (10 mantissa bits) to nearest, ties away from zero (as cvt.rna).
        Left to the tensor cores, an fp32 operand's 13 low bits are the implementation's to handle
        (truncation, in effect): a bias that sums over a map collect (a BN bias gradient: twice the
        bf16 reference's error under the CPU emulation, which truncates). NaN stays NaN."""
        u = x.to(tl.int32, bitcast=True)
        r = ((u + 0x1000) & -8192).to(tl.float32, bitcast=True)  # -8192: the mask 0xFFFFE000
        return tl.where(x == x, r, x)

    @triton.jit
    def dot(a, b, PREC: tl.constexpr):
        """tl.dot at PREC: "ieee", "tf32x3", "tf32" (operands rounded to nearest first, tf32_round)
        or "bf16" (operands cast to bf16, which rounds to nearest, ties to even; fp32 accumulation)."""
        if PREC == "tf32":
            return tl.dot(tf32_round(a), tf32_round(b), input_precision="tf32")
        elif PREC == "bf16":
            return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
        else:
            return tl.dot(a, b, input_precision=PREC)

    @triton.jit
    def reduction_chunk(dacc, bdw_ptr, wp_ptr, cc, mc, hh, mh, RH, PREC: tl.constexpr, CC: tl.constexpr):
        """W_p[:, cc] D of channels cc (HP x P), D = relu6(dw_k(E) + b_dw) from dacc = dw_k(E): a tl.dot,
        or for CC = 1 (one channel a step) an outer product on CUDA cores."""
        bdw = tl.load(bdw_ptr + cc, mask=mc, other=0.0).to(tl.float32)
        dd = tl.where(mc[:, None], tl.minimum(tl.maximum(dacc + bdw[:, None], 0.0), 6.0), 0.0)
        wp = tl.load(wp_ptr + hh[:, None] * RH + cc[None, :], mask=mh[:, None] & mc[None, :],
                     other=0.0).to(tl.float32)
        if CC == 1:
            y = wp * dd
        else:
            y = dot(wp, dd, PREC)
        return y

    @triton.jit
    def affine_residual(a0, y, al_ptr, bt_ptr, bp_ptr, hh, mh):
        """R = alpha (A + W_p D + b_pro) + beta per head, y = W_p D (the folded BN_a and BN3)."""
        alpha = tl.load(al_ptr + hh, mask=mh, other=0.0).to(tl.float32)
        beta = tl.load(bt_ptr + hh, mask=mh, other=0.0).to(tl.float32)
        bp = tl.load(bp_ptr + hh, mask=mh, other=0.0).to(tl.float32)
        return alpha[:, None] * (a0 + y + bp[:, None]) + beta[:, None]

    @triton.jit
    def stencil_recomputed(a_ptr, base_a, hoff, row, col, valid, N, mh, ks, we, be, wdw_ptr, cc, mc,
                           KS: tl.constexpr, RELU_E: tl.constexpr, PREC: tl.constexpr, CC: tl.constexpr,
                           P: tl.constexpr):
        """dw_k(E) of channels cc (CC x P, fp32, 0 off `valid`) at the map positions (row, col) of one
        image, E = relu6(we (A - ks) + be) recomputed from A loaded at each of the k*k stencil shifts
        (Triton cannot shift a register tile). E at shifted positions outside the map is 0: the zero
        padding of E, not relu6(b_exp). ks: a per-head shift of A (the training passes' numerics)."""
        PAD: tl.constexpr = KS // 2
        acc = tl.zeros((CC, P), tl.float32)
        for o in range(0, KS * KS):
            r2 = row + (o // KS - PAD)
            c2 = col + (o % KS - PAD)
            ok = valid & (r2 >= 0) & (r2 < N) & (c2 >= 0) & (c2 < N)
            a_s = tl.load(a_ptr + base_a + (hoff + (r2 * N + c2)[None, :]), mask=mh[:, None] & ok[None, :],
                          other=0.0).to(tl.float32) - ks[:, None]
            e = dot(we, a_s, PREC) + be[:, None]
            if RELU_E:
                e = tl.minimum(tl.maximum(e, 0.0), 6.0)
            e = tl.where(ok[None, :], e, 0.0)
            w = tl.load(wdw_ptr + cc * (KS * KS) + o, mask=mc, other=0.0).to(tl.float32)
            acc += w[:, None] * e
        return acc

    @triton.jit
    def refine_r_at(a_ptr, base_a, hoff, hh, mh, row, col, valid, we_ptr, be_ptr, wdw_ptr, bdw_ptr, wp_ptr,
                    bp_ptr, al_ptr, bt_ptr, N, H, RH, KS: tl.constexpr, RELU_E: tl.constexpr,
                    PREC: tl.constexpr, HP: tl.constexpr, CC: tl.constexpr, P: tl.constexpr):
        """R (HP x P, fp32, 0 off `valid`) at the map positions (row, col) of one image: the stencil on
        the recomputed expansion (stencil_recomputed), then the reduction dot and the affine residual
        (the "tile" forward's body)."""
        m2 = mh[:, None] & valid[None, :]
        a0 = tl.load(a_ptr + base_a + (hoff + (row * N + col)[None, :]), mask=m2, other=0.0).to(tl.float32)
        no_shift = tl.zeros((HP,), tl.float32)
        y = tl.zeros((HP, P), tl.float32)
        for c0 in range(0, RH, CC):
            cc = c0 + tl.arange(0, CC)
            mc = cc < RH
            we, be = expansion_chunk(we_ptr, be_ptr, cc, mc, hh, mh, H)
            dacc = stencil_recomputed(a_ptr, base_a, hoff, row, col, valid, N, mh, no_shift, we, be, wdw_ptr, cc,
                                      mc, KS, RELU_E, PREC, CC, P)
            y += reduction_chunk(dacc, bdw_ptr, wp_ptr, cc, mc, hh, mh, RH, PREC, CC)
        r = affine_residual(a0, y, al_ptr, bt_ptr, bp_ptr, hh, mh)
        return tl.where(m2, r, 0.0)

    @triton.jit
    def _re_fwd(a_ptr, v_ptr, we_ptr, be_ptr, wdw_ptr, bdw_ptr, wp_ptr, bp_ptr, al_ptr, bt_ptr,
                out_ptr, r_ptr, N, D, H, RH, svb, svh, svn, sob, soh, son,
                KS: tl.constexpr, RELU_E: tl.constexpr, STORE_R: tl.constexpr, PREC: tl.constexpr,
                HP: tl.constexpr, CC: tl.constexpr, TM: tl.constexpr, TJ: tl.constexpr,
                BD: tl.constexpr):
        P: tl.constexpr = TM * TJ
        pid_i = tl.program_id(1)
        b = tl.program_id(0).to(tl.int64)
        hh = tl.arange(0, HP)
        mh = hh < H
        p = tl.arange(0, P)
        row = pid_i * TM + p // TJ
        base_a = b * H * N * N
        hoff = hh[:, None] * (N * N)  # int32 offsets off the image base (_common.check_image_map)
        offs_d = tl.arange(0, BD)
        md = offs_d < D
        acc = tl.zeros((HP, TM, BD), tl.float32)
        for j0 in range(0, N, TJ):
            col = j0 + p % TJ
            inmap = (row < N) & (col < N)
            r = refine_r_at(a_ptr, base_a, hoff, hh, mh, row, col, inmap, we_ptr, be_ptr, wdw_ptr, bdw_ptr,
                            wp_ptr, bp_ptr, al_ptr, bt_ptr, N, H, RH, KS, RELU_E, PREC, HP, CC, P)
            if STORE_R:
                tl.store(r_ptr + base_a + (hoff + (row * N + col)[None, :]), r.to(r_ptr.dtype.element_ty),
                         mask=mh[:, None] & inmap[None, :])
            else:
                r3 = tl.reshape(r, (HP, TM, TJ))
                jj = j0 + tl.arange(0, TJ)
                vv = tl.load(v_ptr + b * svb + hh.to(tl.int64)[:, None, None] * svh
                             + jj[None, :, None] * svn + offs_d[None, None, :],
                             mask=mh[:, None, None] & (jj < N)[None, :, None] & md[None, None, :],
                             other=0.0).to(tl.float32)
                acc += dot(r3, vv, PREC)
        if not STORE_R:
            ii = pid_i * TM + tl.arange(0, TM)
            tl.store(out_ptr + b * sob + hh.to(tl.int64)[:, None, None] * soh
                     + ii[None, :, None] * son + offs_d[None, None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=mh[:, None, None] & (ii < N)[None, :, None] & md[None, None, :])

    @triton.jit
    def _re_expand(a_ptr, we_ptr, be_ptr, e_ptr, N, H, RH, RELU_E: tl.constexpr, PREC: tl.constexpr,
                   HP: tl.constexpr, CC: tl.constexpr, P: tl.constexpr):
        """The "split" passes' expansion: E = relu6(w_exp A + b_exp) at P flat positions of one
        image, stored (e_ptr: (images, rH, N, N)) for a stencil that reads it at the k*k shifts
        (from L2: the launchers keep a chunk's E under SPLIT_E_BYTES)."""
        b = tl.program_id(1).to(tl.int64)
        q = tl.program_id(0) * P + tl.arange(0, P)
        hh = tl.arange(0, HP)
        mh = hh < H
        valid = q < N * N
        a = tl.load(a_ptr + b * H * N * N + hh.to(tl.int64)[:, None] * N * N + q[None, :],
                    mask=mh[:, None] & valid[None, :], other=0.0).to(tl.float32)
        for c0 in range(0, RH, CC):
            cc = c0 + tl.arange(0, CC)
            mc = cc < RH
            we, be = expansion_chunk(we_ptr, be_ptr, cc, mc, hh, mh, H)
            e = dot(we, a, PREC) + be[:, None]
            if RELU_E:
                e = tl.minimum(tl.maximum(e, 0.0), 6.0)
            tl.store(e_ptr + b * RH * N * N + cc.to(tl.int64)[:, None] * N * N + q[None, :],
                     e.to(e_ptr.dtype.element_ty), mask=mc[:, None] & valid[None, :])

    @triton.jit
    def shifted_load(ebase, coff, row, col, valid, mc, o, N, KS: tl.constexpr):
        """A stored (rH, N, N) map (ebase: one image's, a scalar pointer; coff: the channels' int32
        offsets from it, an int32 offset tensor instead of a 64-bit pointer tensor: 95 instead of 143
        registers at P=128) at the positions (row, col) shifted by the stencil's offset o; 0 outside
        the map (the zero padding) and off `valid`. fp32."""
        PAD: tl.constexpr = KS // 2
        r2 = row + (o // KS - PAD)
        c2 = col + (o % KS - PAD)
        ok = valid & (r2 >= 0) & (r2 < N) & (c2 >= 0) & (c2 < N)
        return tl.load(ebase + (coff[:, None] + (r2 * N + c2)[None, :]), mask=mc[:, None] & ok[None, :],
                       other=0.0).to(tl.float32)

    @triton.jit
    def _stencil_term(ebase, coff, row, col, valid, mc, wdw_ptr, cc, o, N, KS: tl.constexpr):
        """w_dw[:, o] * E at the stencil's shift o of (row, col)."""
        w = tl.load(wdw_ptr + cc * (KS * KS) + o, mask=mc, other=0.0).to(tl.float32)
        return w[:, None] * shifted_load(ebase, coff, row, col, valid, mc, o, N, KS)

    @triton.jit
    def stencil_loaded(ebase, row, col, valid, mc, wdw_ptr, cc, N, KS: tl.constexpr, CC: tl.constexpr,
                       P: tl.constexpr, UNROLL: tl.constexpr = False):
        """dw_k(E) of channels cc (CC x P, fp32) at the positions (row, col) from a stored E (ebase:
        the image's (rH, N, N) E; masked loads outside the map are the zero padding): the split
        forward's stencil. UNROLL: all k*k loads issued up front (latency hiding, more registers)."""
        coff = cc * (N * N)  # int32: rH N^2 <= SPLIT_MAX_MAP (the launchers check)
        dacc = tl.zeros((CC, P), tl.float32)
        if UNROLL:
            for o in tl.static_range(KS * KS):
                dacc += _stencil_term(ebase, coff, row, col, valid, mc, wdw_ptr, cc, o, N, KS)
        else:
            for o in range(0, KS * KS):
                dacc += _stencil_term(ebase, coff, row, col, valid, mc, wdw_ptr, cc, o, N, KS)
        return dacc

    @triton.jit
    def _re_stencil_reduce(a_ptr, e_ptr, wdw_ptr, bdw_ptr, wp_ptr, bp_ptr, al_ptr, bt_ptr, r_ptr, N, H, RH,
                           KS: tl.constexpr, PREC: tl.constexpr, HP: tl.constexpr, CC: tl.constexpr,
                           P: tl.constexpr, UNROLL: tl.constexpr):
        """The "split" forward's second pass: D = relu6(dw_k(E) + b_dw) from the stored E (masked
        loads outside the map are the stencil's zero padding), then the reduction dot and the
        affine residual: R at P flat positions of one image. Channels in chunks of CC >= 16 with
        the reduction as a tl.dot, or CC = 1: one channel at a time, fewer live registers."""
        b = tl.program_id(1).to(tl.int64)
        q = tl.program_id(0) * P + tl.arange(0, P)
        hh = tl.arange(0, HP)
        mh = hh < H
        valid = q < N * N
        row = q // N
        col = q % N
        base_a = b * H * N * N
        hoff = hh.to(tl.int64)[:, None] * N * N  # (int32 here: 9-30 more registers, ptxas sm_90)
        m2 = mh[:, None] & valid[None, :]
        ebase = e_ptr + b * RH * N * N
        y = tl.zeros((HP, P), tl.float32)
        for c0 in range(0, RH, CC):
            cc = c0 + tl.arange(0, CC)
            mc = cc < RH
            dacc = stencil_loaded(ebase, row, col, valid, mc, wdw_ptr, cc, N, KS, CC, P, UNROLL)
            y += reduction_chunk(dacc, bdw_ptr, wp_ptr, cc, mc, hh, mh, RH, PREC, CC)
        a0 = tl.load(a_ptr + base_a + hoff + q[None, :], mask=m2, other=0.0).to(tl.float32)
        r = affine_residual(a0, y, al_ptr, bt_ptr, bp_ptr, hh, mh)
        tl.store(r_ptr + base_a + hoff + q[None, :], r.to(r_ptr.dtype.element_ty), mask=m2)

    @triton.jit
    def stencil_gathered(abase, hoff, row, col, N, mh, ks, we, be, wd_ptr, wd_sc, wd_so, cc, mc,
                         KS: tl.constexpr, RELU_E: tl.constexpr, PREC: tl.constexpr, HILO: tl.constexpr,
                         CC: tl.constexpr, TM: tl.constexpr, TJ: tl.constexpr):
        """dw_k(E) of channels cc (CC x TM*TJ, fp32) on a tile of TM rows by TJ columns of one image
        (row, col: the flat positions' map row and column, row-major in the tile), exact at the
        tile's inner columns PAD .. TJ-1-PAD. For each stencil row offset, E = relu6(we (A - ks) + be)
        by a dot on A loaded at that row shift (0 off the map: the zero padding of E, not
        relu6(b_exp)), then moved to the column shifts by tl.gather along the tile's TJ columns
        (TJ = 32, a warp's lanes: shuffles; the edge lanes clamp, only halo columns read them).
        abase: the image's A; hoff: the heads' int32 offsets (HP x 1); wd_ptr + c wd_sc + o wd_so:
        the depthwise weight of channel c at offset o. HILO (ks = 0, A fp16/bf16): the expansion on
        A as loaded, exact, with the weights split hi + lo in A's dtype (two tensor-core dots)."""
        PAD: tl.constexpr = KS // 2
        P: tl.constexpr = TM * TJ
        jj = tl.arange(0, TJ)[None, None, :]
        incol = (col >= 0) & (col < N)
        if HILO:
            we_hi = we.to(abase.dtype.element_ty)
            we_lo = (we - we_hi.to(tl.float32)).to(abase.dtype.element_ty)
        x2 = tl.zeros((CC, TM, TJ), tl.float32)
        for di in range(0, KS):
            r2 = row + (di - PAD)
            ok = (r2 >= 0) & (r2 < N) & incol
            a_s = tl.load(abase + (hoff + (r2 * N + col)[None, :]), mask=mh[:, None] & ok[None, :], other=0.0)
            if HILO:
                x1 = tl.dot(we_hi, a_s, out_dtype=tl.float32) + tl.dot(we_lo, a_s, out_dtype=tl.float32)
            else:
                x1 = dot(we, a_s.to(tl.float32) - ks[:, None], PREC)
            e = x1 + be[:, None]
            if RELU_E:
                e = tl.minimum(tl.maximum(e, 0.0), 6.0)
            e = tl.reshape(tl.where(ok[None, :], e, 0.0), (CC, TM, TJ))
            for dj in tl.static_range(KS):
                if dj == PAD:
                    es = e
                else:
                    idx = tl.minimum(tl.maximum(jj + (dj - PAD), 0), TJ - 1)
                    es = tl.gather(e, tl.broadcast_to(idx, (CC, TM, TJ)), 2)
                w = tl.load(wd_ptr + cc * wd_sc + (di * KS + dj) * wd_so, mask=mc, other=0.0).to(tl.float32)
                x2 += w[:, None, None] * es
        return tl.reshape(x2, (CC, P))

    @triton.jit
    def gather_tile(pid_r, pid_c, N, KS: tl.constexpr, TM: tl.constexpr, TJ: tl.constexpr):
        """The gather tiles: TM rows by TJ columns, column tiles overlapping by the stencil's halo.
        Returns the flat positions' map row and column, in the map, and owned (the inner columns)."""
        PAD: tl.constexpr = KS // 2
        p = tl.arange(0, TM * TJ)
        pj = p % TJ
        row = pid_r * TM + p // TJ
        col = pid_c * (TJ - 2 * PAD) - PAD + pj
        inmap = (row < N) & (col >= 0) & (col < N)
        return row, col, inmap, inmap & (pj >= PAD) & (pj < TJ - PAD)

    @triton.jit
    def _re_gather(a_ptr, we_ptr, be_ptr, wdwt_ptr, bdw_ptr, wp_ptr, bp_ptr, al_ptr, bt_ptr, r_ptr, N, H, RH,
                   KS: tl.constexpr, RELU_E: tl.constexpr, PREC: tl.constexpr, HILO: tl.constexpr, HP: tl.constexpr,
                   CC: tl.constexpr, TM: tl.constexpr, TJ: tl.constexpr):
        """The "gather" forward, one kernel, E never leaves registers: R at the owned positions of a
        gather tile (gather_tile) of one image, dw_k(E) by stencil_gathered, then the reduction dot
        and the affine residual. wdwt: the depthwise weights as (k*k, rH), so that a chunk's
        weights of one offset are contiguous (vector loads). HILO (fp16/bf16 maps): no per-element
        conversion or TF32 rounding of A in the expansion, and its weights to 16 bits (bf16)
        instead of TF32's 11."""
        b = tl.program_id(0).to(tl.int64)
        row, col, inmap, own = gather_tile(tl.program_id(1), tl.program_id(2), N, KS, TM, TJ)
        abase = a_ptr + b * H * N * N  # int32 offsets off the image base (_common.check_image_map)
        hh = tl.arange(0, HP)
        mh = hh < H
        hoff = hh[:, None] * (N * N)
        no_shift = tl.zeros((HP,), tl.float32)
        y = tl.zeros((HP, TM * TJ), tl.float32)
        for c0 in range(0, RH, CC):
            cc = c0 + tl.arange(0, CC)
            mc = cc < RH
            we, be = expansion_chunk(we_ptr, be_ptr, cc, mc, hh, mh, H)
            x2 = stencil_gathered(abase, hoff, row, col, N, mh, no_shift, we, be, wdwt_ptr, 1, RH, cc, mc, KS, RELU_E,
                                  PREC, HILO, CC, TM, TJ)
            y += reduction_chunk(x2, bdw_ptr, wp_ptr, cc, mc, hh, mh, RH, PREC, CC)
        m2 = mh[:, None] & own[None, :]
        q = (row * N + col)[None, :]
        a0 = tl.load(abase + (hoff + q), mask=m2, other=0.0).to(tl.float32)
        r = affine_residual(a0, y, al_ptr, bt_ptr, bp_ptr, hh, mh)
        tl.store(r_ptr + b * H * N * N + (hoff + q), r.to(r_ptr.dtype.element_ty), mask=m2)

    @triton.jit
    def halo_tile(pid_t, NTJ, N, KS: tl.constexpr, TM: tl.constexpr, TJ: tl.constexpr):
        """Halo tile pid_t of a map (NTJ tiles per tile row): each TM x TJ tile overlaps its neighbours
        by the stencil's halo, and the owned interiors tile the N x N map. Returns the flat position
        p, its tile row pm and column pj, its map row and column, in the map, and owned."""
        PAD: tl.constexpr = KS // 2
        p = tl.arange(0, TM * TJ)
        pm = p // TJ
        pj = p % TJ
        row = (pid_t // NTJ) * (TM - 2 * PAD) - PAD + pm
        col = (pid_t % NTJ) * (TJ - 2 * PAD) - PAD + pj
        inmap = (row >= 0) & (row < N) & (col >= 0) & (col < N)
        own = inmap & (pm >= PAD) & (pm < TM - PAD) & (pj >= PAD) & (pj < TJ - PAD)
        return p, pm, pj, row, col, inmap, own

    @triton.jit
    def stencil_staged(e, inmap, wdw_ptr, cc, mc, scr, p, pm, pj,
                       KS: tl.constexpr, CC: tl.constexpr, TM: tl.constexpr, TJ: tl.constexpr,
                       TRANSPOSE: tl.constexpr = False):
        """dw_k(E) of channels cc, exact at a halo tile's owned positions: E (CC x TM*TJ, over the whole
        tile; zeroed outside the map, the stencil's zero padding) is staged in the program's scratch
        `scr` and read at the k*k shifts, since an owned position shifted by at most the halo stays in
        the tile. One expansion per channel chunk instead of one per stencil offset.
        TRANSPOSE: the transposed stencil (shifts negated), sum_o w[o] E[q - s_o]: dw_k's backward."""
        PAD: tl.constexpr = KS // 2
        P: tl.constexpr = TM * TJ
        tl.debug_barrier()  # the previous chunk's reads of the scratch are done
        tl.store(scr + tl.arange(0, CC)[:, None] * P + p[None, :], tl.where(inmap[None, :], e, 0.0))
        tl.debug_barrier()
        acc = tl.zeros((CC, P), tl.float32)
        sign: tl.constexpr = -1 if TRANSPOSE else 1
        for o in range(0, KS * KS):
            sm = pm + sign * (o // KS - PAD)
            sj = pj + sign * (o % KS - PAD)
            okk = (sm >= 0) & (sm < TM) & (sj >= 0) & (sj < TJ)
            es = tl.load(scr + tl.arange(0, CC)[:, None] * P + (sm * TJ + sj)[None, :], mask=okk[None, :],
                         other=0.0, cache_modifier=".cg")
            w = tl.load(wdw_ptr + cc * (KS * KS) + o, mask=mc, other=0.0).to(tl.float32)
            acc += w[:, None] * es
        return acc

    @triton.jit
    def dw_wgrad_staged(e, inmap, g_own, scr, p, pm, pj, out, KS: tl.constexpr, CC: tl.constexpr,
                        TM: tl.constexpr, TJ: tl.constexpr):
        """The depthwise weights' gradient partials of channels cc, sum over owned positions q of
        g(q) E(q + s_o), stored at out + o for each offset o (out: CC pointers). E staged as in
        stencil_staged (g_own is 0 off the owned positions, where a shift may leave the tile)."""
        PAD: tl.constexpr = KS // 2
        P: tl.constexpr = TM * TJ
        tl.debug_barrier()
        tl.store(scr + tl.arange(0, CC)[:, None] * P + p[None, :], tl.where(inmap[None, :], e, 0.0))
        tl.debug_barrier()
        for o in range(0, KS * KS):
            sm = pm + (o // KS - PAD)
            sj = pj + (o % KS - PAD)
            okk = (sm >= 0) & (sm < TM) & (sj >= 0) & (sj < TJ)
            es = tl.load(scr + tl.arange(0, CC)[:, None] * P + (sm * TJ + sj)[None, :], mask=okk[None, :],
                         other=0.0, cache_modifier=".cg")
            tl.store(out + o, tl.sum(g_own * es, axis=1))

    @triton.jit
    def _re_bwd(a_ptr, dr_ptr, we_ptr, be_ptr, wdw_ptr, bdw_ptr, wp_ptr, bp_ptr, al_ptr,
                da_ptr, scr_ptr, pwe_ptr, pbe_ptr, pwdw_ptr, pbdw_ptr, pwp_ptr, pbp_ptr, pal_ptr, pbt_ptr,
                N, H, RH, RHP, NTJ,
                KS: tl.constexpr, RELU_E: tl.constexpr,
                HP: tl.constexpr, CC: tl.constexpr, TM: tl.constexpr, TJ: tl.constexpr):
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
        m2 = mh[:, None] & inmap[None, :]
        a0 = tl.load(a_ptr + base_a + (hoff + (row * N + col)[None, :]), mask=m2, other=0.0).to(tl.float32)
        dr = tl.load(dr_ptr + base_a + (hoff + (row * N + col)[None, :]), mask=m2, other=0.0).to(tl.float32)
        alpha = tl.load(al_ptr + hh, mask=mh, other=0.0).to(tl.float32)
        bp = tl.load(bp_ptr + hh, mask=mh, other=0.0).to(tl.float32)
        dy = alpha[:, None] * dr
        dy_own = dy * ownf[None, :]
        y = tl.zeros((HP, P), tl.float32)
        da = tl.zeros((HP, P), tl.float32)
        no_shift = tl.zeros((HP,), tl.float32)
        scr = scr_ptr + prog * (CC * P)
        for c0 in range(0, RH, CC):
            cc = c0 + tl.arange(0, CC)
            mc = cc < RH
            we, be = expansion_chunk(we_ptr, be_ptr, cc, mc, hh, mh, H)
            dacc = stencil_recomputed(a_ptr, base_a, hoff, row, col, p >= 0, N, mh, no_shift, we, be, wdw_ptr, cc, mc,
                                      KS, RELU_E, "ieee", CC, P)
            bdw = tl.load(bdw_ptr + cc, mask=mc, other=0.0).to(tl.float32)
            dpre = dacc + bdw[:, None]
            dd = tl.where(mc[:, None], tl.minimum(tl.maximum(dpre, 0.0), 6.0), 0.0)
            wp = tl.load(wp_ptr + hh[:, None] * RH + cc[None, :], mask=mh[:, None] & mc[None, :],
                         other=0.0).to(tl.float32)
            y += tl.dot(wp, dd, input_precision="ieee")
            # dW_pro partial (HP x CC)
            tl.store(pwp_ptr + prog * HP * RHP + hh[:, None] * RHP + cc[None, :],
                     tl.dot(dy_own, tl.trans(dd), input_precision="ieee"))
            wpt = tl.load(wp_ptr + hh[None, :] * RH + cc[:, None], mask=mh[None, :] & mc[:, None],
                          other=0.0).to(tl.float32)
            gd = tl.dot(wpt, dy, input_precision="ieee")
            g = tl.where((dpre > 0.0) & (dpre < 6.0) & mc[:, None], gd, 0.0)
            g_own = g * ownf[None, :]
            tl.store(pbdw_ptr + prog * RHP + cc, tl.sum(g_own, axis=1))
            # dW_dw partials from E computed once over the tile (not once per offset)
            epre = tl.dot(we, a0, input_precision="ieee") + be[:, None]
            e0 = tl.minimum(tl.maximum(epre, 0.0), 6.0) if RELU_E else epre
            dw_wgrad_staged(e0, inmap, g_own, scr, p, pm, pj, pwdw_ptr + prog * RHP * KK + cc * KK, KS, CC, TM, TJ)
            # transposed stencil through the scratch buffer: dE[q] = sum_o w[o] g[q - s_o] (g is 0
            # outside the map: dy is)
            de = stencil_staged(g, inmap, wdw_ptr, cc, mc, scr, p, pm, pj, KS, CC, TM, TJ, True)
            if RELU_E:
                de = tl.where((epre > 0.0) & (epre < 6.0), de, 0.0)
            de = tl.where(mc[:, None] & own[None, :], de, 0.0)
            wet = tl.load(we_ptr + cc[None, :] * H + hh[:, None], mask=mc[None, :] & mh[:, None],
                          other=0.0).to(tl.float32)
            da += tl.dot(wet, de, input_precision="ieee")
            tl.store(pwe_ptr + prog * RHP * HP + cc[:, None] * HP + hh[None, :],
                     tl.dot(de, tl.trans(a0), input_precision="ieee"))
            tl.store(pbe_ptr + prog * RHP + cc, tl.sum(de, axis=1))
        z = a0 + y + bp[:, None]
        dr_own = dr * ownf[None, :]
        tl.store(pal_ptr + prog * HP + hh, tl.sum(dr_own * z, axis=1))
        tl.store(pbt_ptr + prog * HP + hh, tl.sum(dr_own, axis=1))
        tl.store(pbp_ptr + prog * HP + hh, tl.sum(dy_own, axis=1))
        da = da + dy
        tl.store(da_ptr + base_a + (hoff + (row * N + col)[None, :]), da.to(da_ptr.dtype.element_ty),
                 mask=mh[:, None] & own[None, :])


if triton is not None:
    # H100 configurations, keyed on (N, head size, expanded channels, kernel size, heads).
    _re_fwd_tuned = gpu_autotune(
        [triton.Config({"TM": tm, "TJ": tj}, num_warps=w, num_stages=s)
         for tm, tj, w, s in [(16, 16, 4, 1), (16, 32, 4, 1), (16, 32, 8, 1), (16, 64, 8, 1),
                              (32, 32, 8, 1), (16, 32, 8, 2)]],
        key=["N", "D", "RH", "KS", "H", "STORE_R"])(_re_fwd)
    # The split forward's passes: positions per program and warps, and for the stencil pass whether
    # the k*k shifted loads are unrolled and how many channels a step takes (ptxas, sm_90, k=3,
    # P=128: 95 registers rolled with 16 channels and 4 warps, 172 unrolled with 8 warps, 113
    # unrolled with 1 channel and 4 warps; which wins is the GPU's to say).
    _re_expand_tuned = gpu_autotune(
        [triton.Config({"P": p}, num_warps=w, num_stages=1) for p, w in [(64, 4), (128, 4), (128, 8), (256, 8)]],
        key=["N", "H", "RH"])(_re_expand)
    _re_stencil_reduce_tuned = gpu_autotune(
        [triton.Config({"P": p, "UNROLL": u, "CC": cc}, num_warps=w, num_stages=2)
         for p, w, u, cc in [(64, 4, False, 16), (128, 4, False, 16), (128, 8, False, 16), (256, 8, False, 16),
                             (128, 8, True, 16), (128, 4, True, 1), (256, 4, True, 1), (128, 4, False, 1)]],
        key=["N", "H", "RH", "KS"])(_re_stencil_reduce)
    # the gather forward: rows per tile and warps (TJ follows from the kernel size, gather_tj)
    _re_gather_tuned = gpu_autotune(
        [triton.Config({"TM": tm}, num_warps=w, num_stages=1) for tm, w in [(2, 2), (4, 4), (4, 2), (8, 4), (8, 8)]],
        key=["N", "H", "RH", "KS"])(_re_gather)
else:
    _re_fwd_tuned = _re_expand_tuned = _re_stencil_reduce_tuned = _re_gather_tuned = None


def _fwd_tiles(N: int):
    if interpreting():
        return 16, max(16, next_pow2(N))
    return 16, 32


def _prep(attn, w_exp, b_exp, expand):
    H = attn.shape[1]
    if expand:
        return w_exp.contiguous(), b_exp.contiguous(), True
    eye = torch.eye(H, dtype=attn.dtype, device=attn.device)
    return eye, torch.zeros(H, dtype=attn.dtype, device=attn.device), False


def forward_variant(device=None) -> str:
    """REFINER_TRITON_REFINE_FWD: "split" (default: E computed once and stored in the input dtype,
    in batch chunks small enough to stay in L2, then the stencil, reduction and residual from it,
    R stored and multiplied by v) or "tile" (row tiles walking the columns, the expansion
    recomputed at each of the k*k stencil offsets, R @ v accumulated in registers: no temporary
    beyond the output, the lean-memory choice). H100, B=32, H=12, d=32, bf16 (benchmarks/results,
    2026-11-26): split 0.78 / 6.4 ms at N = 197 / 577, tile 1.00 / 6.8 ms; two other candidates
    measured slower there and were dropped (halo tiles staged through a scratch: 1.74 / 13.8 ms;
    the tile recompute on flat position ranges: 0.84 / 7.2 ms). A third, "padded" (split with E
    stored on a zero-bordered grid, so that the stencil's shifted loads need no bounds tests), was
    removed after the H200 measured it slower (B=32, N=197, bf16: 1.45 against 0.86 ms for split).
    "gather" (a candidate, not yet timed on a GPU): one kernel (_re_gather) on tiles of 32 columns
    overlapping by the halo; E formed by a tensor-core dot at each of the k row shifts and moved to
    the k column shifts by tl.gather (warp shuffles), never stored. ptxas (sm_90, k=3, 16 channels,
    bf16, 4 rows and 4 warps): ~1,377 SASS instructions per 128 positions and channel chunk (1,470
    with the halo columns) against split's ~2,526 (its stencil pass's 2,195 with the expansion
    pass's 331), with no E round trip through L2.
    The default applies unless the variable is set or a value is tuned for the GPU model (settings.py)."""
    return switch("REFINER_TRITON_REFINE_FWD", device)


def forward_precision(attn) -> str:
    """The refine_eval forward's dots, REFINER_TRITON_REFINE_DOT: "auto" (default): for fp16/bf16
    maps TF32 tensor-core dots (HALF_TF32; A and v are exact in TF32, weights and D are rounded to
    10 mantissa bits: ~2.4e-4 of max|out| at N=197, k=3, the size of the fp16 rounding of the output
    itself); "bf16" (a candidate, not yet timed on a GPU): bf16 operands rounded to nearest
    and fp32 accumulation for fp16/bf16 maps, twice TF32's tensor-core rate and A
    used as loaded: the precision of the reference's convolutions and matmuls under bf16 autocast.
    fp32 maps: IEEE always. Emulated under the interpreter by the tests (tests/tf32_emulation.py).
    The default applies unless the variable is set or a value is tuned for the GPU model (settings.py)."""
    if attn.dtype not in (torch.float16, torch.bfloat16):
        return "ieee"
    if switch("REFINER_TRITON_REFINE_DOT", attn.device) == "bf16":
        return "bf16"
    return "tf32" if HALF_TF32 else "ieee"


MAX_GRID_Y = 65535  # CUDA's limit on a grid's second dimension (the split forward's batch axis)
SPLIT_E_BYTES = 24 << 20  # the split forward's E per batch chunk: within the H100's 50 MB L2
SPLIT_MAX_MAP = 2 ** 31 - 1  # the split stencil pass's int32 offsets within an image's E (rH N^2)
SPLIT_UNROLL = False  # the split stencil pass's loop form and channels a step without autotuning
SPLIT_CC = CC  # (the tests set each)


def split_images(B: int, RH: int, N: int, esize: int) -> int:
    """Images per batch chunk of the split passes: their E (RH N^2 elements of esize bytes each)
    stays under SPLIT_E_BYTES, at least one image and at most a grid's batch axis."""
    return max(1, min(MAX_GRID_Y, SPLIT_E_BYTES // (RH * N * N * esize)))


def split_p() -> int:
    """Flat positions per program of the split passes without autotuning."""
    return 256 if interpreting() else 128


def expand_into(e, a, we, be, relu, prec):
    """E = relu6(we A + be) of the images of `a` into e[:images] ((images, RH, N, N), its dtype),
    by _re_expand."""
    n_img, H, N, _ = a.shape
    RH = we.shape[0]
    HP = max(16, next_pow2(H))
    consts = dict(RELU_E=relu, PREC=prec, HP=HP, CC=CC)
    args = (a, we, be, e, N, H, RH)
    if use_tuned(_re_expand_tuned, a):
        _re_expand_tuned[lambda META: (triton.cdiv(N * N, META["P"]), n_img)](*args, **consts)
    else:
        P = split_p()
        _re_expand[(triton.cdiv(N * N, P), n_img)](*args, **consts, P=P, num_warps=num_warps_for(HP * P),
                                                    num_stages=1)


def _split_r(attn, we, be, w_dw, b_dw, w_pro, b_pro, alpha, beta, relu, prec, r_dtype):
    """R (r_dtype, A-sized) by _re_expand then _re_stencil_reduce over batch chunks whose E (in
    r_dtype) stays under SPLIT_E_BYTES (split_images)."""
    B, H, N, _ = attn.shape
    RH, KS = w_dw.shape[0], w_dw.shape[-1]
    per = split_images(B, RH, N, torch.empty((), dtype=r_dtype).element_size())
    r = torch.empty(B, H, N, N, dtype=r_dtype, device=attn.device)
    e = torch.empty(min(B, per), RH, N, N, dtype=r_dtype, device=attn.device)
    params = (w_dw.contiguous(), b_dw.contiguous(), w_pro.contiguous(), b_pro.contiguous(), alpha.contiguous(),
              beta.contiguous())
    for lo in range(0, B, per):
        hi = min(B, lo + per)
        expand_into(e, attn[lo:hi], we, be, relu, prec)
        stencil_reduce_into(r[lo:hi], attn[lo:hi], e, params, KS, prec)
    return r


GATHER_TJ = None  # the gather forward's tile columns (None: gather_tj's rule; the tests set it)
GATHER_TM, GATHER_WARPS = 4, 4  # its rows per tile and warps without autotuning (the tests set each)


def gather_tj(N: int, KS: int) -> int:
    """Columns of a gather-forward tile: 32 (a warp's lanes, so the column shifts are shuffles)
    unless the halo would leave fewer than half of them owned; the whole padded row under the
    interpreter (fewer programs)."""
    pad = KS // 2
    if GATHER_TJ is not None:
        return max(GATHER_TJ, next_pow2(2 * pad + 1))
    tj = 32 if 4 * pad <= 32 else next_pow2(4 * pad)
    return max(tj, next_pow2(N + 2 * pad)) if interpreting() else tj


def gather_tiles(N: int, KS: int, rows: int):
    """(TM, TJ) of a gather launch without autotuning: `rows` rows (the interpreter: up to 16, fewer
    programs, unless the tests set GATHER_TJ) by gather_tj columns."""
    tm = min(16, next_pow2(N)) if interpreting() and GATHER_TJ is None else rows
    return tm, gather_tj(N, KS)


def _gather_r(attn, we, be, w_dw, b_dw, w_pro, b_pro, alpha, beta, relu, prec, r_dtype):
    """R (r_dtype, A-sized) by _re_gather: one launch, no stored E."""
    B, H, N, _ = attn.shape
    RH, KS = w_dw.shape[0], w_dw.shape[-1]
    HP = max(16, next_pow2(H))
    TM, TJ = gather_tiles(N, KS, GATHER_TM)
    owned = TJ - 2 * (KS // 2)
    r = torch.empty(B, H, N, N, dtype=r_dtype, device=attn.device)
    args = (attn, we, be, w_dw.reshape(RH, KS * KS).t().contiguous(), b_dw.contiguous(), w_pro.contiguous(),
            b_pro.contiguous(), alpha.contiguous(), beta.contiguous(), r, N, H, RH)
    consts = dict(KS=KS, RELU_E=relu, PREC=prec, HILO=prec == "tf32", HP=HP, CC=CC, TJ=TJ)
    if use_tuned(_re_gather_tuned, attn):
        _re_gather_tuned[lambda META: (B, triton.cdiv(N, META["TM"]), triton.cdiv(N, owned))](*args, **consts)
    else:
        _re_gather[(B, triton.cdiv(N, TM), triton.cdiv(N, owned))](*args, **consts, TM=TM, num_warps=GATHER_WARPS,
                                                                   num_stages=1)
    return r


def stencil_reduce_into(r, a, e, params, KS, prec):
    """R of the images of `a` into r (their E stored in e by expand_into) by _re_stencil_reduce;
    params: w_dw, b_dw, w_pro, b_pro, alpha, beta (contiguous)."""
    n_img, H, N, _ = a.shape
    RH, HP = e.shape[1], max(16, next_pow2(H))
    if use_tuned(_re_stencil_reduce_tuned, a):
        _re_stencil_reduce_tuned[lambda META: (triton.cdiv(N * N, META["P"]), n_img)](
            a, e, *params, r, N, H, RH, KS=KS, PREC=prec, HP=HP)
    else:
        P = split_p()
        _re_stencil_reduce[(triton.cdiv(N * N, P), n_img)](
            a, e, *params, r, N, H, RH, KS=KS, PREC=prec, HP=HP, CC=SPLIT_CC, P=P, UNROLL=SPLIT_UNROLL,
            num_warps=num_warps_for(HP * P), num_stages=2)


def refine_eval_fwd(attn, v, w_exp, b_exp, w_dw, b_dw, w_pro, b_pro, alpha, beta, expand,
                    store_r=False):
    check_inputs(attn, v)
    check_image_map(attn)
    attn, v = attn.contiguous(), unit_head_stride(v)  # v: read through its strides
    B, H, N, _ = attn.shape
    D = v.shape[-1]
    we, be, relu = _prep(attn, w_exp, b_exp, expand)
    RH = w_dw.shape[0]
    KS = w_dw.shape[-1]
    # "split" stores E and R in the input dtype, as the reference's convolutions do under autocast;
    # the backward's recompute of R stays IEEE fp32
    prec = "ieee" if store_r else forward_precision(attn)
    # split and gather: R in the input dtype (as under autocast), fp32 for the backward; split runs
    # "tile" beyond the int32 offsets of its stencil pass (rH N^2 > 2^31 - 1: N > 7723 at rH = 36)
    variant = forward_variant(attn.device)
    if variant == "gather" or (variant == "split" and RH * N * N <= SPLIT_MAX_MAP):
        r_dtype = torch.float32 if store_r else attn.dtype
        r = (_gather_r if variant == "gather" else _split_r)(attn, we, be, w_dw, b_dw, w_pro, b_pro, alpha, beta,
                                                            relu, prec, r_dtype)
        return r if store_r else bmm(r, v, out=token_major(B, H, N, D, v))
    TM, TJ = _fwd_tiles(N)
    HP = max(16, next_pow2(H))
    BD = max(16, next_pow2(D))
    out = token_major(B, H, N, D, v)
    r = torch.empty(B, H, N, N, dtype=torch.float32, device=attn.device) if store_r else out
    args = (attn, v, we, be, w_dw.contiguous(), b_dw.contiguous(), w_pro.contiguous(),
            b_pro.contiguous(), alpha.contiguous(), beta.contiguous(), out, r, N, D, H, RH,
            *bhn_strides(v), *bhn_strides(out))
    if use_tuned(_re_fwd_tuned, attn):
        _re_fwd_tuned[lambda META: (B, triton.cdiv(N, META["TM"]))](
            *args, KS=KS, RELU_E=relu, STORE_R=store_r, PREC=prec, HP=HP, CC=CC, BD=BD)
    else:
        _re_fwd[(B, triton.cdiv(N, TM))](*args, KS=KS, RELU_E=relu, STORE_R=store_r, PREC=prec, HP=HP, CC=CC,
                                         TM=TM, TJ=TJ, BD=BD, num_warps=num_warps_for(HP * TM * TJ))
    return r if store_r else out


def _bwd_tiles(N: int, KS: int):
    pad = KS // 2
    tm = max(16, next_pow2(2 * pad + 8))  # halo tiles: at least 8 owned rows/columns
    if interpreting():
        return tm, max(tm, next_pow2(N + 2 * pad))
    return tm, tm  # (HP x 256) fp32 tiles for k <= 7; the backward keeps ~10 of them live


def refine_eval_dla_bwd(attn, dr, w_exp, b_exp, w_dw, b_dw, w_pro, b_pro, alpha, expand):
    """Gradients of R = alpha (A + DLA(A)) + beta given dR: (dA, dw_exp, db_exp, dw_dw, db_dw,
    dw_pro, db_pro, dalpha, dbeta)."""
    check_image_map(attn)
    attn, dr = attn.contiguous(), dr.contiguous()
    B, H, N, _ = attn.shape
    we, be, relu = _prep(attn, w_exp, b_exp, expand)
    RH = w_dw.shape[0]
    KS = w_dw.shape[-1]
    PAD = KS // 2
    TM, TJ = _bwd_tiles(N, KS)
    HP = max(16, next_pow2(H))
    RHP = triton.cdiv(RH, CC) * CC
    nti = triton.cdiv(N, TM - 2 * PAD)
    ntj = triton.cdiv(N, TJ - 2 * PAD)
    dev = attn.device
    f32 = dict(dtype=torch.float32, device=dev)
    da = torch.empty(B, H, N, N, dtype=attn.dtype, device=dev)
    chunks = list(batch_chunks(B, nti * ntj, CC * TM * TJ * 4))
    nprog = nti * ntj * max(hi - lo for lo, hi in chunks)
    scr = torch.empty(nprog, CC, TM * TJ, **f32)
    pwe = torch.empty(nprog, RHP, HP, **f32)
    pbe = torch.empty(nprog, RHP, **f32)
    pwdw = torch.empty(nprog, RHP, KS * KS, **f32)
    pbdw = torch.empty(nprog, RHP, **f32)
    pwp = torch.empty(nprog, HP, RHP, **f32)
    pbp = torch.empty(nprog, HP, **f32)
    pal = torch.empty(nprog, HP, **f32)
    pbt = torch.empty(nprog, HP, **f32)
    parts = (pwe, pbe, pwdw, pbdw, pwp, pbp, pal, pbt)
    sums = [torch.zeros(t.shape[1:], **f32) for t in parts]
    for lo, hi in chunks:  # bounded scratch: batch chunks run one after another on the stream
        _re_bwd[(hi - lo, nti * ntj)](
            attn[lo:hi], dr[lo:hi], we, be, w_dw.contiguous(), b_dw.contiguous(), w_pro.contiguous(),
            b_pro.contiguous(), alpha.contiguous(), da[lo:hi], scr, *parts, N, H, RH, RHP, ntj,
            KS=KS, RELU_E=relu, HP=HP, CC=CC, TM=TM, TJ=TJ, num_warps=num_warps_for(HP * TM * TJ),
            num_stages=1)  # scratch staging: no software pipelining across barriers
        used = nti * ntj * (hi - lo)
        for acc, t in zip(sums, parts):
            acc += t[:used].sum(0)
    pwe, pbe, pwdw, pbdw, pwp, pbp, pal, pbt = [t[None] for t in sums]
    dwe = pwe.sum(0)[:RH, :H]
    dbe = pbe.sum(0)[:RH]
    if not expand:
        dwe = torch.zeros_like(w_exp, dtype=torch.float32)
        dbe = torch.zeros_like(b_exp, dtype=torch.float32)
    return (da, dwe, dbe, pwdw.sum(0)[:RH].reshape(RH, KS, KS), pbdw.sum(0)[:RH],
            pwp.sum(0)[:H, :RH], pbp.sum(0)[:H], pal.sum(0)[:H], pbt.sum(0)[:H])


def refine_eval_bwd(dout, attn, v, w_exp, b_exp, w_dw, b_dw, w_pro, b_pro, alpha, beta, expand):
    """R recomputed by the forward into an fp32 map, dv = R^T dO and dR = dO v^T by batched
    matmuls, then refine_eval_dla_bwd's gradient kernel over halo tiles (_re_bwd). It was 20x its
    forward's time on the H100 (B=32, N=197, bf16: 10.4 ms fwd+bwd against 0.50 fwd, round 3);
    the kernel runs at 255 registers with ~780 bytes of spills (sm_90), and the k*k recomputed
    expansions are most of its dots. (A candidate that stored E per L2-sized batch chunk and ran
    two gradient passes over flat position blocks, REFINER_TRITON_REFINE_BWD=split, was removed
    after the H200 measured it slower: fwd+bwd 32.3 against 10.4 ms.)"""
    # dout and v only meet bmm, which reads them through their strides (no copies)
    r = refine_eval_fwd(attn, v, w_exp, b_exp, w_dw, b_dw, w_pro, b_pro, alpha, beta, expand, store_r=True)
    dv = bmm(r.transpose(-1, -2), dout, out_dtype=v.dtype)
    dr = bmm(dout, v.transpose(-1, -2), out_dtype=torch.float32)
    da, *grads = refine_eval_dla_bwd(attn, dr, w_exp, b_exp, w_dw, b_dw, w_pro, b_pro, alpha, expand)
    ws = [g.to(w.dtype) for g, w in zip(grads, (w_exp, b_exp, w_dw, b_dw, w_pro, b_pro, alpha, beta))]
    return (da, dv, *ws)
