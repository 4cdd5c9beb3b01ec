"""Triton matrix-vector kernels that read only the chosen experts' weights, picking each row's expert from
device memory: no host synchronisation and no data-dependent shape, so a CUDA graph can capture them.

Row p of the input multiplies the stacked weight slice ``weight[base[p]]`` ([out, in], nn.Linear layout,
``in`` contiguous). Programs are ordered row-fastest, so rows that share an expert read the same weight
tile at about the same time (the second read may hit L2). The gated kernel reads the gate and up
weights in one pass and returns ``silu(gate + gate_delta) * (up + up_delta)`` (the deltas are the LoRA
terms, computed outside: they are r-wide and cheap). Accumulation is fp32; outputs take ``out``'s dtype.
"""

from __future__ import annotations

import torch

from .swiglu_lora_kernels import available, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, w2_ptr, d_ptr, d2_ptr, base_ptr, out_ptr, R, stride_wb, stride_wr, C: tl.constexpr,
                     GATED: tl.constexpr, HAS_DELTA: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        p = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        base = tl.load(base_ptr + p).to(tl.int64)
        offsets = base * stride_wb + rows.to(tl.int64)[:, None] * stride_wr
        acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_ok = cols < C
            xv = tl.load(x_ptr + p * C + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            ok = row_ok[:, None] & col_ok[None, :]
            acc += tl.load(w_ptr + offsets + cols[None, :], mask=ok, other=0.0).to(tl.float32) * xv
            if GATED:
                acc2 += tl.load(w2_ptr + offsets + cols[None, :], mask=ok, other=0.0).to(tl.float32) * xv
        out = tl.sum(acc, axis=1)
        if GATED:
            up = tl.sum(acc2, axis=1)
            if HAS_DELTA:
                out += tl.load(d_ptr + p * R + rows, mask=row_ok, other=0.0).to(tl.float32)
                up += tl.load(d2_ptr + p * R + rows, mask=row_ok, other=0.0).to(tl.float32)
            out = out * tl.sigmoid(out) * up
        tl.store(out_ptr + p * R + rows, out.to(out_ptr.dtype.element_ty), mask=row_ok)

# rows x columns of weight per step of one program: the fastest of six tried on an H200 for one token
# through a LLaMA-7B-width layer of 4 experts, top-2 (benchmarks/results/decode_profile_h200.md)
BLOCKS = {"rows": 4, "cols": 512, "warps": 4}


def usable(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether the kernels can run here: Triton on x's device and weights whose last dimension is contiguous."""
    return available(x) and all(w.stride(-1) == 1 and w.dtype == weights[0].dtype for w in weights)


def _launch(x: torch.Tensor, bases: torch.Tensor, w: torch.Tensor, w2: torch.Tensor | None,
            deltas: tuple[torch.Tensor, torch.Tensor] | None, out_dtype: torch.dtype) -> torch.Tensor:
    p, c = x.shape
    r = w.shape[1]
    out = torch.empty(p, r, dtype=out_dtype, device=x.device)
    d, d2 = (d.contiguous() for d in deltas) if deltas is not None else (out, out)
    grid = (p, triton.cdiv(r, BLOCKS["rows"]))
    _gemv_kernel[grid](x.contiguous(), w, w if w2 is None else w2, d, d2, bases.contiguous(), out, r,
                       w.stride(0), w.stride(1), c, GATED=w2 is not None, HAS_DELTA=deltas is not None,
                       BLOCK_R=BLOCKS["rows"], BLOCK_C=BLOCKS["cols"], num_warps=BLOCKS["warps"])
    return out


def gathered_swiglu(x: torch.Tensor, bases: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                    deltas: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """silu(x[p] gate[b]^T + dg[p]) * (x[p] up[b]^T + du[p]) with b = bases[p]: x [P, H], gate/up [B, I, H],
    deltas [P, I] each or None -> [P, I] in x's dtype."""
    return _launch(x, bases, gate, up, deltas, x.dtype)


def gathered_matvec(x: torch.Tensor, bases: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x[p] weight[bases[p]]^T: x [P, C], weight [B, R, C] -> [P, R] in float32."""
    return _launch(x, bases, weight, None, None, torch.float32)
