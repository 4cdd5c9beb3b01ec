"""Triton kernel of LLaMA's rotary embedding on queries and keys in [B, S, heads, head_dim] layout.

One program per token rotates all query and key heads of that token with its cos/sin row, in float32 on
the stored values, and writes both results once: transformers' ``apply_rotary_pos_emb`` makes about five
elementwise passes per tensor (products, the negated half, the concatenation, the sum) over strided views.
The backward is the same rotation with the sine halves swapped and negated (the transposed rotation), so
one kernel serves both directions.
"""

from __future__ import annotations

import torch

from .moe.swiglu_lora_kernels import available, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, seq, stride_cb, stride_cs,
                       HQ: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr, BLOCK_HQ: tl.constexpr,
                       BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, TRANSPOSE: tl.constexpr):
        row = tl.program_id(0)
        b = row // seq
        s = row % seq
        d = tl.arange(0, BLOCK_HALF)
        dm = d < HALF
        rot = cos_ptr + b * stride_cb + s * stride_cs
        c1 = tl.load(rot + d, mask=dm, other=0.0).to(tl.float32)
        c2 = tl.load(rot + HALF + d, mask=dm, other=0.0).to(tl.float32)
        rot = sin_ptr + b * stride_cb + s * stride_cs
        if TRANSPOSE:
            s1 = -tl.load(rot + HALF + d, mask=dm, other=0.0).to(tl.float32)
            s2 = -tl.load(rot + d, mask=dm, other=0.0).to(tl.float32)
        else:
            s1 = tl.load(rot + d, mask=dm, other=0.0).to(tl.float32)
            s2 = tl.load(rot + HALF + d, mask=dm, other=0.0).to(tl.float32)
        _rotate_heads(q_ptr, q_out_ptr, row, c1, c2, s1, s2, d, dm, HQ, HALF, BLOCK_HQ)
        _rotate_heads(k_ptr, k_out_ptr, row, c1, c2, s1, s2, d, dm, HK, HALF, BLOCK_HK)

    @triton.jit
    def _rotate_heads(src_ptr, dst_ptr, row, c1, c2, s1, s2, d, dm, HEADS: tl.constexpr, HALF: tl.constexpr,
                      BLOCK_H: tl.constexpr):
        h = tl.arange(0, BLOCK_H)
        offs = row.to(tl.int64) * (HEADS * 2 * HALF) + h[:, None] * (2 * HALF) + d[None, :]
        m = (h[:, None] < HEADS) & dm[None, :]
        x1 = tl.load(src_ptr + offs, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src_ptr + offs + HALF, mask=m, other=0.0).to(tl.float32)
        out_ty = dst_ptr.dtype.element_ty
        tl.store(dst_ptr + offs, (x1 * c1[None, :] - x2 * s1[None, :]).to(out_ty), mask=m)
        tl.store(dst_ptr + offs + HALF, (x2 * c2[None, :] + x1 * s2[None, :]).to(out_ty), mask=m)


def usable(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether the kernel can rotate these tensors (Triton on their device, even head dim, cos per token)."""
    return (available(q) and q.dtype == k.dtype and q.shape[-1] % 2 == 0 and q.shape[-1] == k.shape[-1]
            and cos.dim() == 3 and cos.shape[1] == q.shape[1] and cos.shape[0] in (1, q.shape[0]))


def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, S, Hq, D] and k [B, S, Hk, D] rotated by cos/sin [B or 1, S, D] (``transpose``: by the inverse
    rotation, which is the backward); new contiguous tensors in q's dtype."""
    q, k = q.contiguous(), k.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    batch, seq, hq, dim = q.shape
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if q.numel():
        half = dim // 2
        stride_cb = 0 if cos.shape[0] == 1 else cos.stride(0)
        _rotary_kernel[(batch * seq,)](
            q, k, cos, sin, q_out, k_out, seq, stride_cb, cos.stride(1), HQ=hq, HK=k.shape[2], HALF=half,
            BLOCK_HQ=triton.next_power_of_2(hq), BLOCK_HK=triton.next_power_of_2(k.shape[2]),
            BLOCK_HALF=triton.next_power_of_2(half), TRANSPOSE=transpose, num_warps=4,
        )
    return q_out, k_out
