"""Token-slots sorted by expert in two Triton launches (a counting sort), instead of a radix sort and about ten
small torch ops: the grouping sits between the router and the first expert GEMM, where every launch's host
time is time the GPU waits.

``_count_kernel``: per block of slots, how many chose each expert. ``_place_kernel``: each block adds the counts
of all blocks before it and of the experts before each slot's, plus the slot's rank among the block's slots of
its expert, giving its sorted row, so the order is exactly a stable sort's. Results equal ``group_slots``'s
torch path (segments.py), which the CPU and the tests use.
"""

from __future__ import annotations

import os
import warnings

import torch

from .swiglu_lora_kernels import _INTERPRET, triton

MAX_EXPERTS = 256
_ENABLED = [os.environ.get("UNI_MOE_TRITON", "1") != "0"]

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _count_kernel(ids_ptr, block_counts_ptr, n, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
        b = tl.program_id(0)
        s = b * BLOCK + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + s, mask=s < n, other=-1)
        ek = tl.arange(0, BLOCK_E)
        hot = (ids[:, None] == ek[None, :]).to(tl.int32)
        tl.store(block_counts_ptr + b * BLOCK_E + ek, tl.sum(hot, 0))

    @triton.jit
    def _place_kernel(ids_ptr, block_counts_ptr, order_ptr, inverse_ptr, expert_ptr, token_ptr, counts_ptr, offs_ptr,
                      n, n_experts, n_blocks, K: tl.constexpr, BLOCKS_P2: tl.constexpr, BLOCK: tl.constexpr,
                      BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr):
        b = tl.program_id(0)
        ek = tl.arange(0, BLOCK_E)
        total = tl.zeros((BLOCK_E,), dtype=tl.int32)
        before = tl.zeros((BLOCK_E,), dtype=tl.int32)
        for i0 in range(0, BLOCKS_P2, BLOCK_B):  # BLOCK_B blocks' counts per step; a power of two bounds the loop
            bi = i0 + tl.arange(0, BLOCK_B)
            c = tl.load(block_counts_ptr + bi[:, None] * BLOCK_E + ek[None, :], mask=(bi < n_blocks)[:, None], other=0)
            total += tl.sum(c, 0)
            before += tl.sum(tl.where((bi < b)[:, None], c, 0), 0)
        ends = tl.cumsum(total, 0)
        base = ends - total + before  # first sorted row of this block's slots of each expert
        s = b * BLOCK + tl.arange(0, BLOCK)
        ok = s < n
        ids = tl.load(ids_ptr + s, mask=ok, other=-1)
        hot = (ids[:, None] == ek[None, :]).to(tl.int32)
        rank = tl.cumsum(hot, 0) - hot  # earlier slots of the same expert within the block
        pos = tl.sum(hot * (base[None, :] + rank), 1).to(tl.int64)
        s64 = s.to(tl.int64)
        tl.store(inverse_ptr + s64, pos, mask=ok)
        tl.store(order_ptr + pos, s64, mask=ok)
        tl.store(expert_ptr + pos, ids, mask=ok)
        tl.store(token_ptr + pos, s64 // K, mask=ok)
        if b == 0:
            e_ok = ek < n_experts
            tl.store(counts_ptr + ek, total.to(tl.int64), mask=e_ok)
            tl.store(offs_ptr + ek, ends, mask=e_ok)


def usable(indices: torch.Tensor, num_experts: int) -> bool:
    """Whether the kernels group these choices: CUDA (or the interpreter), some slots, at most MAX_EXPERTS."""
    return (triton is not None and _ENABLED[0] and (indices.is_cuda or _INTERPRET) and indices.numel() > 0
            and num_experts <= MAX_EXPERTS)


def group(indices: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, ...] | None:
    """(order, inverse, token, expert, counts, offs) as ``group_slots`` defines them, or None if the kernels
    failed to build here (then they stay off and the torch path runs)."""
    flat = indices.reshape(-1).contiguous()
    n = flat.numel()
    block_e = max(16, triton.next_power_of_2(num_experts))
    block = max(16, 4096 // block_e)
    n_blocks = triton.cdiv(n, block)
    block_counts = flat.new_empty(n_blocks, block_e, dtype=torch.int32)
    order, inverse, expert, token = (torch.empty_like(flat) for _ in range(4))
    counts = flat.new_empty(num_experts)
    offs = flat.new_empty(num_experts, dtype=torch.int32)
    try:
        _count_kernel[(n_blocks,)](flat, block_counts, n, BLOCK=block, BLOCK_E=block_e)
        _place_kernel[(n_blocks,)](flat, block_counts, order, inverse, expert, token, counts, offs, n, num_experts,
                                   n_blocks, K=indices.shape[-1], BLOCKS_P2=triton.next_power_of_2(n_blocks),
                                   BLOCK=block, BLOCK_E=block_e,
                                   BLOCK_B=max(1, 1024 // block_e))
    except Exception as err:  # a Triton build failure must not stop training: the torch path runs instead
        warnings.warn(f"group_kernels: Triton grouping failed ({err!r}); using torch ops")
        _ENABLED[0] = False
        return None
    return order, inverse, token, expert, counts, offs
