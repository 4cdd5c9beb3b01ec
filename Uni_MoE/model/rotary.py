"""LLaMA's rotary embedding of queries and keys in the projections' own [B, S, heads, head_dim] layout.

On CUDA one Triton kernel (``rotary_kernel``) rotates both tensors each way. Elsewhere the rotation is
transformers' formula (``x cos + rotate_half(x) sin``), elementwise as in ``apply_rotary_pos_emb``, so CPU
results are transformers' to the bit. cos/sin are [B or 1, S, head_dim] as LLaMA's rotary module returns
them; they take no gradient.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import rotate_half

from . import rotary_kernel


def _rotary_torch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class _FusedRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(cos, sin)
        return rotary_kernel.rotate(q, k, cos, sin)

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor, grad_k: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        cos, sin = ctx.saved_tensors
        dq, dk = rotary_kernel.rotate(grad_q, grad_k, cos, sin, transpose=True)
        return dq, dk, None, None


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, S, Hq, D] and k [B, S, Hk, D] rotated by cos/sin [B or 1, S, D]; same layout out."""
    if rotary_kernel.usable(q, k, cos) and not (cos.requires_grad or sin.requires_grad):
        return _FusedRotary.apply(q, k, cos, sin)
    return _rotary_torch(q, k, cos, sin)
