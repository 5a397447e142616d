"""Building blocks: head_mix (1x1 conv over heads), attn_dwconv (k x k depthwise stencil),
row_softmax, attn_value (batched matmul), each forward and backward in Triton.

Layout conventions: maps are (B, C, N, M) contiguous; a tile is (channels, positions) with the
positions of a TM x TJ patch of the map flattened, so channel mixing is one tl.dot.
"""
from __future__ import annotations

import torch

from ._common import check_device, interpreting, next_pow2, num_warps_for, triton, tl


if triton is not None:

    @triton.jit
    def _bmm_kernel(a_ptr, b_ptr, c_ptr, M, NN, K,
                    sab, sam, sak, sbb, sbk, sbn, scb, scm, scn,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """c[z] = a[z] @ b[z] for arbitrary strides (transposes are free); fp32 accumulation."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        z = tl.program_id(2).to(tl.int64)
        offs_m = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        offs_n = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
        mm = offs_m < M
        mn = offs_n < NN
        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, K, BK):
            offs_k = (k0 + tl.arange(0, BK)).to(tl.int64)
            mk = offs_k < K
            a = tl.load(a_ptr + z * sab + offs_m[:, None] * sam + offs_k[None, :] * sak,
                        mask=mm[:, None] & mk[None, :], other=0.0).to(tl.float32)
            b = tl.load(b_ptr + z * sbb + offs_k[:, None] * sbk + offs_n[None, :] * sbn,
                        mask=mk[:, None] & mn[None, :], other=0.0).to(tl.float32)
            acc += tl.dot(a, b, input_precision="ieee")
        tl.store(c_ptr + z * scb + offs_m[:, None] * scm + offs_n[None, :] * scn,
                 acc.to(c_ptr.dtype.element_ty), mask=mm[:, None] & mn[None, :])


def bmm(a: torch.Tensor, b: torch.Tensor, out_dtype=None) -> torch.Tensor:
    """Batched a @ b over leading dims (any strides in the last two dims)."""
    check_device(a, b)
    lead = a.shape[:-2]
    M, K = a.shape[-2:]
    NN = b.shape[-1]
    a3 = a.reshape(-1, M, K)
    b3 = b.reshape(-1, K, NN)
    Z = a3.shape[0]
    c = torch.empty(Z, M, NN, dtype=out_dtype or a.dtype, device=a.device)
    if interpreting():
        BM, BN, BK = max(16, min(64, next_pow2(M))), max(16, min(64, next_pow2(NN))), max(16, min(256, next_pow2(K)))
    else:
        BM, BN, BK = 64, 64, 32
    grid = (triton.cdiv(M, BM), triton.cdiv(NN, BN), Z)
    _bmm_kernel[grid](a3, b3, c, M, NN, K, a3.stride(0), a3.stride(1), a3.stride(2),
                      b3.stride(0), b3.stride(1), b3.stride(2), c.stride(0), c.stride(1), c.stride(2),
                      BM=BM, BN=BN, BK=BK, num_warps=num_warps_for(BM * BN))
    return c.reshape(*lead, M, NN)
