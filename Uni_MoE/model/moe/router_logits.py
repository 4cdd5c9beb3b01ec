"""Float32 router logits without float32 copies of the hidden states.

The router must compute in float32 (a low-precision router flips near-tied expert choices), but casting
[T, H] bf16 hidden states to float32 costs a copy twice their size in forward and another in backward.
Products of two bf16 (or fp16) numbers are exact in float32, so on CUDA one half-precision GEMM with
float32 output (``torch.mm(..., out_dtype=float32)``) gives the float32 logits directly. Backward splits the
float32 logit gradient into two half-precision terms (hi + lo, about 16 mantissa bits) so the input and
weight gradients come from half-precision GEMMs with float32 accumulation at float32-like accuracy.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

HALF = (torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def _mm_out_dtype_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this torch build has a half-precision mm with float32 output on the device type (probed once)."""
    try:
        a = torch.ones(2, 2, device=device_type, dtype=dtype)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of half-precision matrices with float32 accumulation and output."""
    if _mm_out_dtype_works(a.device.type, a.dtype):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _split(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 g [T, E] -> [T, 2E] half-precision (hi, lo) with hi + lo = g to about 16 mantissa bits."""
    hi = g.to(dtype)
    return torch.cat([hi, (g - hi.float()).to(dtype)], dim=1)


class HalfInputLogits(torch.autograd.Function):
    """x [T, H] @ weight [E, H]^T in float32 for half-precision x and weight of one dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return mm_f32(x, weight.t())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        parts = _split(grad.float(), x.dtype)  # [T, 2E]
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (parts @ torch.cat([weight, weight])).to(x.dtype)  # [T, H], fp32 accumulation inside
        if ctx.needs_input_grad[1]:
            both = mm_f32(parts.t(), x)  # [2E, H]
            grad_w = (both[: weight.shape[0]] + both[weight.shape[0] :]).to(weight.dtype)
        return grad_x, grad_w


def float32_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Router logits x [T, H] @ weight [E, H]^T in float32, also under autocast: one half-precision GEMM with
    float32 output for CUDA half-precision inputs of one dtype, else float32 copies."""
    with torch.autocast(x.device.type, enabled=False):
        if x.is_cuda and x.dtype in HALF and weight.dtype == x.dtype and _mm_out_dtype_works("cuda", x.dtype):
            return HalfInputLogits.apply(x, weight)
        return F.linear(x.float(), weight.float())
