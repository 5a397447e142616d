"""Building blocks: head_mix (1x1 conv over heads), attn_dwconv (k x k depthwise stencil),
row_softmax, attn_value (batched matmul), each forward and backward in Triton.

Layout conventions: maps are (B, C, N, M) contiguous; a tile is (channels, positions) with the
positions of a TM x TJ patch of the map flattened, so channel mixing is one tl.dot.
"""
from __future__ import annotations

import torch

from ._common import check_inputs, gpu_autotune, interpreting, next_pow2, num_warps_for, triton, tl, use_tuned


if triton is not None:

    @triton.jit
    def _bmm_kernel(a_ptr, b_ptr, c_ptr, M, NN, K, Z2,
                    sab, sab2, sam, sak, sbb, sbb2, sbk, sbn, scb, scb2, scm, scn,
                    DOT_T: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """c[z] = a[z] @ b[z] for arbitrary strides (transposes are free) over two batch dims
        (z = z1 * Z2 + z2; strides s*b, s*b2), so (B, H, ., .) views need no copy; fp32
        accumulation, operands in DOT_T (the common half type of a and b: exact, tensor cores;
        else fp32)."""
        z = tl.program_id(0).to(tl.int64)
        z1 = z // Z2
        z2 = z % Z2
        pid_m = tl.program_id(1)
        pid_n = tl.program_id(2)
        offs_m = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        offs_n = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
        mm = offs_m < M
        mn = offs_n < NN
        a_ptr += z1 * sab + z2 * sab2
        b_ptr += z1 * sbb + z2 * sbb2
        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, K, BK):
            offs_k = (k0 + tl.arange(0, BK)).to(tl.int64)
            mk = offs_k < K
            a = tl.load(a_ptr + offs_m[:, None] * sam + offs_k[None, :] * sak,
                        mask=mm[:, None] & mk[None, :], other=0.0).to(DOT_T)
            b = tl.load(b_ptr + offs_k[:, None] * sbk + offs_n[None, :] * sbn,
                        mask=mk[:, None] & mn[None, :], other=0.0).to(DOT_T)
            acc += tl.dot(a, b, input_precision="ieee")
        tl.store(c_ptr + z1 * scb + z2 * scb2 + offs_m[:, None] * scm + offs_n[None, :] * scn,
                 acc.to(c_ptr.dtype.element_ty), mask=mm[:, None] & mn[None, :])


if triton is not None:
    _bmm_tuned = gpu_autotune(
        [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
         for bm, bn, bk, w, s in [(64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3),
                                  (128, 128, 32, 8, 3), (32, 64, 32, 4, 2)]],
        key=["M", "NN", "K"])(_bmm_kernel)
else:
    _bmm_tuned = None


def _batched(t: torch.Tensor) -> torch.Tensor:
    """t as (Z1, Z2, rows, cols): a view for 4-D tensors (any strides) and 3-D; else reshaped."""
    if t.ndim == 4:
        return t
    if t.ndim == 3:
        return t.unsqueeze(1)
    return t.reshape(-1, 1, *t.shape[-2:])


def bmm(a: torch.Tensor, b: torch.Tensor, out_dtype=None, out=None) -> torch.Tensor:
    """Batched a @ b over leading dims (any strides: (B, H, ., .) views and transposes are read in
    place). out: a preallocated result of any strides (e.g. token-major), else a new contiguous one."""
    check_inputs(a, b)
    lead = a.shape[:-2]
    M, K = a.shape[-2:]
    NN = b.shape[-1]
    if out is None:
        out = torch.empty(*lead, M, NN, dtype=out_dtype or a.dtype, device=a.device)
    a4, b4, c4 = _batched(a), _batched(b), _batched(out)
    if c4.data_ptr() != out.data_ptr():  # reshaped by a copy: the results would not land in out
        raise ValueError("out: expected a tensor whose leading dims can be viewed as (Z1, Z2)")
    Z1, Z2 = a4.shape[:2]
    if interpreting():
        BM, BN, BK = max(16, min(64, next_pow2(M))), max(16, min(64, next_pow2(NN))), max(16, min(256, next_pow2(K)))
    else:
        BM, BN, BK = 64, 64, 32
    args = (a4, b4, c4, M, NN, K, Z2, a4.stride(0), a4.stride(1), a4.stride(2), a4.stride(3),
            b4.stride(0), b4.stride(1), b4.stride(2), b4.stride(3), c4.stride(0), c4.stride(1), c4.stride(2),
            c4.stride(3))
    dot_t = tl.float32
    if a.dtype == b.dtype == torch.float16:
        dot_t = tl.float16
    elif a.dtype == b.dtype == torch.bfloat16 and not interpreting():
        dot_t = tl.bfloat16
    if use_tuned(_bmm_tuned, a):
        _bmm_tuned[lambda META: (Z1 * Z2, triton.cdiv(M, META["BM"]), triton.cdiv(NN, META["BN"]))](*args, DOT_T=dot_t)
    else:
        _bmm_kernel[(Z1 * Z2, triton.cdiv(M, BM), triton.cdiv(NN, BN))](*args, DOT_T=dot_t, BM=BM, BN=BN, BK=BK,
                                                                       num_warps=num_warps_for(BM * BN))
    return out


if triton is not None:

    @triton.jit
    def _row_softmax_fwd(x_ptr, y_ptr, R, M, BR: tl.constexpr, BM: tl.constexpr):
        rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
        cols = tl.arange(0, BM)
        msk = (rows < R)[:, None] & (cols < M)[None, :]
        x = tl.load(x_ptr + rows[:, None] * M + cols[None, :], mask=msk, other=float("-inf")).to(tl.float32)
        mx = tl.max(x, axis=1)
        mx = tl.where(rows < R, mx, 0.0)
        e = tl.where(msk, tl.exp(x - mx[:, None]), 0.0)
        den = tl.sum(e, axis=1)
        den = tl.where(rows < R, den, 1.0)
        tl.store(y_ptr + rows[:, None] * M + cols[None, :], (e / den[:, None]).to(y_ptr.dtype.element_ty), mask=msk)

    @triton.jit
    def _row_softmax_bwd(y_ptr, dy_ptr, dx_ptr, R, M, BR: tl.constexpr, BM: tl.constexpr):
        rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
        cols = tl.arange(0, BM)
        msk = (rows < R)[:, None] & (cols < M)[None, :]
        y = tl.load(y_ptr + rows[:, None] * M + cols[None, :], mask=msk, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * M + cols[None, :], mask=msk, other=0.0).to(tl.float32)
        dot = tl.sum(y * dy, axis=1)
        tl.store(dx_ptr + rows[:, None] * M + cols[None, :], (y * (dy - dot[:, None])).to(dx_ptr.dtype.element_ty),
                 mask=msk)

    @triton.jit
    def _dwconv_fwd(x_ptr, w_ptr, y_ptr, C, N, M, KS: tl.constexpr, TM: tl.constexpr, TJ: tl.constexpr):
        """y[bc] = k x k depthwise stencil of x[bc] with zero padding; one program per (row tile, bc)."""
        PAD: tl.constexpr = KS // 2
        pid_i = tl.program_id(1)
        bc = tl.program_id(0).to(tl.int64)
        c = bc % C
        rows = pid_i * TM + tl.arange(0, TM)
        base = bc * N * M
        for j0 in range(0, M, TJ):
            cols = j0 + tl.arange(0, TJ)
            acc = tl.zeros((TM, TJ), tl.float32)
            for o in range(0, KS * KS):
                r2 = rows + (o // KS - PAD)
                c2 = cols + (o % KS - PAD)
                ok = ((r2 >= 0) & (r2 < N))[:, None] & ((c2 >= 0) & (c2 < M))[None, :]
                xs = tl.load(x_ptr + base + r2[:, None] * M + c2[None, :], mask=ok, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + c * KS * KS + o).to(tl.float32)
                acc += w * xs
            tl.store(y_ptr + base + rows[:, None] * M + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=(rows < N)[:, None] & (cols < M)[None, :])

    @triton.jit
    def _dwconv_dw(x_ptr, dy_ptr, pw_ptr, N, M, KS: tl.constexpr, KKP: tl.constexpr,
                   TM: tl.constexpr, TJ: tl.constexpr):
        """Partial dw[bc, o] = sum over a row tile of dy[p] * x[p + s_o]; summed over b afterwards."""
        PAD: tl.constexpr = KS // 2
        pid_i = tl.program_id(1)
        bc = tl.program_id(0).to(tl.int64)
        rows = pid_i * TM + tl.arange(0, TM)
        base = bc * N * M
        ko = tl.arange(0, KKP)
        part = tl.zeros((KKP,), tl.float32)
        for j0 in range(0, M, TJ):
            cols = j0 + tl.arange(0, TJ)
            dy = tl.load(dy_ptr + base + rows[:, None] * M + cols[None, :],
                         mask=(rows < N)[:, None] & (cols < M)[None, :], other=0.0).to(tl.float32)
            for o in range(0, KS * KS):
                r2 = rows + (o // KS - PAD)
                c2 = cols + (o % KS - PAD)
                ok = ((r2 >= 0) & (r2 < N))[:, None] & ((c2 >= 0) & (c2 < M))[None, :]
                xs = tl.load(x_ptr + base + r2[:, None] * M + c2[None, :], mask=ok, other=0.0).to(tl.float32)
                part += tl.where(ko == o, tl.sum(tl.sum(dy * xs, axis=1), axis=0), 0.0)
        tl.store(pw_ptr + (bc * tl.num_programs(1) + pid_i) * KKP + ko, part)


def head_mix_fwd(x, w):
    check_inputs(x, w)
    B, C, N, M = x.shape
    C2 = w.shape[0]
    y = bmm(w.expand(B, C2, C), x.reshape(B, C, N * M), out_dtype=x.dtype)
    return y.reshape(B, C2, N, M)


def head_mix_bwd(dy, x, w):
    B, C, N, M = x.shape
    C2 = w.shape[0]
    dy3 = dy.reshape(B, C2, N * M)
    dx = bmm(w.t().expand(B, C, C2), dy3, out_dtype=x.dtype).reshape(B, C, N, M)
    dw = bmm(dy3, x.reshape(B, C, N * M).transpose(1, 2), out_dtype=torch.float32).sum(0).to(w.dtype)
    return dx, dw


def attn_value_fwd(a, v):
    check_inputs(a, v)
    return bmm(a, v, out_dtype=torch.result_type(a, v))


def attn_value_bwd(dout, a, v):
    da = bmm(dout, v.transpose(-1, -2), out_dtype=a.dtype)
    dv = bmm(a.transpose(-1, -2), dout, out_dtype=v.dtype)
    return da, dv


def _rows_cfg(M):
    BM = max(16, next_pow2(M))
    BR = max(1, min(64, 4096 // BM)) if not interpreting() else max(1, min(256, 16384 // BM))
    return BR, BM


def row_softmax_fwd(x):
    check_inputs(x)
    x = x.contiguous()
    M = x.shape[-1]
    R = x.numel() // max(M, 1)
    y = torch.empty_like(x)
    BR, BM = _rows_cfg(M)
    _row_softmax_fwd[(triton.cdiv(R, BR),)](x, y, R, M, BR=BR, BM=BM, num_warps=num_warps_for(BR * BM))
    return y


def row_softmax_bwd(dy, y):
    y, dy = y.contiguous(), dy.contiguous()
    M = y.shape[-1]
    R = y.numel() // max(M, 1)
    dx = torch.empty_like(y)
    BR, BM = _rows_cfg(M)
    _row_softmax_bwd[(triton.cdiv(R, BR),)](y, dy, dx, R, M, BR=BR, BM=BM, num_warps=num_warps_for(BR * BM))
    return dx


def _dw_tiles(N, M):
    if interpreting():
        return max(16, next_pow2(N)), max(16, next_pow2(M))
    return 16, 64


def attn_dwconv_fwd(x, w):
    check_inputs(x, w)
    x, w = x.contiguous(), w.contiguous()
    B, C, N, M = x.shape
    KS = w.shape[-1]
    y = torch.empty_like(x)
    TM, TJ = _dw_tiles(N, M)
    _dwconv_fwd[(B * C, triton.cdiv(N, TM))](x, w, y, C, N, M, KS=KS, TM=TM, TJ=TJ,
                                             num_warps=num_warps_for(TM * TJ))
    return y


def attn_dwconv_bwd(dy, x, w):
    x, w, dy = x.contiguous(), w.contiguous(), dy.contiguous()
    B, C, N, M = x.shape
    KS = w.shape[-1]
    # dx[p] = sum_o w[o] dy[p - s_o]: the same stencil with the kernel flipped
    dx = attn_dwconv_fwd(dy, w.flip(-1, -2).contiguous()).to(x.dtype)
    TM, TJ = _dw_tiles(N, M)
    nti = triton.cdiv(N, TM)
    KKP = next_pow2(KS * KS)
    part = torch.empty(B * C * nti, KKP, dtype=torch.float32, device=x.device)
    _dwconv_dw[(B * C, nti)](x, dy, part, N, M, KS=KS, KKP=KKP, TM=TM, TJ=TJ,
                             num_warps=num_warps_for(TM * TJ))
    dw = part.reshape(B, C, nti, KKP).sum((0, 2))[:, :KS * KS].reshape(C, KS, KS).to(w.dtype)
    return dx, dw
