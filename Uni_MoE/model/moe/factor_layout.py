"""The experts' LoRA factors in the layouts the blocks multiply them in, and the transposed copies that make them.

The MoE blocks transpose LoRA-B factors every call: [E, out, r] into the kernels' [E, r, out] layout
(``kernel_factors``) and into the stacked [E*r, out] matrix of ``lora_blocks.stack_b``. torch copies a transposed
view through its generic strided elementwise kernel; ``swap_last_two`` moves tiles instead, each read and written
in whole rows (a Triton kernel, where the MoE kernels run).
"""

from __future__ import annotations

import torch

from .swiglu_lora_kernels import available, triton

TILE = 4096  # elements a program moves: BLOCK_N columns (up to 64, the narrow side of a LoRA factor) by TILE // BLOCK_N


def swap_last_two(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t.transpose(-1, -2)``."""
    if t.dim() < 2 or t.numel() == 0 or not available(t):
        return t.transpose(-1, -2).contiguous()
    src = t.contiguous()
    m, n = src.shape[-2:]
    out = src.new_empty(*src.shape[:-2], n, m)
    block_n = min(64, max(16, triton.next_power_of_2(n)))
    block_m = TILE // block_n
    _swap_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n), src.numel() // (m * n))](
        src, out, m, n, BLOCK_M=block_m, BLOCK_N=block_n)
    return out


def kernel_factors(gate_b: torch.Tensor, up_b: torch.Tensor, down_a: torch.Tensor) -> tuple:
    """The LoRA weights in the Triton kernels' layout: gate-B and up-B [E, I, r] as [E, r, I] and down-A [E, r, I]
    contiguous. A kernel's [R, N] tile of each is then whole 16-byte vectors, which Triton prefetches a few column
    steps ahead instead of waiting on r-strided loads. The expert blocks make them once a call and keep them from
    forward to backward (2 E r I elements a layer, 22.5 MB at E = 8, r = 64, I = 11008 in bf16)."""
    return swap_last_two(gate_b), swap_last_two(up_b), down_a.contiguous()


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _swap_kernel(src_ptr, dst_ptr, m, n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """dst[b, j, i] = src[b, i, j] over one BLOCK_M x BLOCK_N tile of matrix b."""
        base = tl.program_id(2).to(tl.int64) * m * n
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask = (rows[:, None] < m) & (cols[None, :] < n)
        tile = tl.load(src_ptr + base + rows[:, None] * n + cols[None, :], mask=mask)
        tl.store(dst_ptr + base + cols[:, None] * m + rows[None, :], tl.trans(tile), mask=tl.trans(mask))
