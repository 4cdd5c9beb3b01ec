"""LoRA experts on one shared frozen MLP (``expert_type="shared"``): one autograd function for the block.

With a shared base, gate and up base projections are computed once per token, and since the down
projection is linear, sum_j w_j h_j W_down = (sum_j w_j h_j) W_down: the frozen work is exactly one
dense MLP. Per slot remain the r-wide LoRA terms and one SwiGLU pass with the slot's LoRA deltas added.
On CUDA (top-1/top-2) the Triton kernels of shared_kernels.py do all slots in one pass over [T, I] per
direction, with the LoRA-B products on registers, plus one pass for the LoRA weight gradients (from rank
``SLOT_ROWS_MIN_RANK`` instead per-expert products over per-slot rows the backward kernel stores); elsewhere
PyTorch does one fused SwiGLU pass per slot with block-masked LoRA products. Backward recomputes the
per-slot activations from the saved base gate/up, so saved memory is that of a dense MLP plus r-wide terms.
Given the gate/up LoRA-A factors of all experts (``lora_a``, without input dropout) in place of their
activations ``za``, the block computes za = x A^T itself and adds its input gradient into the block's own
(one accumulation of x's gradient less).
"""

from __future__ import annotations

import torch

from .distinct import LoRASettings
from . import shared_kernels as kernels
from .factor_layout import kernel_factors
from .lora_blocks import keep_block, mix_slots, own_blocks, own_lora_inputs, stack_b, unstack_b, za_blocks
from .rank_grad_kernels import rank_grad
from .segments import SlotGrouping, group_slots
from .swiglu import dropout_mask, row_dot, swiglu_backward, swiglu_forward


def _slot_deltas(
    za: torch.Tensor | None, slot_experts: torch.Tensor, gate_b: torch.Tensor, up_b: torch.Tensor, scale: float
) -> tuple[torch.Tensor | None, torch.Tensor | None, list[torch.Tensor | None]]:
    """Gate and up LoRA deltas [T, I] of one slot, and that slot's block-masked LoRA-A activations."""
    if za is None:
        return None, None, [None, None]
    num_experts = gate_b.shape[0]
    z = [keep_block(part, slot_experts, num_experts) * scale for part in za.chunk(2, dim=1)]  # [T, E*r] each
    return z[0] @ stack_b(gate_b), z[1] @ stack_b(up_b), z


def _slot_dropout(
    gate: torch.Tensor, top_k: int, has_lora: bool, lora: LoRASettings
) -> tuple[torch.Tensor | None, float]:
    """The down LoRA's dropout masks of all k slots [k, T, I] (bool, drawn in one call) and their scale."""
    if not has_lora:
        return None, 1.0
    return dropout_mask(gate.expand(top_k, *gate.shape), lora.down_dropout)


class SharedBaseExperts(torch.autograd.Function):
    """out[t] = sum_j w[t, j] * expert_{e(t,j)}(x[t]) for LoRA experts that share one base MLP."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weights: torch.Tensor,
        indices: torch.Tensor,
        za: torch.Tensor | None,
        lora_a: torch.Tensor | None,
        gate_w: torch.Tensor,
        up_w: torch.Tensor,
        down_w: torch.Tensor,
        gate_b: torch.Tensor | None,
        up_b: torch.Tensor | None,
        down_a: torch.Tensor | None,
        down_b: torch.Tensor | None,
        lora: LoRASettings,
        recompute: bool = False,
    ) -> torch.Tensor:
        if lora_a is not None:
            za = x @ lora_a.t()  # [T, 2*E*r]
        gate, up = x @ gate_w.t(), x @ up_w.t()  # [T, I], once per token
        num_experts = gate_b.shape[0] if za is not None else 1
        ctx.fused = kernels.supported(x, weights.shape[1], num_experts)
        ctx.lora = lora
        path = _fused_forward if ctx.fused else _torch_forward
        mixed, zd_mix, kept = path(ctx, gate, up, weights, indices, za, gate_b, up_b, down_a, lora)
        if za is None:
            y = mixed @ down_w.t()  # [T, H]: one down projection for all slots
        else:  # the down LoRA-B products first, so that the down projection's GEMM accumulates onto them
            y = zd_mix @ (stack_b(down_b) * lora.scale)
            y.addmm_(mixed, down_w.t())
        if recompute:  # backward computes them again from x
            gate = up = None
        # intermediates too go through save_for_backward, so activation checkpointing can drop them
        ctx.save_for_backward(x, weights, indices, za, lora_a, gate_w, up_w, down_w, gate_b, up_b, down_a, down_b,
                              gate, up, zd_mix, mixed if ctx.needs_input_grad[7] else None, *kept)
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x, weights, indices, za, lora_a, gate_w, up_w, down_w, gate_b, up_b, down_a, down_b, gate, up, zd_mix,
         mixed, *kept) = ctx.saved_tensors
        need, s = ctx.needs_input_grad, ctx.lora.scale
        dy = grad_out.contiguous()
        d_mixed = dy @ down_w  # [T, I]
        if gate is None:  # recompute_projections
            gate, up = x @ gate_w.t(), x @ up_w.t()
        grads_lora: list[torch.Tensor | None] = [None] * 4
        dz_mix = None
        if za is not None:
            dz_mix = (dy @ stack_b(down_b).t()) * s  # [T, E*r]
            grads_lora[3] = unstack_b((zd_mix.t() @ dy) * s, down_a.shape[0])
        path = _fused_backward if ctx.fused else _torch_backward
        sum_gate, sum_up, grad_w, grad_za, grads_lora[:3] = path(
            ctx, d_mixed, dz_mix, weights, indices, za, gate_b, up_b, down_a, gate, up, need, *kept)
        grad_x = grad_lora_a = None
        if need[0]:
            grad_x = sum_gate @ gate_w
            grad_x.addmm_(sum_up, up_w)
            if lora_a is not None:
                grad_x.addmm_(grad_za, lora_a)
        if lora_a is not None:
            grad_lora_a = grad_za.t() @ x if need[4] else None
            grad_za = None
        grads_base = [
            sum_gate.t() @ x if need[5] else None,
            sum_up.t() @ x if need[6] else None,
            dy.t() @ mixed if need[7] else None,
        ]
        grad_w = grad_w.to(weights.dtype) if grad_w is not None else None
        return grad_x, grad_w, None, grad_za, grad_lora_a, *grads_base, *grads_lora, None, None


def _fused_forward(ctx, gate, up, weights, indices, za, gate_b, up_b, down_a, lora):
    """The Triton path, every slot in one kernel pass: (mixed [T, I], the down LoRA-A outputs mixed over the
    slots [T, E*r] or None, what its backward needs)."""
    has_lora = za is not None
    num_experts = gate_b.shape[0] if has_lora else 1
    ctx.combos = kernels.combo_grouping(indices if has_lora else torch.zeros_like(indices), num_experts)
    keep, keep_scale = _slot_dropout(gate, weights.shape[1], has_lora, lora)
    ctx.keep_scale = keep_scale
    ctx.factors = kernel_factors(gate_b, up_b, down_a) if has_lora else None  # weight-sized; backward reuses them
    mixed, zd = kernels.mix_forward(gate, up, za, weights, ctx.factors, keep, keep_scale, lora.scale, ctx.combos)
    zd_mix = mix_slots(zd, weights, indices, num_experts) if has_lora else None
    return mixed, zd_mix, (zd, keep)


def _fused_backward(ctx, d_mixed, dz_mix, weights, indices, za, gate_b, up_b, down_a, gate, up, need, zd, keep):
    """Gradients through the Triton path: (sum of gate grads, of up grads, grad_w, grad_za, the gate-B, up-B
    and down-A LoRA grads)."""
    s, has_lora = ctx.lora.scale, za is not None
    factors = ctx.factors
    slots = group_slots(indices, down_a.shape[0]) if has_lora else None
    store = slots if has_lora and kernels.slot_rows_pay(down_a.shape[1]) else None
    sum_gate, sum_up, dz, grad_w, slot_rows = kernels.mix_backward(
        d_mixed, gate, up, za, dz_mix, weights, factors, keep, ctx.keep_scale, s, ctx.combos, need[1], store)
    grad_za, grads_lora = None, [None] * 3
    if has_lora:
        num_experts = down_a.shape[0]
        own = own_blocks(dz_mix, indices, num_experts)  # [T, k, r]: s dy Bd of each slot's expert
        if slot_rows is not None:
            grads_lora = _grouped_weight_grads(slot_rows, za, own, weights, slots, s)
        else:
            grads_lora = kernels.lora_weight_grads(d_mixed, gate, up, za, dz_mix, weights, factors, keep,
                                                   ctx.keep_scale, s, slots)
        grad_za = za_blocks(dz, indices, num_experts)
        if need[1]:
            grad_w = grad_w + (zd.float() * own.float()).sum(-1)
    return sum_gate, sum_up, grad_w, grad_za, list(grads_lora)


def _grouped_weight_grads(slot_rows: tuple, za: torch.Tensor, own: torch.Tensor, weights: torch.Tensor,
                          slots: SlotGrouping, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gate-B, up-B [E, I, r] and down-A [E, r, I] LoRA gradients as per-expert products (``rank_grad``) over
    each slot's d gate, d up and dropout(h) [S, I] (rows sorted by expert, as the backward kernel stored them).
    ``own`` [T, k, r] is s dy Bd of each slot's expert."""
    d_gate, d_up, h_dropped = slot_rows
    zg, zu = own_lora_inputs(za, slots, slots.counts.numel())  # [S, r] each
    dzd = (own.float() * weights[:, :, None].float()).to(h_dropped.dtype).view(-1, own.shape[2])[slots.order]
    return (rank_grad(zg, d_gate, slots, scale, transpose=True),
            rank_grad(zu, d_up, slots, scale, transpose=True), rank_grad(dzd, h_dropped, slots))


def _torch_forward(ctx, gate, up, weights, indices, za, gate_b, up_b, down_a, lora):
    """The PyTorch path, one fused SwiGLU pass per slot: (mixed [T, I], the down LoRA-A outputs mixed over the
    slots [T, E*r] or None, what its backward needs)."""
    mixed = zd_mix = None
    zd_slots = []
    keeps, keep_scale = _slot_dropout(gate, weights.shape[1], za is not None, lora)
    for j in range(weights.shape[1]):  # over a token's k slots, not over experts
        d_gate, d_up, _ = _slot_deltas(za, indices[:, j], gate_b, up_b, lora.scale)
        keep = None if keeps is None else keeps[j]
        w = weights[:, j]
        h, h_dropped, mixed = swiglu_forward(gate, up, d_gate, d_up, keep, keep_scale, w, mixed)  # [T, I]
        del d_gate, d_up
        if za is not None:
            zd = keep_block((h if keep is None else h_dropped) @ down_a.reshape(-1, down_a.shape[-1]).t(),
                            indices[:, j], down_a.shape[0])  # [T, E*r], the slot's expert block only
            zd_mix = zd * w[:, None] if zd_mix is None else zd_mix.addcmul_(zd, w[:, None])
            zd_slots.append(zd)
        del h, h_dropped
    ctx.keep_scale = keep_scale
    return mixed, zd_mix, (keeps, *zd_slots)


def _torch_backward(ctx, d_mixed, dz_mix, weights, indices, za, gate_b, up_b, down_a, gate, up, need, keeps,
                    *zd_slots):
    """Gradients through the PyTorch path: (sum of gate grads, of up grads, grad_w, grad_za, the gate-B, up-B
    and down-A LoRA grads)."""
    s, has_lora = ctx.lora.scale, za is not None
    a_stack = None
    dz = [None, None]
    d_stacks = [None, None, None]  # gate B, up B, down A, stacked [E*r, out]
    if has_lora:
        num_experts = down_a.shape[0]
        a_stack = down_a.reshape(-1, down_a.shape[-1])  # [E*r, I]
    grad_w = torch.zeros_like(weights, dtype=torch.float32) if need[1] else None
    sum_gate = sum_up = None
    for j in range(weights.shape[1]):
        w = weights[:, j]
        d_gate, d_up, z = _slot_deltas(za, indices[:, j], gate_b, up_b, s)
        extra = None
        keep = None if keeps is None else keeps[j]
        if has_lora:
            dz_own = keep_block(dz_mix, indices[:, j], num_experts)  # [T, E*r]
            extra = dz_own @ a_stack
        probe = d_mixed if need[1] else None
        g_j, u_j, h_dropped, dot, sum_gate, sum_up = swiglu_backward(
            d_mixed, gate, up, d_gate, d_up, extra, keep, ctx.keep_scale, w, probe, sum_gate, sum_up
        )
        if j == 0:
            sum_gate, sum_up = g_j, u_j
        del d_gate, d_up, extra
        if need[1]:
            grad_w[:, j] = dot if not has_lora else dot + row_dot(zd_slots[j], dz_mix)
        if has_lora:
            updates = (z[0].t() @ g_j, z[1].t() @ u_j, (dz_own * w[:, None]).t() @ h_dropped)  # [E*r, *]
            d_stacks = [u if d is None else d.add_(u) for d, u in zip(d_stacks, updates)]
            for i, (grad_part, b) in enumerate(((g_j, gate_b), (u_j, up_b))):
                part = keep_block(grad_part @ stack_b(b).t(), indices[:, j], num_experts) * s
                dz[i] = part if dz[i] is None else dz[i].add_(part)
        del h_dropped
    grad_za, grads_lora = None, [None] * 3
    if has_lora:
        grads_lora = [unstack_b(d_stacks[0], num_experts), unstack_b(d_stacks[1], num_experts),
                      d_stacks[2].view_as(down_a)]
        grad_za = torch.cat(dz, dim=1)
    return sum_gate, sum_up, grad_w, grad_za, grads_lora
