"""Moving rows between tokens and expert-sorted slots, each in one pass (Triton on CUDA, PyTorch elsewhere).

- ``combine``: out[t] = sum_j w[t, j] * ys[slot row of (t, j)], the routing weights applied as the
  slots are gathered back (no [S, H] gathered copy, fp32 accumulation);
- ``slot_grads``: each sorted slot's dys = grad_out[token] * w and the routing-weight gradient
  <ys, grad_out[token]> in one read of grad_out;
- ``token_sum``: grad_x[t] = sum_j (a + b)[slot row of (t, j)], the two input-gradient GEMM outputs summed
  straight into the token rows.
"""

from __future__ import annotations

import torch

from .segments import SlotGrouping
from .swiglu_lora_kernels import available, triton

BLOCK_H = 1024

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _combine_kernel(ys_ptr, inv_ptr, w_ptr, out_ptr, n_cols, K: tl.constexpr, BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n_cols
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in range(K):
            row = tl.load(inv_ptr + t * K + j).to(tl.int64)
            w = tl.load(w_ptr + t * K + j).to(tl.float32)
            acc += w * tl.load(ys_ptr + row * n_cols + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + t * n_cols + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _slot_grads_kernel(go_ptr, ys_ptr, token_ptr, order_ptr, w_ptr, dys_ptr, gw_ptr, n_cols: tl.constexpr,
                           NEED_W: tl.constexpr, BLOCK: tl.constexpr):
        s = tl.program_id(0).to(tl.int64)
        t = tl.load(token_ptr + s).to(tl.int64)
        w = tl.load(w_ptr + tl.load(order_ptr + s)).to(tl.float32)
        dot = tl.zeros((BLOCK,), dtype=tl.float32)
        for c in range(0, n_cols, BLOCK):
            cols = c + tl.arange(0, BLOCK)
            ok = cols < n_cols
            go = tl.load(go_ptr + t * n_cols + cols, mask=ok, other=0.0).to(tl.float32)
            tl.store(dys_ptr + s * n_cols + cols, (go * w).to(dys_ptr.dtype.element_ty), mask=ok)
            if NEED_W:
                dot += go * tl.load(ys_ptr + s * n_cols + cols, mask=ok, other=0.0).to(tl.float32)
        if NEED_W:
            tl.store(gw_ptr + s, tl.sum(dot, 0))

    @triton.jit
    def _token_sum_kernel(a_ptr, b_ptr, inv_ptr, out_ptr, n_cols, K: tl.constexpr, HAS_B: tl.constexpr,
                          BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n_cols
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in range(K):
            row = tl.load(inv_ptr + t * K + j).to(tl.int64)
            acc += tl.load(a_ptr + row * n_cols + cols, mask=ok, other=0.0).to(tl.float32)
            if HAS_B:
                acc += tl.load(b_ptr + row * n_cols + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + t * n_cols + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


def combine(ys: torch.Tensor, g: SlotGrouping, weights: torch.Tensor) -> torch.Tensor:
    """Sorted slot outputs ys [S, H] -> sum_j w[t, j] * ys[row of (t, j)], [T, H]."""
    t, k = weights.shape
    if not available(ys) or t == 0:
        slots = ys[g.inverse].view(t, k, ys.shape[1])
        out = slots[:, 0] * weights[:, :1]
        for j in range(1, k):  # over a token's k slots, not over experts
            out.addcmul_(slots[:, j], weights[:, j : j + 1])
        return out
    out = ys.new_empty(t, ys.shape[1])
    _combine_kernel[(t, triton.cdiv(ys.shape[1], BLOCK_H))](
        ys.contiguous(), g.inverse, weights.contiguous(), out, ys.shape[1], K=k, BLOCK=BLOCK_H)
    return out


def slot_grads(
    grad_out: torch.Tensor, ys: torch.Tensor | None, g: SlotGrouping, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dys [S, H] = grad_out[token] * w of the slot, the weights' gradient [T, k] or None without ys)."""
    t, k = weights.shape
    grad_out = grad_out.contiguous()
    if not available(grad_out) or t == 0:
        dy = grad_out[g.token]
        grad_w = None
        if ys is not None:
            grad_w = (ys.float() * dy.float()).sum(-1)[g.inverse].view(t, k).to(weights.dtype)
        return dy * weights.reshape(-1)[g.order, None], grad_w
    rows, n_cols = g.token.numel(), grad_out.shape[1]
    dys = grad_out.new_empty(rows, n_cols)
    gw = grad_out.new_empty(rows, dtype=torch.float32) if ys is not None else None
    _slot_grads_kernel[(rows,)](
        grad_out, ys if ys is not None else grad_out, g.token, g.order, weights.contiguous(), dys,
        gw if gw is not None else dys, n_cols=n_cols, NEED_W=ys is not None, BLOCK=BLOCK_H)
    return dys, None if gw is None else gw[g.inverse].view(t, k).to(weights.dtype)


def token_sum(a: torch.Tensor, b: torch.Tensor | None, g: SlotGrouping, top_k: int) -> torch.Tensor:
    """Sorted per-slot rows a (+ b) [S, D] -> per-token sums over the token's k slots [T, D]."""
    t = a.shape[0] // top_k
    if not available(a) or t == 0:
        rows = a if b is None else a + b
        per_slot = rows[g.inverse].view(t, top_k, rows.shape[1])
        return per_slot.sum(1) if top_k > 1 else per_slot[:, 0]
    out = a.new_empty(t, a.shape[1])
    _token_sum_kernel[(t, triton.cdiv(a.shape[1], BLOCK_H))](
        a.contiguous(), b.contiguous() if b is not None else a, g.inverse, out, a.shape[1], K=top_k,
        HAS_B=b is not None, BLOCK=BLOCK_H)
    return out
