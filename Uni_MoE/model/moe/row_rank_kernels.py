"""Triton kernel for the gate and up LoRA input gradients over token-slots sorted by expert.

Each sorted slot row s of d gate and d up [S, I] times its expert's LoRA-B, [I, r], gives that slot's
r-wide gradients: a product whose depth is I and whose width is r. A grouped GEMM walks the whole depth of a
128-row tile in one program, so a step has only S / 128 programs, each streaming its rows alone. Here each
program owns BLOCK_M rows of one expert and one of ``SPLIT`` chunks of the depth, for both factors at once,
and writes its fp32 partial sums straight to the slots' places in token order ([T, k, 2, r], the layout the
caller wants); the chunks' sums are then added in a fixed order, so results do not depend on scheduling.
"""

from __future__ import annotations

import torch

from .segments import SlotGrouping, segment_mm
from .swiglu_lora_kernels import BLOCK_M, _block_r, _precision, available, tile_schedule, triton

MAX_RANK = 128  # the two [BLOCK_M, r] fp32 sums stay on registers up to this rank
TARGET_PROGRAMS = 1024  # row tiles times depth chunks; more chunks only add partial sums to write and add

if triton is not None:
    import triton.language as tl

    from .swiglu_lora_kernels import configs, scheduled_tile

    # (BLOCK_N, warps, stages)
    _CONFIGS = configs(((128, 4, 3), (64, 4, 4), (128, 8, 3), (256, 8, 3)), single=(64, 4, 1))

    def _prune(configs: list, named_args: dict, **kwargs: object) -> list:
        """float32 (checks only) runs the single-stage configs, whose tiles fit in shared memory."""
        if named_args["d0_ptr"].dtype == torch.float32:
            return [c for c in configs if c.num_stages == 1] or configs[-1:]
        return configs

    @triton.autotune(configs=_CONFIGS, key=["n_cols", "rank", "SPLIT"], prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _row_rank_kernel(d0_ptr, d1_ptr, f0_ptr, f1_ptr, out_ptr, order_ptr, sched_ptr, n_tiles, n_slots, scale,
                         n_cols: tl.constexpr, rank: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
        """out[part, order[s], i] = scale * d_i[s, chunk] @ f_i[e(s), :, chunk]^T for i = 0, 1."""
        e, start, end = scheduled_tile(sched_ptr, n_tiles)
        part = tl.program_id(1)
        if start >= end:
            return
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        rows64 = rows.to(tl.int64)
        rk = tl.arange(0, BLOCK_R)
        r_ok = rk < rank
        acc0 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        chunk: tl.constexpr = (n_cols + SPLIT * BLOCK_N - 1) // (SPLIT * BLOCK_N) * BLOCK_N
        f_base = e * rank * n_cols
        for c in range(0, chunk, BLOCK_N):
            cols = part * chunk + c + tl.arange(0, BLOCK_N)
            col_ok = cols < n_cols
            d_off = rows64[:, None] * n_cols + cols[None, :]
            d_mask = row_ok[:, None] & col_ok[None, :]
            f_off = f_base + rk[:, None] * n_cols + cols[None, :]
            f_mask = r_ok[:, None] & col_ok[None, :]
            d0 = tl.load(d0_ptr + d_off, mask=d_mask, other=0.0)
            f0 = tl.load(f0_ptr + f_off, mask=f_mask, other=0.0)
            acc0 = tl.dot(d0, tl.trans(f0), acc0, input_precision=PREC)
            d1 = tl.load(d1_ptr + d_off, mask=d_mask, other=0.0)
            f1 = tl.load(f1_ptr + f_off, mask=f_mask, other=0.0)
            acc1 = tl.dot(d1, tl.trans(f1), acc1, input_precision=PREC)
        slot = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        dst = out_ptr + part.to(tl.int64) * n_slots * 2 * rank + slot[:, None] * (2 * rank) + rk[None, :]
        mask = row_ok[:, None] & r_ok[None, :]
        tl.store(dst, acc0 * scale, mask=mask)
        tl.store(dst + rank, acc1 * scale, mask=mask)


def usable(rows: torch.Tensor, rank: int) -> bool:
    """Whether the kernel runs on these rows: Triton on their device, r up to MAX_RANK, some rows."""
    return available(rows) and 0 < rank <= MAX_RANK and rows.shape[0] > 0


def _split(n_tiles: int, n_cols: int) -> int:
    """Depth chunks per row tile: a power of two, up to TARGET_PROGRAMS programs, 128 columns a chunk at least."""
    split = 1
    while split * n_tiles < TARGET_PROGRAMS and 2 * split * 128 <= n_cols:
        split *= 2
    return split


def lora_input_grads(d_gate: torch.Tensor, d_up: torch.Tensor, bg: torch.Tensor, bu: torch.Tensor,
                     g: SlotGrouping, scale: float, k: int) -> torch.Tensor:
    """[T, k, 2, r]: ``scale`` d gate_s Bg_e and d up_s Bu_e of each slot s, its expert e, from rows [S, I] sorted by
    expert; ``bg``, ``bu`` [E, r, I] (B transposed, as ``factor_layout.kernel_factors`` gives them). Triton where
    ``usable``, else two grouped GEMMs."""
    rows, n_cols = d_gate.shape
    rank = bg.shape[1]
    if not usable(d_gate, rank):
        out = torch.stack([segment_mm(d_gate, bg.transpose(1, 2), g), segment_mm(d_up, bu.transpose(1, 2), g)], 1)
        return out[g.inverse].view(-1, k, 2, rank) * scale
    sched = tile_schedule(g.counts, g.offs, rows)
    n_tiles = sched.shape[1]
    split = _split(n_tiles, n_cols)
    out = d_gate.new_empty(split, rows, 2, rank, dtype=torch.float32)
    _row_rank_kernel[(n_tiles, split)](
        d_gate.contiguous(), d_up.contiguous(), bg.contiguous(), bu.contiguous(), out, g.order, sched, n_tiles, rows,
        scale, n_cols=n_cols, rank=rank, SPLIT=split, PREC=_precision(d_gate.dtype), BLOCK_M=BLOCK_M,
        BLOCK_R=_block_r(rank),
    )
    return (out[0] if split == 1 else out.sum(0)).to(d_gate.dtype).view(-1, k, 2, rank)
