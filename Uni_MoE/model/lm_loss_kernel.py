"""Triton kernel of the LM loss: one pass over a chunk's logits rows gives each row's cross-entropy, a
second pass overwrites the row with its gradient (softmax - one-hot), in the logits' own dtype.

Math in float32 on the stored values (as transformers' loss upcasts the bf16 logits before its softmax),
without the float32 copy of the chunk and the five elementwise passes of the torch path: the chunk is read
twice and written once. Rows whose target is the ignore index get loss 0 and gradient 0.
"""

from __future__ import annotations

import torch

from .moe.swiglu_lora_kernels import available, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _xent_grad_kernel(logits_ptr, target_ptr, loss_ptr, stride_row, V: tl.constexpr, IGNORE: tl.constexpr,
                          BLOCK_V: tl.constexpr):
        row = tl.program_id(0)
        base = logits_ptr + row.to(tl.int64) * stride_row
        target = tl.load(target_ptr + row)
        m = tl.zeros([], dtype=tl.float32) - float("inf")
        s = tl.zeros([], dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
            new_m = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), axis=0)
            m = new_m
        lse = m + tl.log(s)
        valid = target != IGNORE
        t = tl.where(valid, target, 0)
        x_t = tl.load(base + t).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - x_t, 0.0))
        scale = tl.where(valid, 1.0, 0.0)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            ok = cols < V
            x = tl.load(base + cols, mask=ok, other=0.0).to(tl.float32)
            p = tl.exp(x - lse) - tl.where(cols == t, 1.0, 0.0)
            tl.store(base + cols, (p * scale).to(logits_ptr.dtype.element_ty), mask=ok)


BLOCK_V = 4096
ALIGN = 64  # head rows padded to a multiple of this: logits rows then start 16-byte aligned (fast GEMMs)


def usable(hidden: torch.Tensor) -> bool:
    """Whether the kernel path can run for these hidden states (Triton on their device, float32 maths)."""
    return available(hidden) and hidden.dtype in (torch.float32, torch.bfloat16, torch.float16)


def padded_head(weight: torch.Tensor) -> torch.Tensor:
    """The head [V, H] with zero rows up to a multiple of ALIGN: a vocabulary like 32004 otherwise gives
    logits rows of a misaligned stride, which takes cuBLAS off its fast kernels. The extra logits are 0."""
    extra = -weight.shape[0] % ALIGN
    return torch.cat([weight, weight.new_zeros(extra, weight.shape[1])]) if extra else weight


def xent_grad_(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, vocab: int) -> torch.Tensor:
    """Per-row cross-entropy [rows] (float32, 0 where ignored) over the first ``vocab`` columns of ``logits``
    [rows, >= vocab] (unit column stride); those columns are overwritten with d loss_sum / d logits.
    targets [rows] int64."""
    rows = logits.shape[0]
    assert logits.stride(1) == 1 and logits.shape[1] >= vocab
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _xent_grad_kernel[(rows,)](logits, targets, loss, logits.stride(0), vocab, IGNORE=ignore_index,
                                   BLOCK_V=min(BLOCK_V, triton.next_power_of_2(vocab)), num_warps=8)
    return loss
