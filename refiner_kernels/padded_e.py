"""The refine_eval forward's "padded" candidate (REFINER_TRITON_REFINE_FWD=padded): the "split"
scheme (E stored once per L2-sized batch chunk, then the stencil, reduction and residual from it),
with E stored on a zero-bordered grid so that the stencil's k*k shifted loads need no bounds.

Why: in the split stencil pass (kernels_refine_eval._re_stencil_reduce) every shifted load of E
computes its row and column, four bounds tests, a mask per element and a masked weight load:
ptxas (sm_90, bf16, P=128, 4 warps) issues 2195 instructions (1785 unrolled) per 16-channel
chunk of 144 multiply-adds a thread; this pass was 86% of the split forward's time (H100 profile).
Here E of image b, channel c lives at plane (b, c) of W x W elements, W = N + 2p (p = k // 2),
with the map at rows and columns p..p+N-1 and zeros around it (the stencil's zero padding of E),
for all RHP = 16-padded channels (padded channels: zero weights). A program takes P consecutive
positions q of that grid, and tap o reads E at q + (o // k - p) W + (o % k - p): the same pointer
tensor plus a scalar, unmasked. Positions of the border are computed and dropped (2% at N = 197).
Loads that leave a plane land in the neighbouring plane or in the zeroed guards before the first
and after the last (guard()): only dropped positions read them.

Every value is computed as the split forward computes it (the same dots, the same order of the
k*k terms): R matches it bit for bit (tests/test_triton_ops.py).
"""
from __future__ import annotations

import torch

from ._common import gpu_autotune, next_pow2, num_warps_for, triton, tl, use_tuned
from . import kernels_refine_eval as _eval

CC = _eval.CC
MAX_P = 512  # the most positions a program takes (autotuning configs; the guards reach past them)
UNROLL = True  # the stencil's k*k taps unrolled (k <= 5) without autotuning
GUARD_VALUE = 0.0  # what the guards hold (only dropped positions read them; the tests put NaN there)


if triton is not None:
    from .kernels_refine_eval import affine_residual, dot, expansion_chunk, reduction_chunk

    @triton.jit
    def padded_grid(N, KS: tl.constexpr, P: tl.constexpr):
        """Program_id(0)'s block of P positions q of the padded W x W grid: (q, its map row and
        column, in the map, W, W * W)."""
        PAD: tl.constexpr = KS // 2
        W = N + 2 * PAD
        q = tl.program_id(0) * P + tl.arange(0, P)
        row = q // W - PAD
        col = q % W - PAD
        inmap = (q < W * W) & (row >= 0) & (row < N) & (col >= 0) & (col < N)
        return q, row, col, inmap, W, W * W

    @triton.jit
    def _pe_expand(a_ptr, we_ptr, be_ptr, e_ptr, N, H, RH, RHP, KS: tl.constexpr, RELU_E: tl.constexpr,
                   PREC: tl.constexpr, HP: tl.constexpr, CC: tl.constexpr, P: tl.constexpr):
        """E = relu6(w_exp A + b_exp) at P positions of image program_id(1)'s padded grid, 0 on its
        border and in the padded channels; e_ptr: the first image's plane 0 (after the guard)."""
        b = tl.program_id(1).to(tl.int64)
        q, row, col, inmap, W, plane = padded_grid(N, KS, P)
        hh = tl.arange(0, HP)
        mh = hh < H
        a = tl.load(a_ptr + b * H * N * N + (hh[:, None] * (N * N) + (row * N + col)[None, :]),
                    mask=mh[:, None] & inmap[None, :], other=0.0).to(tl.float32)
        ebase = e_ptr + b * RHP * plane
        for c0 in range(0, RHP, CC):
            cc = c0 + tl.arange(0, CC)
            we, be = expansion_chunk(we_ptr, be_ptr, cc, cc < RH, hh, mh, H)
            e = dot(we, a, PREC) + be[:, None]
            if RELU_E:
                e = tl.minimum(tl.maximum(e, 0.0), 6.0)
            e = tl.where(inmap[None, :], e, 0.0)
            tl.store(ebase + (cc[:, None] * plane + q[None, :]), e.to(e_ptr.dtype.element_ty),
                     mask=(q < plane)[None, :])

    @triton.jit
    def _pe_stencil_reduce(a_ptr, e_ptr, wdw_ptr, bdw_ptr, wp_ptr, bp_ptr, al_ptr, bt_ptr, r_ptr, N: tl.constexpr,
                           H, RH, RHP, KS: tl.constexpr, PREC: tl.constexpr, HP: tl.constexpr, CC: tl.constexpr,
                           P: tl.constexpr, UNROLL: tl.constexpr):
        """R at P positions of image program_id(1)'s padded grid (stored where they are in the map):
        D = relu6(dw_k(E) + b_dw) by unmasked loads of the padded E (wdw_ptr: the (RHP, k*k) fp32
        weights, zero rows for the padded channels), then the reduction dot and the affine residual.
        N is a constexpr (a kernel per map size, as a model has one): the unrolled taps' offsets are
        then immediates of the loads (ptxas sm_90, bf16, P = 128: 837 instructions per 16-channel
        chunk of 144 multiply-adds, against 1053 with N a runtime value and 1259 rolled)."""
        PAD: tl.constexpr = KS // 2
        KK: tl.constexpr = KS * KS
        b = tl.program_id(1).to(tl.int64)
        q, row, col, inmap, W, plane = padded_grid(N, KS, P)
        hh = tl.arange(0, HP)
        mh = hh < H
        ebase = e_ptr + b * RHP * plane
        y = tl.zeros((HP, P), tl.float32)
        for c0 in range(0, RHP, CC):
            cc = c0 + tl.arange(0, CC)
            eptr = ebase + (cc[:, None] * plane + q[None, :])
            dacc = tl.zeros((CC, P), tl.float32)
            if UNROLL and KS <= 5:  # 49 unrolled taps of 16 channels spill ~13 KB (ptxas, sm_90)
                for o in tl.static_range(KK):
                    w = tl.load(wdw_ptr + cc * KK + o)
                    dacc += w[:, None] * tl.load(eptr + ((o // KS - PAD) * W + (o % KS - PAD))).to(tl.float32)
            else:
                for o in range(0, KK):
                    w = tl.load(wdw_ptr + cc * KK + o)
                    dacc += w[:, None] * tl.load(eptr + ((o // KS - PAD) * W + (o % KS - PAD))).to(tl.float32)
            y += reduction_chunk(dacc, bdw_ptr, wp_ptr, cc, cc < RH, hh, mh, RH, PREC, CC)
        m2 = mh[:, None] & inmap[None, :]
        off = b * H * N * N + (hh[:, None] * (N * N) + (row * N + col)[None, :])
        a0 = tl.load(a_ptr + off, mask=m2, other=0.0).to(tl.float32)
        r = affine_residual(a0, y, al_ptr, bt_ptr, bp_ptr, hh, mh)
        tl.store(r_ptr + off, r.to(r_ptr.dtype.element_ty), mask=m2)

    # as the split forward's passes (kernels_refine_eval), without its one-channel stencil configs; and
    # two positions a thread (P = 256 on 4 warps, 512 on 8), which share each weight load of a tap
    _pe_expand_tuned = gpu_autotune(
        [triton.Config({"P": p}, num_warps=w, num_stages=1) for p, w in [(64, 4), (128, 4), (128, 8), (256, 8)]],
        key=["N", "H", "RH", "KS"])(_pe_expand)
    _pe_stencil_reduce_tuned = gpu_autotune(
        [triton.Config({"P": p, "UNROLL": u}, num_warps=w, num_stages=2)
         for p, w, u in [(64, 4, False), (128, 4, False), (128, 8, False), (256, 8, False), (256, 4, False),
                         (MAX_P, 8, False), (128, 4, True), (128, 8, True), (256, 4, True)]],
        key=["N", "H", "RH", "KS"])(_pe_stencil_reduce)
else:
    _pe_expand_tuned = _pe_stencil_reduce_tuned = None


def fits(RH: int, N: int, KS: int) -> bool:
    """Whether an image's padded E (RHP W^2 elements) is within the kernels' int32 offsets."""
    pad = KS // 2
    return triton.cdiv(RH, CC) * CC * (N + 2 * pad) ** 2 <= _eval.SPLIT_MAX_MAP


def guard(N: int, KS: int, P: int) -> int:
    """Elements before the first plane and after the last that a shifted load may reach: a tap's
    reach p (W + 1), and the last program's positions past its plane (P at most), rounded up to 16."""
    pad = KS // 2
    return -(-(pad * (N + 2 * pad + 1) + P) // 16) * 16


def padded_r(attn, we, be, w_dw, b_dw, w_pro, b_pro, alpha, beta, relu, prec, r_dtype):
    """R (r_dtype, A-sized) from the padded E (r_dtype) of batch chunks under SPLIT_E_BYTES, by
    _pe_expand then _pe_stencil_reduce."""
    B, H, N, _ = attn.shape
    RH, KS = w_dw.shape[0], w_dw.shape[-1]
    HP, RHP, W = max(16, next_pow2(H)), triton.cdiv(RH, CC) * CC, N + 2 * (KS // 2)
    esize = torch.empty((), dtype=r_dtype).element_size()
    per = _eval.split_images(B, RHP, W, esize)
    g = guard(N, KS, MAX_P)
    buf = torch.empty(2 * g + min(B, per) * RHP * W * W, dtype=r_dtype, device=attn.device)
    buf[:g].fill_(GUARD_VALUE)
    buf[-g:].fill_(GUARD_VALUE)
    e = buf[g:-g]
    wdw = torch.zeros(RHP, KS * KS, dtype=torch.float32, device=attn.device)
    wdw[:RH] = w_dw.reshape(RH, KS * KS)
    params = (wdw, b_dw.contiguous(), w_pro.contiguous(), b_pro.contiguous(), alpha.contiguous(),
              beta.contiguous())
    r = torch.empty(B, H, N, N, dtype=r_dtype, device=attn.device)
    consts = dict(KS=KS, PREC=prec, HP=HP)
    tuned = use_tuned(_pe_stencil_reduce_tuned, attn)
    P = _eval.split_p()
    for lo in range(0, B, per):
        hi = min(B, lo + per)
        a = attn[lo:hi]
        if tuned:
            _pe_expand_tuned[lambda META: (triton.cdiv(W * W, META["P"]), hi - lo)](
                a, we, be, e, N, H, RH, RHP, RELU_E=relu, CC=CC, **consts)
            _pe_stencil_reduce_tuned[lambda META: (triton.cdiv(W * W, META["P"]), hi - lo)](
                a, e, *params, r[lo:hi], N, H, RH, RHP, CC=CC, **consts)
        else:
            _pe_expand[(triton.cdiv(W * W, P), hi - lo)](a, we, be, e, N, H, RH, RHP, RELU_E=relu, CC=CC, P=P,
                                                         num_warps=num_warps_for(HP * P), num_stages=1, **consts)
            _pe_stencil_reduce[(triton.cdiv(W * W, P), hi - lo)](
                a, e, *params, r[lo:hi], N, H, RH, RHP, CC=CC, P=P, UNROLL=UNROLL,
                num_warps=num_warps_for(HP * P), num_stages=2, **consts)
    return r
