"""Float32 router logits without float32 copies of the hidden states.

The router must compute in float32 (a low-precision router flips near-tied expert choices), but casting
[T, H] bf16 hidden states to float32 costs a copy twice their size in forward and another in backward.
Products of two bf16 (or fp16) numbers are exact in float32, so on CUDA one Triton kernel reads the
half-precision hidden states once and accumulates the E-wide logits in float32 (torch's mm with a float32
output dtype computes the same but costs hundreds of microseconds of host time per call). Backward splits
the float32 logit gradient into two half-precision terms (hi + lo, about 16 mantissa bits), so plain
half-precision GEMMs give the input and weight gradients at nearly float32 accuracy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .swiglu_lora_kernels import _precision, available, triton

HALF = (torch.bfloat16, torch.float16)
BLOCK_T, BLOCK_K = 64, 128

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _logits_kernel(x_ptr, w_ptr, out_ptr, n_rows, n_experts, hidden: tl.constexpr, PREC: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < n_rows
        rows64 = rows.to(tl.int64)
        ek = tl.arange(0, BLOCK_E)
        e_ok = ek < n_experts
        acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < hidden
            xt = tl.load(x_ptr + rows64[:, None] * hidden + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                         other=0.0)
            wt = tl.load(w_ptr + ek[None, :] * hidden + ks[:, None], mask=k_ok[:, None] & e_ok[None, :], other=0.0)
            acc += tl.dot(xt, wt, input_precision=PREC)
        tl.store(out_ptr + rows64[:, None] * n_experts + ek[None, :], acc, mask=row_ok[:, None] & e_ok[None, :])


def logits_f32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, H] @ weight [E, H]^T accumulated and returned in float32 (one read of x where Triton runs)."""
    if not available(x):
        return x.float() @ weight.float().t()
    x, weight = x.contiguous(), weight.contiguous()
    rows, hidden = x.shape
    out = x.new_empty(rows, weight.shape[0], dtype=torch.float32)
    _logits_kernel[(triton.cdiv(rows, BLOCK_T),)](
        x, weight, out, rows, weight.shape[0], hidden=hidden, PREC=_precision(x.dtype),
        BLOCK_T=BLOCK_T, BLOCK_E=max(16, triton.next_power_of_2(weight.shape[0])), BLOCK_K=BLOCK_K)
    return out


def _split(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 g [T, E] -> [T, 2E] half-precision (hi, lo) with hi + lo = g to about 16 mantissa bits."""
    hi = g.to(dtype)
    return torch.cat([hi, (g - hi.float()).to(dtype)], dim=1)


class HalfInputLogits(torch.autograd.Function):
    """x [T, H] @ weight [E, H]^T in float32 for half-precision x and weight of one dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return logits_f32(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        parts = _split(grad.float(), x.dtype)  # [T, 2E]
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = parts @ torch.cat([weight, weight])  # [T, H], fp32 accumulation inside the GEMM
        if ctx.needs_input_grad[1]:
            both = (parts.t() @ x).float()  # [2E, H]
            grad_w = (both[: weight.shape[0]] + both[weight.shape[0] :]).to(weight.dtype)
        return grad_x, grad_w


def float32_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Router logits x [T, H] @ weight [E, H]^T in float32, also under autocast: the half-precision kernel for
    CUDA half-precision inputs of one dtype, else float32 copies."""
    with torch.autocast(x.device.type, enabled=False):
        if x.is_cuda and x.dtype in HALF and weight.dtype == x.dtype and available(x):
            return HalfInputLogits.apply(x, weight)
        return F.linear(x.float(), weight.float())
