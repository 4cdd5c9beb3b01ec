"""Triton kernel for the r-wide LoRA weight gradients over token-slots sorted by expert.

Each LoRA factor's gradient is, per expert, a narrow [S_e, r] operand transposed times a wide [S_e, N] one,
summed over the expert's rows: d Ad = dzd^T dropout(h), and d Bg, d Bu the transposes of zg^T d gate and
zu^T d up. A grouped GEMM (``segments.segment_mm_tn``) gives the r side its 128- or 256-wide tile and
computes zeros for the rest of it; here each program owns one expert and BLOCK_N of the N columns, keeps the
[r, BLOCK_N] fp32 sum on registers while it walks that expert's rows, and writes it once, in either layout,
scaled. The wide operand is read exactly once, and that read bounds the kernel (3.2-4.3 TB/s on an H200 at
LLaMA-7B width, benchmarks/results/rank_grad_h200.md). The wide operand's rows can also be gathered as they are
loaded (``rows``: the token of each sorted slot), so d LoRA-A = dz^T x needs no [S, H] copy of the token rows.
"""

from __future__ import annotations

import torch

from .segments import SlotGrouping, segment_mm_tn
from .swiglu_lora_kernels import _INTERPRET, _block_r, _precision, available, triton

MAX_RANK = 128  # the [r, BLOCK_N] fp32 sum stays on registers up to this rank

if triton is not None:
    import triton.language as tl

    from .swiglu_lora_kernels import configs

    # (BLOCK_N, warps, stages, BLOCK_M rows a step)
    _CONFIGS = configs(((128, 4, 3, 64), (256, 8, 3, 64), (128, 4, 4, 32), (64, 4, 4, 64), (128, 8, 4, 64)),
                       single=(64, 4, 1, 32))

    def _prune(configs: list, named_args: dict, **kwargs: object) -> list:
        """float32 (checks only): the configs whose staged tiles fit in shared memory."""
        if named_args["d_ptr"].dtype == torch.float32 and len(configs) > 1:
            return [c for c in configs if c.num_stages * c.kwargs["BLOCK_M"] * (c.kwargs["BLOCK_N"] + 128) * 4
                    <= 160 * 1024] or configs[-1:]
        return configs

    @triton.jit
    def _step(acc, z_ptr, d_ptr, rows_ptr, row, end, rk, r_ok, cols, col_ok, rank: tl.constexpr,
              n_cols: tl.constexpr, GATHER: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr):
        rows = row + tl.arange(0, BLOCK_M)
        ok = rows < end
        rows64 = rows.to(tl.int64)
        z = tl.load(z_ptr + rows64[:, None] * rank + rk[None, :], mask=ok[:, None] & r_ok[None, :], other=0.0)
        src = rows64
        if GATHER:
            src = tl.load(rows_ptr + rows64, mask=ok, other=0).to(tl.int64)
        d = tl.load(d_ptr + src[:, None] * n_cols + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
        return tl.dot(tl.trans(z), d, acc, input_precision=PREC)

    @triton.autotune(configs=_CONFIGS, key=["n_cols", "rank", "TRANSPOSE", "GATHER"],
                     prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _rank_grad_kernel(z_ptr, d_ptr, rows_ptr, out_ptr, offs_ptr, counts_ptr, scale, n_cols: tl.constexpr,
                          rank: tl.constexpr, TRANSPOSE: tl.constexpr, GATHER: tl.constexpr, PREC: tl.constexpr,
                          INTERPRET: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_M: tl.constexpr):
        """out[e] = scale * z[rows of e]^T d[rows of e] as [r, N], or its transpose [N, r] with TRANSPOSE; with
        GATHER, row i of d is d[rows[i]]."""
        e = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        end = tl.load(offs_ptr + e).to(tl.int32)
        start = end - tl.load(counts_ptr + e).to(tl.int32)
        rk = tl.arange(0, BLOCK_R)
        r_ok = rk < rank
        acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        if INTERPRET:  # the interpreter's scalars are 1-element arrays, which range() refuses
            row = start
            while row < end:
                acc = _step(acc, z_ptr, d_ptr, rows_ptr, row, end, rk, r_ok, cols, col_ok, rank, n_cols, GATHER, PREC,
                            BLOCK_M)
                row += BLOCK_M
        else:
            for row in range(start, end, BLOCK_M):
                acc = _step(acc, z_ptr, d_ptr, rows_ptr, row, end, rk, r_ok, cols, col_ok, rank, n_cols, GATHER, PREC,
                            BLOCK_M)
        acc = (acc * scale).to(out_ptr.dtype.element_ty)
        base = out_ptr + e.to(tl.int64) * rank * n_cols
        mask = r_ok[:, None] & col_ok[None, :]
        if TRANSPOSE:
            tl.store(base + cols[None, :] * rank + rk[:, None], acc, mask=mask)
        else:
            tl.store(base + rk[:, None] * n_cols + cols[None, :], acc, mask=mask)


def usable(z: torch.Tensor, d: torch.Tensor) -> bool:
    """Whether the kernel runs these operands: Triton on their device, one dtype, r up to MAX_RANK."""
    return available(d) and z.dtype == d.dtype and 0 < z.shape[1] <= MAX_RANK


def rank_grad(z: torch.Tensor, d: torch.Tensor, g: SlotGrouping, scale: float = 1.0,
              transpose: bool = False, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Per expert, ``scale`` z^T d over its rows of z [S, r] and d [S, N] (sorted by expert): [E, r, N], or
    [E, N, r] with ``transpose``; zero for empty experts. With ``rows`` [S], d is [n, N] and sorted row i reads
    d[rows[i]]. Triton where ``usable``, else grouped GEMMs."""
    num_experts, rank = g.counts.numel(), z.shape[1]
    n_cols = d.shape[1]
    if not usable(z, d) or z.shape[0] == 0:
        d = d if rows is None else d[rows]
        if transpose:
            return segment_mm_tn(d, z * scale if scale != 1.0 else z, g)
        out = segment_mm_tn(z, d, g)
        return out * scale if scale != 1.0 else out
    out = d.new_empty((num_experts, n_cols, rank) if transpose else (num_experts, rank, n_cols))
    grid = lambda meta: (num_experts, triton.cdiv(n_cols, meta["BLOCK_N"]))  # noqa: E731
    gather = rows is not None
    _rank_grad_kernel[grid](z.contiguous(), d.contiguous(), rows if gather else g.offs, out, g.offs, g.counts, scale,
                            n_cols=n_cols, rank=rank, TRANSPOSE=transpose, GATHER=gather, PREC=_precision(d.dtype),
                            INTERPRET=_INTERPRET, BLOCK_R=_block_r(rank))
    return out
