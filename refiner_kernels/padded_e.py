"""E on zero-bordered planes, so that the depthwise stencil's k*k shifted loads need no bounds.

Used by the refine_eval forward's "padded" candidate (REFINER_TRITON_REFINE_FWD=padded: the
"split" scheme, E stored once per L2-sized batch chunk, then the stencil, reduction and residual
from it), and by the split candidates' passes that read a stored E (and a stored stencil gradient
G) at the shifts: refine_eval's backward (REFINER_TRITON_REFINE_BWD=split) and refine_train's F2,
F3, B2 and B3 (REFINER_TRITON_TRAIN_X2=split), through plane_pos, stencil_padded,
stencil_input_grad and _pe_dw_wgrad (dw_weight_grad).

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

Every value is computed as the masked forms compute it (the same dots, the same order of the k*k
terms): the padded forward matches split bit for bit (tests/test_triton_ops.py), and the split
backward and training passes matched their former masked loads bit for bit (7 shapes, k = 1 to 7).
"""
from __future__ import annotations

import torch

from . import _common
from ._common import gpu_autotune, next_pow2, num_warps_for, triton, tl, use_tuned
from . import kernels_refine_eval as _eval

CC = _eval.CC
MAX_P = 512  # the most positions a program takes (autotuning configs; the guards reach past them)
UNROLL = True  # the stencil's k*k taps unrolled (k <= 5) without autotuning
WGRAD_BLOCKS = None  # position blocks a _pe_dw_wgrad program sums (None: 4096 positions; the interpreter: all)
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
    def plane_pos(row, col, ok, N, KS: tl.constexpr):
        """The positions (row, col) of the map in a padded plane, where `ok`; elsewhere 0, whose
        shifts stay within the guard. (Position 0 is border only for k > 1: with k = 1 it is the
        map's first element, so callers mask whatever they sum over positions off `ok`.)"""
        PAD: tl.constexpr = KS // 2
        return tl.where(ok, (row + PAD) * (N + 2 * PAD) + (col + PAD), 0)

    @triton.jit
    def stencil_padded(ebase, pos, cc, wdw_ptr, N, KS: tl.constexpr, CC: tl.constexpr, P: tl.constexpr,
                       UNROLL: tl.constexpr, SIGN: tl.constexpr = 1):
        """dw_k(E) of channels cc (CC x P, fp32) at the plane positions pos of a padded E (ebase: the
        image's RHP planes): sum_o w[cc, o] E[cc, pos + SIGN s_o] by unmasked loads, in the order of
        kernels_refine_eval.stencil_loaded (so the same values). wdw_ptr: the (RHP, k*k) weights,
        zero rows for padded channels. SIGN -1: the transposed stencil (dw_k's backward). Where pos
        is not a map position the result is garbage, for the caller to drop. UNROLL (k <= 5; 49
        unrolled taps of 16 channels spill ~13 KB, ptxas sm_90): with N a constexpr of the caller,
        the taps' offsets become load immediates."""
        PAD: tl.constexpr = KS // 2
        KK: tl.constexpr = KS * KS
        W = N + 2 * PAD
        eptr = ebase + (cc[:, None] * (W * W) + pos[None, :])
        acc = tl.zeros((CC, P), tl.float32)
        if UNROLL and KS <= 5:
            for o in tl.static_range(KK):
                w = tl.load(wdw_ptr + cc * KK + o)
                acc += w[:, None] * tl.load(eptr + SIGN * ((o // KS - PAD) * W + (o % KS - PAD))).to(tl.float32)
        else:
            for o in range(0, KK):
                w = tl.load(wdw_ptr + cc * KK + o)
                acc += w[:, None] * tl.load(eptr + SIGN * ((o // KS - PAD) * W + (o % KS - PAD))).to(tl.float32)
        return acc

    @triton.jit
    def stencil_input_grad(ebase, gbase, pos, valid, mc, wdw_ptr, cc, N, KS: tl.constexpr, CC: tl.constexpr,
                           P: tl.constexpr, RELU_E: tl.constexpr):
        """dL/dE at plane positions pos (plane_pos) from a padded G = dL/d dw_k(E) whose border and
        padded channels are 0 (gbase, and ebase for E: the image's planes): the transposed stencil
        of G, through relu6 (E strictly inside (0, 6)) when RELU_E, 0 off channels cc < rH and
        `valid` (CC x P, fp32). (The weights' gradient: _pe_dw_wgrad.)"""
        PAD: tl.constexpr = KS // 2
        W = N + 2 * PAD
        de = stencil_padded(gbase, pos, cc, wdw_ptr, N, KS, CC, P, False, -1)
        if RELU_E:
            e0 = tl.load(ebase + (cc[:, None] * (W * W) + pos[None, :]))
            de = tl.where((e0 > 0.0) & (e0 < 6.0), de, 0.0)
        return tl.where(mc[:, None] & valid[None, :], de, 0.0)

    @triton.jit
    def _pe_dw_wgrad(e_ptr, g_ptr, part_ptr, N, RHP, KS: tl.constexpr, KKP: tl.constexpr, P: tl.constexpr,
                     BLOCKS: tl.constexpr):
        """The depthwise weights' gradient from a padded E and a padded G = dL/d dw_k(E) (0 on the
        border): for channel program_id(0) of image program_id(1), over BLOCKS blocks of P plane
        positions from block program_id(2) * BLOCKS on, sum_q G(q) E(q + s_o) for every tap o, the
        taps the rows of one (KKP, P) accumulator summed across the program once at the end, not
        once per tap and block (a cross-warp reduction of 16 channels per tap was most of the
        instructions of the backward passes that did it inline). Stored at part_ptr + (program's
        slot * RHP + c) * k^2 + o, slot = program_id(1) * num_programs(2) + program_id(2)."""
        PAD: tl.constexpr = KS // 2
        KK: tl.constexpr = KS * KS
        W = N + 2 * PAD
        plane = W * W
        c = tl.program_id(0)
        o = tl.arange(0, KKP)
        mo = o < KK
        shift = (o // KS - PAD) * W + (o % KS - PAD)
        base = (tl.program_id(1).to(tl.int64) * RHP + c) * plane
        acc = tl.zeros((KKP, P), tl.float32)
        for i in range(0, BLOCKS):
            q = (tl.program_id(2) * BLOCKS + i) * P + tl.arange(0, P)
            inplane = q < plane
            g = tl.load(g_ptr + base + q, mask=inplane, other=0.0)
            es = tl.load(e_ptr + base + (q[None, :] + shift[:, None]), mask=mo[:, None] & inplane[None, :], other=0.0)
            acc += g[None, :] * es
        slot = tl.program_id(1) * tl.num_programs(2) + tl.program_id(2)
        tl.store(part_ptr + (slot * RHP + c) * KK + o, tl.sum(acc, axis=1), mask=mo)

    @triton.jit
    def _pe_expand(a_ptr, we_ptr, be_ptr, ks_ptr, e_ptr, N, H, RH, RHP, KS: tl.constexpr, RELU_E: tl.constexpr,
                   SHIFT: tl.constexpr, PREC: tl.constexpr, HP: tl.constexpr, CC: tl.constexpr, P: tl.constexpr,
                   PAD_PLANES: tl.constexpr = True):
        """E = relu6(w_exp (A - ks) + b_exp) at P positions of image program_id(1)'s padded grid, 0 on
        its border and, PAD_PLANES, in the padded channels (else their planes are left unwritten: the
        forward's stencil pass drops whatever it reads there); e_ptr: the first image's plane 0 (after
        the guard). ks: a per-head shift of A (SHIFT; the training passes' numerics), else none."""
        b = tl.program_id(1).to(tl.int64)
        q, row, col, inmap, W, plane = padded_grid(N, KS, P)
        hh = tl.arange(0, HP)
        mh = hh < H
        a = tl.load(a_ptr + b * H * N * N + (hh[:, None] * (N * N) + (row * N + col)[None, :]),
                    mask=mh[:, None] & inmap[None, :], other=0.0).to(tl.float32)
        if SHIFT:
            a = a - tl.load(ks_ptr + hh, mask=mh, other=0.0)[:, None]
        ebase = e_ptr + b * RHP * plane
        for c0 in range(0, RHP, CC):
            cc = c0 + tl.arange(0, CC)
            we, be = expansion_chunk(we_ptr, be_ptr, cc, cc < RH, hh, mh, H)
            e = dot(we, a, PREC) + be[:, None]
            if RELU_E:
                e = tl.minimum(tl.maximum(e, 0.0), 6.0)
            e = tl.where(inmap[None, :], e, 0.0)
            if PAD_PLANES:
                mc = cc < RHP
            else:
                mc = cc < RH
            tl.store(ebase + (cc[:, None] * plane + q[None, :]), e.to(e_ptr.dtype.element_ty),
                     mask=mc[:, None] & (q < plane)[None, :])

    @triton.jit
    def _pe_stencil_reduce(a_ptr, e_ptr, wdw_ptr, bdw_ptr, wp_ptr, bp_ptr, al_ptr, bt_ptr, r_ptr, N: tl.constexpr,
                           H, RH, RHP, KS: tl.constexpr, PREC: tl.constexpr, HP: tl.constexpr, CC: tl.constexpr,
                           P: tl.constexpr, UNROLL: tl.constexpr):
        """R at P positions of image program_id(1)'s padded grid (stored where they are in the map):
        D = relu6(dw_k(E) + b_dw) by unmasked loads of the padded E (wdw_ptr: the (RHP, k*k) fp32
        weights, zero rows for the padded channels), then the reduction dot and the affine residual.
        N is a constexpr (a kernel per map size, as a model has one): the unrolled taps' offsets are
        then immediates of the loads (ptxas sm_90, bf16, P = 128: 837 instructions per 16-channel
        chunk of 144 multiply-adds, against 1053 with N a runtime value and 1259 rolled). The padded
        channels' planes of the last chunk hold whatever was there (padded_r leaves them unwritten):
        reduction_chunk drops those rows. (Taking rH = 36's last 4 channels one at a time instead,
        14% fewer instructions, measured slower on the H200: 1.19 against 0.99 ms, untuned.)"""
        b = tl.program_id(1).to(tl.int64)
        q, row, col, inmap, W, plane = padded_grid(N, KS, P)
        hh = tl.arange(0, HP)
        mh = hh < H
        ebase = e_ptr + b * RHP * plane
        y = tl.zeros((HP, P), tl.float32)
        for c0 in range(0, RHP, CC):
            cc = c0 + tl.arange(0, CC)
            dacc = stencil_padded(ebase, q, cc, wdw_ptr, N, KS, CC, P, UNROLL)
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
        key=["N", "H", "RH", "KS"])(_pe_expand)  # (+ SHIFT, PREC...: _common.tuning_key)
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


def weights(w_dw):
    """The depthwise weights as the padded kernels read them: (RHP, k*k) fp32, zero rows for the
    padded channels (unmasked loads)."""
    RH, KS = w_dw.shape[0], w_dw.shape[-1]
    table = torch.zeros(triton.cdiv(RH, CC) * CC, KS * KS, dtype=torch.float32, device=w_dw.device)
    table[:RH] = w_dw.reshape(RH, KS * KS)
    return table


def workspace(n_img, RH, N, KS, dtype, device, zero=False):
    """Padded planes (RHP of (N + 2p)^2 elements an image) for n_img images, between two guards
    (GUARD_VALUE): the view past the front guard, the kernels' e_ptr. zero: the planes zeroed too
    (a buffer whose kernels write only the map positions, so that its border stays 0); else they
    are left as they come, or hold GUARD_VALUE where that is not 0 (the tests' NaN: what a kernel
    reads but never wrote then shows)."""
    RHP, W, g = triton.cdiv(RH, CC) * CC, N + 2 * (KS // 2), guard(N, KS, MAX_P)
    buf = (torch.zeros if zero else torch.empty)(2 * g + n_img * RHP * W * W, dtype=dtype, device=device)
    if GUARD_VALUE != 0.0 and not zero:
        buf.fill_(GUARD_VALUE)
    elif GUARD_VALUE != 0.0 or not zero:
        buf[:g].fill_(GUARD_VALUE)
        buf[-g:].fill_(GUARD_VALUE)
    return buf[g:-g]


def images_per_chunk(B, RH, N, KS, esize):
    """Images per batch chunk whose padded planes stay under SPLIT_E_BYTES (kernels_refine_eval)."""
    return _eval.split_images(B, triton.cdiv(RH, CC) * CC, N + 2 * (KS // 2), esize)


def expand_padded(e, a, we, be, relu, prec, KS, ks=None, pad_planes=True):
    """E = relu6(we (A - ks) + be) of the images of `a` into the padded planes e (workspace; its
    dtype), border 0 and, pad_planes, the padded channels' planes 0 (else unwritten), by _pe_expand;
    ks: a per-head shift (HP floats) or None."""
    n_img, H, N, _ = a.shape
    RH = we.shape[0]
    HP, RHP, W = max(16, next_pow2(H)), triton.cdiv(RH, CC) * CC, N + 2 * (KS // 2)
    args = (a, we, be, we if ks is None else ks, e, N, H, RH, RHP)
    consts = dict(KS=KS, RELU_E=relu, SHIFT=ks is not None, PREC=prec, HP=HP, CC=CC, PAD_PLANES=pad_planes)
    if use_tuned(_pe_expand_tuned, a):
        _pe_expand_tuned[lambda META: (triton.cdiv(W * W, META["P"]), n_img)](*args, **consts)
    else:
        P = _eval.split_p()
        _pe_expand[(triton.cdiv(W * W, P), n_img)](*args, **consts, P=P, num_warps=num_warps_for(HP * P), num_stages=1)


def dw_weight_grad(e, g, n_img, RH, N, KS):
    """sum over the images' map positions q of G(q) E(q + s_o), per channel and tap, from padded E
    and G (workspace; G zero on the border) by _pe_dw_wgrad: (RHP, k*k) float64, rows past rH 0.
    Per-program partial sums added up here (deterministic)."""
    RHP, W, KKP = triton.cdiv(RH, CC) * CC, N + 2 * (KS // 2), next_pow2(KS * KS)
    P = 4096 // KKP  # 32 accumulators a thread on 4 warps (ptxas sm_90, k = 3: 48 registers)
    blocks = WGRAD_BLOCKS or (triton.cdiv(W * W, P) if _common.interpreting() else 4096 // P)
    splits = triton.cdiv(W * W, P * blocks)
    part = torch.zeros(n_img * splits, RHP, KS * KS, dtype=torch.float32, device=e.device)
    _pe_dw_wgrad[(RH, n_img, splits)](e, g, part, N, RHP, KS=KS, KKP=KKP, P=P, BLOCKS=blocks, num_warps=4)
    return part.sum(0, dtype=torch.float64)


def padded_r(attn, we, be, w_dw, b_dw, w_pro, b_pro, alpha, beta, relu, prec, r_dtype):
    """R (r_dtype, A-sized) from the padded E (r_dtype) of batch chunks under SPLIT_E_BYTES, by
    _pe_expand (not the padded channels' planes: the stencil pass drops their rows, so a quarter
    of E's writes less at rH = 36) then _pe_stencil_reduce."""
    B, H, N, _ = attn.shape
    RH, KS = w_dw.shape[0], w_dw.shape[-1]
    per = images_per_chunk(B, RH, N, KS, torch.empty((), dtype=r_dtype).element_size())
    e = workspace(min(B, per), RH, N, KS, r_dtype, attn.device)
    params = (weights(w_dw), b_dw.contiguous(), w_pro.contiguous(), b_pro.contiguous(), alpha.contiguous(),
              beta.contiguous())
    r = torch.empty(B, H, N, N, dtype=r_dtype, device=attn.device)
    for lo in range(0, B, per):
        hi = min(B, lo + per)
        expand_padded(e, attn[lo:hi], we, be, relu, prec, KS, pad_planes=False)
        stencil_reduce_into(r[lo:hi], attn[lo:hi], e, params, KS, prec)
    return r


def stencil_reduce_into(r, a, e, params, KS, prec):
    """R of the images of `a` into r from their padded E (expand_padded) by _pe_stencil_reduce;
    params: the padded weights (weights()), b_dw, w_pro, b_pro, alpha, beta (contiguous)."""
    n_img, H, N, _ = a.shape
    RH = params[1].shape[0]
    HP, RHP, W = max(16, next_pow2(H)), triton.cdiv(RH, CC) * CC, N + 2 * (KS // 2)
    consts = dict(KS=KS, PREC=prec, HP=HP, CC=CC)
    if use_tuned(_pe_stencil_reduce_tuned, a):
        _pe_stencil_reduce_tuned[lambda META: (triton.cdiv(W * W, META["P"]), n_img)](
            a, e, *params, r, N, H, RH, RHP, **consts)
    else:
        P = _eval.split_p()
        _pe_stencil_reduce[(triton.cdiv(W * W, P), n_img)](
            a, e, *params, r, N, H, RH, RHP, P=P, UNROLL=UNROLL, num_warps=num_warps_for(HP * P), num_stages=2,
            **consts)
