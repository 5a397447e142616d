"""Fused softmax attention block: A = softmax(s q k^T) [+ s A_prev]; out = A @ v.

Forward: one program per (query tile, batch*head). Two passes over key tiles: the first
finds the row max and the softmax denominator (online), the second forms A, writes it
(the next block needs it) and accumulates A @ v from the same tile. The log-sum-exp of
each row is kept (B*H*N floats) so the backward can recompute P without the map.

Backward (FlashAttention-2 style, two kernels):
  _bwd_dq: per query tile: dA_tot = dA + dO v^T, dprev = s dA_tot, delta = rowsum(P*dA_tot),
           dS = P (dA_tot - delta), dq = s dS k.
  _bwd_dkdv: per key tile, loop over query tiles: dv += A^T dO, dk += s dS^T q.
All arithmetic in fp32 (half inputs are cast right after loading), dots with
input_precision="ieee" so fp32 inputs are not rounded to TF32 on the GPU; the candidate
REFINER_TRITON_SOFTMAX_BWD_DOT=bf16 gives dq's and dk's dots bf16 operands (ds_precision).

Every kernel recomputes the scores s = (q k^T) * scale and subtracts a row statistic found from
an earlier evaluation (the pass-1 max, the lse). They are launched with enable_fp_fusion=False:
with fusion, LLVM may contract `dot * scale - m` into one FMA (the unrounded product) in one
place and not in the other, and for logits ~1e8 (ulp 8-32) that puts exp(s - m) at e^16 for the
row's own maximum (the H100 run of test_huge_logits_stay_finite). The cost, a few FMAs split in
two per score, is not measured yet (gpu_round's bench_ops times these kernels).
"""
from __future__ import annotations


import torch

from ._common import (bhn_strides, check_inputs, gpu_autotune, interpreting, next_pow2, num_warps_for, token_major,
                      triton, tl, use_tuned, unit_head_stride)
from .settings import switch


if triton is not None:
    from .kernels_refine_eval import dot

    @triton.jit
    def _sb_fwd(q_ptr, k_ptr, v_ptr, p_ptr, out_ptr, a_ptr, lse_ptr, N, D, H, scale,
                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                HAS_PREV: tl.constexpr, DOT_T: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
        """q, k, v and out: (B, H, N, D) with any batch, head and token strides (the head dim's is 1),
        so the fused layer passes views of its qkv projection and gets out in (B, N, H, D) memory."""
        pid_m = tl.program_id(1)
        bh = tl.program_id(0).to(tl.int64)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_d = tl.arange(0, BD)
        mrow = offs_m < N
        mcol_d = offs_d < D
        q_ptr += b * sqb + h * sqh
        k_ptr += b * skb + h * skh
        v_ptr += b * svb + h * svh
        out_ptr += b * sob + h * soh
        base_nn = bh * N * N
        q = tl.load(q_ptr + offs_m[:, None] * sqn + offs_d[None, :],
                    mask=mrow[:, None] & mcol_d[None, :], other=0.0).to(DOT_T)
        m_i = tl.full((BM,), float("-inf"), tl.float32)
        l_i = tl.zeros((BM,), tl.float32)
        for n0 in range(0, N, BN):
            offs_n = n0 + tl.arange(0, BN)
            mn = offs_n < N
            kt = tl.load(k_ptr + offs_n[None, :] * skn + offs_d[:, None],
                         mask=mn[None, :] & mcol_d[:, None], other=0.0).to(DOT_T)
            s = tl.dot(q, kt, input_precision="ieee") * scale
            s = tl.where(mn[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
            m_i = m_new
        inv_l = 1.0 / l_i
        acc = tl.zeros((BM, BD), tl.float32)
        for n0 in range(0, N, BN):
            offs_n = n0 + tl.arange(0, BN)
            mn = offs_n < N
            kt = tl.load(k_ptr + offs_n[None, :] * skn + offs_d[:, None],
                         mask=mn[None, :] & mcol_d[:, None], other=0.0).to(DOT_T)
            s = tl.dot(q, kt, input_precision="ieee") * scale
            p = tl.exp(s - m_i[:, None]) * inv_l[:, None]
            mask2 = mrow[:, None] & mn[None, :]
            p = tl.where(mask2, p, 0.0)
            if HAS_PREV:
                prev = tl.load(p_ptr + base_nn + offs_m[:, None] * N + offs_n[None, :],
                               mask=mask2, other=0.0).to(tl.float32)
                p = p + prev * scale
            tl.store(a_ptr + base_nn + offs_m[:, None] * N + offs_n[None, :],
                     p.to(a_ptr.dtype.element_ty), mask=mask2)
            vv = tl.load(v_ptr + offs_n[:, None] * svn + offs_d[None, :],
                         mask=mn[:, None] & mcol_d[None, :], other=0.0).to(DOT_T)
            acc += tl.dot(p.to(DOT_T), vv, input_precision="ieee")
        tl.store(out_ptr + offs_m[:, None] * son + offs_d[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=mrow[:, None] & mcol_d[None, :])
        tl.store(lse_ptr + bh * N + offs_m, m_i + tl.log(l_i), mask=mrow)

    @triton.jit
    def _sb_bwd_dq(q_ptr, k_ptr, v_ptr, lse_ptr, do_ptr, da_ptr, dq_ptr, dp_ptr, delta_ptr,
                   N, D, scale, HAS_PREV: tl.constexpr, DOT_T: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, DS_PREC: tl.constexpr = "ieee"):
        pid_m = tl.program_id(1)
        bh = tl.program_id(0).to(tl.int64)
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_d = tl.arange(0, BD)
        mrow = offs_m < N
        mcol_d = offs_d < D
        base_qd = bh * N * D
        base_nn = bh * N * N
        mqd = mrow[:, None] & mcol_d[None, :]
        q = tl.load(q_ptr + base_qd + offs_m[:, None] * D + offs_d[None, :], mask=mqd, other=0.0).to(DOT_T)
        do = tl.load(do_ptr + base_qd + offs_m[:, None] * D + offs_d[None, :], mask=mqd, other=0.0).to(DOT_T)
        lse = tl.load(lse_ptr + bh * N + offs_m, mask=mrow, other=0.0)
        delta = tl.zeros((BM,), tl.float32)
        for n0 in range(0, N, BN):
            offs_n = n0 + tl.arange(0, BN)
            mn = offs_n < N
            mask2 = mrow[:, None] & mn[None, :]
            kt = tl.load(k_ptr + base_qd + offs_n[None, :] * D + offs_d[:, None],
                         mask=mn[None, :] & mcol_d[:, None], other=0.0).to(DOT_T)
            vt = tl.load(v_ptr + base_qd + offs_n[None, :] * D + offs_d[:, None],
                         mask=mn[None, :] & mcol_d[:, None], other=0.0).to(DOT_T)
            s = tl.dot(q, kt, input_precision="ieee") * scale
            p = tl.where(mask2, tl.exp(s - lse[:, None]), 0.0)
            da = tl.load(da_ptr + base_nn + offs_m[:, None] * N + offs_n[None, :], mask=mask2,
                         other=0.0).to(tl.float32)
            da = da + tl.dot(do, vt, input_precision="ieee")
            if HAS_PREV:
                tl.store(dp_ptr + base_nn + offs_m[:, None] * N + offs_n[None, :],
                         (da * scale).to(dp_ptr.dtype.element_ty), mask=mask2)
            delta += tl.sum(p * da, axis=1)
        dq = tl.zeros((BM, BD), tl.float32)
        for n0 in range(0, N, BN):
            offs_n = n0 + tl.arange(0, BN)
            mn = offs_n < N
            mask2 = mrow[:, None] & mn[None, :]
            kt = tl.load(k_ptr + base_qd + offs_n[None, :] * D + offs_d[:, None],
                         mask=mn[None, :] & mcol_d[:, None], other=0.0).to(DOT_T)
            vt = tl.load(v_ptr + base_qd + offs_n[None, :] * D + offs_d[:, None],
                         mask=mn[None, :] & mcol_d[:, None], other=0.0).to(DOT_T)
            s = tl.dot(q, kt, input_precision="ieee") * scale
            p = tl.where(mask2, tl.exp(s - lse[:, None]), 0.0)
            da = tl.load(da_ptr + base_nn + offs_m[:, None] * N + offs_n[None, :], mask=mask2,
                         other=0.0).to(tl.float32)
            da = da + tl.dot(do, vt, input_precision="ieee")
            ds = p * (da - delta[:, None])
            dq += dot(ds, tl.trans(kt).to(tl.float32), DS_PREC)
        tl.store(dq_ptr + base_qd + offs_m[:, None] * D + offs_d[None, :],
                 (dq * scale).to(dq_ptr.dtype.element_ty), mask=mqd)
        tl.store(delta_ptr + bh * N + offs_m, delta, mask=mrow)

    @triton.jit
    def _sb_bwd_dkdv(q_ptr, k_ptr, v_ptr, p_ptr, lse_ptr, delta_ptr, do_ptr, da_ptr, dk_ptr, dv_ptr,
                     N, D, scale, HAS_PREV: tl.constexpr, DOT_T: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, DS_PREC: tl.constexpr = "ieee"):
        pid_n = tl.program_id(1)
        bh = tl.program_id(0).to(tl.int64)
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_d = tl.arange(0, BD)
        mn = offs_n < N
        mcol_d = offs_d < D
        base_qd = bh * N * D
        base_nn = bh * N * N
        mkd = mn[:, None] & mcol_d[None, :]
        k = tl.load(k_ptr + base_qd + offs_n[:, None] * D + offs_d[None, :], mask=mkd, other=0.0).to(DOT_T)
        v = tl.load(v_ptr + base_qd + offs_n[:, None] * D + offs_d[None, :], mask=mkd, other=0.0).to(DOT_T)
        dk = tl.zeros((BN, BD), tl.float32)
        dv = tl.zeros((BN, BD), tl.float32)
        for m0 in range(0, N, BM):
            offs_m = m0 + tl.arange(0, BM)
            mrow = offs_m < N
            mqd = mrow[:, None] & mcol_d[None, :]
            mask2 = mrow[:, None] & mn[None, :]
            q = tl.load(q_ptr + base_qd + offs_m[:, None] * D + offs_d[None, :], mask=mqd, other=0.0).to(DOT_T)
            do = tl.load(do_ptr + base_qd + offs_m[:, None] * D + offs_d[None, :], mask=mqd, other=0.0).to(DOT_T)
            lse = tl.load(lse_ptr + bh * N + offs_m, mask=mrow, other=0.0)
            delta = tl.load(delta_ptr + bh * N + offs_m, mask=mrow, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            p = tl.where(mask2, tl.exp(s - lse[:, None]), 0.0)
            a = p
            if HAS_PREV:
                prev = tl.load(p_ptr + base_nn + offs_m[:, None] * N + offs_n[None, :], mask=mask2,
                               other=0.0).to(tl.float32)
                a = p + prev * scale
            dv += tl.dot(tl.trans(a.to(DOT_T)), do, input_precision="ieee")
            da = tl.load(da_ptr + base_nn + offs_m[:, None] * N + offs_n[None, :], mask=mask2,
                         other=0.0).to(tl.float32)
            da = da + tl.dot(do, tl.trans(v), input_precision="ieee")
            ds = p * (da - delta[:, None])
            dk += dot(tl.trans(ds), q.to(tl.float32), DS_PREC)
        tl.store(dk_ptr + base_qd + offs_n[:, None] * D + offs_d[None, :],
                 (dk * scale).to(dk_ptr.dtype.element_ty), mask=mkd)
        tl.store(dv_ptr + base_qd + offs_n[:, None] * D + offs_d[None, :],
                 dv.to(dv_ptr.dtype.element_ty), mask=mkd)


if triton is not None:
    _sb_fwd_tuned = gpu_autotune(
        [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s)
         for bm, bn, w, s in [(64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (32, 64, 4, 1),
                              (64, 128, 8, 2)]],
        key=["N", "D", "HAS_PREV"])(_sb_fwd)
    # The backward's kernels (BM: the rows a program owns in dq, the query rows a step in dk/dv; BN the
    # other way round). ptxas (sm_90, bf16, head size 32, 8 warps) spills 364 bytes a thread in
    # _sb_bwd_dkdv at 64 x 64 (the fixed tiles before), 16 at 64 x 32 and none at 32 x 64; dq at 64 x 64
    # spills none (380 for head size 64). Which is fastest is the GPU's to say.
    _sb_bwd_dq_tuned = gpu_autotune(
        [triton.Config({"BM": bm, "BN": bn}, num_warps=w) for bm, bn, w in [(64, 64, 8), (64, 32, 8), (32, 64, 8),
                                                                             (32, 64, 4)]],
        key=["N", "D", "HAS_PREV"])(_sb_bwd_dq)
    _sb_bwd_dkdv_tuned = gpu_autotune(
        [triton.Config({"BM": bm, "BN": bn}, num_warps=w) for bm, bn, w in [(64, 64, 8), (32, 64, 8), (64, 32, 8),
                                                                             (32, 64, 4)]],
        key=["N", "D", "HAS_PREV"])(_sb_bwd_dkdv)
else:
    _sb_fwd_tuned = _sb_bwd_dq_tuned = _sb_bwd_dkdv_tuned = None


def _dot_dtype(dtype):
    """Operand type of the tensor-core dots whose operands are exact in the input type (q k^T,
    dO v^T) or rounded to it exactly as the reference rounds them (A @ v with A stored in the
    input type). Everything else stays fp32. bf16 under the interpreter is computed in fp32
    (the interpreter mishandles bf16)."""
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16 and not interpreting():
        return tl.bfloat16
    return tl.float32


def _tiles(N: int, D: int):
    """(BM, BN, BD). Interpreter: whole rows in one tile (fewest programs). GPU: 64 x 64."""
    BD = max(16, next_pow2(D))
    if interpreting():
        return 16, max(16, next_pow2(N)), BD
    bm = 64 if BD <= 64 else 32
    return bm, 64, BD


def softmax_block_fwd(q, k, v, prev_attn, scale: float):
    """q, k, v: any strides with a unit-stride head dim (others are copied), e.g. views of a qkv
    projection; out: token-major (token_major)."""
    check_inputs(q, k, v, prev_attn)
    q, k, v = (unit_head_stride(t) for t in (q, k, v))
    B, H, N, D = q.shape
    out = token_major(B, H, N, D, q)
    attn = torch.empty(B, H, N, N, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    has_prev = prev_attn is not None
    prev = prev_attn.contiguous() if has_prev else attn  # dummy pointer when absent
    BM, BN, BD = _tiles(N, D)
    args = (q, k, v, prev, out, attn, lse, N, D, H, float(scale),
            *bhn_strides(q), *bhn_strides(k), *bhn_strides(v), *bhn_strides(out))
    if use_tuned(_sb_fwd_tuned, q):
        _sb_fwd_tuned[lambda META: (B * H, triton.cdiv(N, META["BM"]))](
            *args, HAS_PREV=has_prev, DOT_T=_dot_dtype(q.dtype), BD=BD, enable_fp_fusion=False)
    else:
        _sb_fwd[(B * H, triton.cdiv(N, BM))](*args, HAS_PREV=has_prev, DOT_T=_dot_dtype(q.dtype), BM=BM, BN=BN,
                                             BD=BD, num_warps=num_warps_for(BM * BN), enable_fp_fusion=False)
    return out, attn, lse


BF16_DS_DTYPES = (torch.bfloat16,)  # inputs whose backward may take bf16 dots (the tests add fp16)


def ds_precision(q) -> str:
    """REFINER_TRITON_SOFTMAX_BWD_DOT, the backward's dq = dS k and dk = dS^T q dots: "ieee" (default:
    fp32 dS and operands, multiply-adds on CUDA cores) or, for bf16 inputs, "bf16" (dS and the
    other operand rounded to nearest bf16, fp32 accumulation on the tensor cores: the precision of
    the reference's own backward under bf16 autocast; fp16 inputs keep IEEE, their own 10 bits
    being finer than bf16's 8; a candidate not yet timed on a GPU). ptxas sm_90, bf16, head size 32,
    8 warps, per step of the loops: dq 1,379 -> 705 instructions and dk/dv 1,854 -> 993 (its 364
    bytes of spills gone) at 64 x 64 tiles; dk/dv 779 -> 409 at 32 x 64.
    The default applies unless the variable is set or a value is tuned for the GPU model (settings.py)."""
    if q.dtype in BF16_DS_DTYPES and switch("REFINER_TRITON_SOFTMAX_BWD_DOT", q.device) == "bf16":
        return "bf16"
    return "ieee"


def softmax_block_bwd(dout, dattn, q, k, v, prev_attn, lse, scale: float):
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dout, dattn = dout.contiguous(), dattn.contiguous()
    B, H, N, D = q.shape
    has_prev = prev_attn is not None
    prev = prev_attn.contiguous() if has_prev else dattn
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dprev = torch.empty(B, H, N, N, dtype=prev_attn.dtype, device=q.device) if has_prev else None
    delta = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    BM, BN, BD = _tiles(N, D)
    nw = num_warps_for(BM * BN)
    dq_args = (q, k, v, lse, dout, dattn, dq, dprev if has_prev else dq, delta, N, D, float(scale))
    # dk/dv: programs own key tiles of BN rows and loop over query tiles of BM rows.
    dkdv_args = (q, k, v, prev, lse, delta, dout, dattn, dk, dv, N, D, float(scale))
    consts = dict(HAS_PREV=has_prev, DOT_T=_dot_dtype(q.dtype), BD=BD, DS_PREC=ds_precision(q),
                  enable_fp_fusion=False)
    if use_tuned(_sb_bwd_dq_tuned, q):
        _sb_bwd_dq_tuned[lambda META: (B * H, triton.cdiv(N, META["BM"]))](*dq_args, **consts)
        _sb_bwd_dkdv_tuned[lambda META: (B * H, triton.cdiv(N, META["BN"]))](*dkdv_args, **consts)
    else:
        _sb_bwd_dq[(B * H, triton.cdiv(N, BM))](*dq_args, BM=BM, BN=BN, num_warps=nw, **consts)
        _sb_bwd_dkdv[(B * H, triton.cdiv(N, BM))](*dkdv_args, BM=BN, BN=BM, num_warps=nw, **consts)
    return dq, dk, dv, dprev
