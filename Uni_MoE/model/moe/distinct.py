"""Experts with distinct frozen bases (``expert_type="mlp"``): one autograd function for the whole block.

Slots are sorted by expert once. Forward: grouped GEMMs for the bases (from the gathered slot rows xs, which
with ``lora_a`` also give each slot its own experts' gate/up LoRA-A activations, xs A_e^T: k of the E experts'
products a token, where ``za`` brings all E from outside), one SwiGLU with the r-wide LoRA
terms of gate, up and the down LoRA's input fused in (``SwiGLULoRA``: Triton kernels on CUDA, PyTorch
elsewhere), the down projection, a weighted sum over each token's k slots (slot_kernels.py), and the down
LoRA-B products of all slots as one dense [T, E*r] x [E*r, H] GEMM into the token outputs (half the rows of
an update of the slot outputs; backward likewise reads dy once for the down LoRA). Only gate/up
([S, I] each), the r-wide LoRA activations and the [S, H] expert outputs are kept; the activation is
recomputed in backward (with ``recompute`` gate/up too, from x, and the kernel writes their gradients over
them), frozen bases get no weight gradient, and LoRA weight gradients are exact per-expert products
(rank_grad_kernels.py on CUDA; at small ranks per-tile sums from the SwiGLU backward kernel instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .lora_blocks import mix_slots, own_blocks, own_lora_inputs, slot_pairs, stack_b, unstack_b, za_blocks
from .rank_grad_kernels import rank_grad
from .segments import SlotGrouping, expert_products, segment_mm, segment_mm_tn
from .slot_kernels import combine, slot_grads, token_sum
from .swiglu import dropout_mask
from .swiglu_lora import SwiGLULoRA


@dataclass
class LoRASettings:
    """LoRA scaling and the dropout probability on the down projection's input (0 when inactive)."""

    scale: float
    down_dropout: float


def _slot_experts(g: SlotGrouping, weights: torch.Tensor) -> torch.Tensor:
    """The [T, k] expert choices back from the grouping."""
    return g.expert[g.inverse].view(weights.shape)


def _base_projections(xs: torch.Tensor, g: SlotGrouping, gate_w: torch.Tensor,
                      up_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen bases' gate and up of every sorted slot row xs [S, H], [S, I] each: the forward's, and with
    ``recompute`` the backward's again, by the same GEMMs."""
    return tuple(expert_products([(xs, w.transpose(1, 2))], g)[0] for w in (gate_w, up_w))


def _sum_into_first(terms: list[torch.Tensor]) -> torch.Tensor | None:
    """The sum of ``terms``, accumulated into the first one; None for no terms."""
    for term in terms[1:]:
        terms[0].add_(term)
    return terms[0] if terms else None


class DistinctExperts(torch.autograd.Function):
    """out[t] = sum_j w[t, j] * expert_{e(t,j)}(x[t]) for experts with their own bases and LoRA."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weights: torch.Tensor,
        za: torch.Tensor | None,
        lora_a: torch.Tensor | None,
        gate_w: torch.Tensor,
        up_w: torch.Tensor,
        down_w: torch.Tensor,
        gate_b: torch.Tensor | None,
        up_b: torch.Tensor | None,
        down_a: torch.Tensor | None,
        down_b: torch.Tensor | None,
        g: SlotGrouping,
        lora: LoRASettings,
        recompute: bool = False,
    ) -> torch.Tensor:
        num_experts = gate_w.shape[0]
        has_lora = za is not None or lora_a is not None
        xs = x[g.token]  # [S, H]
        gate, up = _base_projections(xs, g, gate_w, up_w)
        zg = zu = None
        keep, keep_scale = dropout_mask(gate, lora.down_dropout) if has_lora else (None, 1.0)
        if za is not None:
            zg, zu = own_lora_inputs(za, g, num_experts)  # [S, r] each
        elif lora_a is not None:
            z = segment_mm(xs, lora_a.transpose(1, 2), g)  # [S, 2r]: gate's r columns, then up's
            zg, zu = (part.contiguous() for part in z.chunk(2, dim=1))
        del xs
        act = SwiGLULoRA(gate, g, lora.scale)
        factors = (zg, zu, gate_b, up_b, down_a) if has_lora else None
        h, zd, gate, up = act.forward(gate, up, factors, keep, keep_scale)  # h [S, I], zd [S, r]
        ys = expert_products([(h, down_w.transpose(1, 2))], g)[0]  # [S, H], the down bases only
        del h
        out = combine(ys, g, weights)
        zd_slots = zd_mix = None
        if has_lora:  # the down LoRA-B products of all slots: one [T, E*r] x [E*r, H] GEMM into out
            zd_slots = zd[g.inverse].view(*weights.shape, zd.shape[1])  # [T, k, r]
            zd_mix = mix_slots(zd_slots, weights, _slot_experts(g, weights), num_experts)  # [T, E*r]
            out.addmm_(zd_mix, stack_b(down_b), alpha=lora.scale)
        ys = ys if ctx.needs_input_grad[1] else None
        if recompute:  # backward computes them again from x
            gate = up = None
        # intermediates too go through save_for_backward, so activation checkpointing can drop them
        ctx.save_for_backward(x, weights, lora_a, gate_w, up_w, down_w, gate_b, up_b, down_a, down_b,
                              gate, up, zg, zu, zd_slots, zd_mix, keep, ys)
        ctx.grouping, ctx.lora, ctx.keep_scale, ctx.act = g, lora, keep_scale, act
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weights, lora_a, gate_w, up_w, down_w, gate_b, up_b, down_a, down_b, *kept = ctx.saved_tensors
        gate, up, zg, zu, zd_slots, zd_mix, keep, ys = kept
        g, lora, need, act = ctx.grouping, ctx.lora, ctx.needs_input_grad, ctx.act
        need_bases = need[4:7]  # gate, up, down
        k = weights.shape[1]
        num_experts, s = gate_w.shape[0], lora.scale
        has_lora = zg is not None
        factors = (zg, zu, gate_b, up_b, down_a) if has_lora else None
        grad_out = grad_out.contiguous()
        dys, grad_w = slot_grads(grad_out, ys, g, weights)  # [S, H], [T, k] or None (the down bases' part)
        dh = expert_products([(dys, down_w)], g)[0]  # [S, I]
        if not need_bases[2]:
            dys = None  # only a trainable down base reads it again: freed before the [S, I] work below
        grads_lora: list[torch.Tensor | None] = [None] * 4
        dzd = None
        experts = _slot_experts(g, weights) if has_lora else None
        if has_lora:
            own = own_blocks(grad_out @ stack_b(down_b).t(), experts, num_experts)  # [T, k, r]
            dzd = (own * (weights[:, :, None] * s)).view(-1, own.shape[2])[g.order]  # [S, r]: s w dy Bd
            grads_lora[3] = unstack_b(zd_mix.t() @ grad_out, num_experts) * s  # [E, H, r]
            if grad_w is not None:
                grad_w = (grad_w.float() + s * (zd_slots.float() * own.float()).sum(-1)).to(weights.dtype)
        in_place = False
        xs = None
        if gate is None:  # recompute_projections: the forward's gate and up again, bit for bit
            xs = x[g.token]
            gate, up = act.kept(*_base_projections(xs, g, gate_w, up_w), factors)
            in_place = not (need_bases[2] and keep is not None)  # else the down base's gradient reads them again
        d_gate, d_up, h_dropped, dzg, dzu, wgrads = act.backward(
            dh, dzd, gate, up, factors, keep, ctx.keep_scale, need_bases[2] and keep is None, in_place
        )
        del dh
        grad_za = grad_lora_a = dz = None
        if has_lora:
            if wgrads is not None:  # the kernel summed them per expert
                grads_lora[:3] = wgrads
            else:
                grads_lora[2] = rank_grad(dzd, h_dropped, g)  # [E, r, I]
                grads_lora[0] = rank_grad(zg, d_gate, g, s, transpose=True)  # [E, I, r]
                grads_lora[1] = rank_grad(zu, d_up, g, s, transpose=True)
            if lora_a is None:
                grad_za = za_blocks(slot_pairs(dzg, dzu, g, k), experts, num_experts)
            else:
                dz = torch.cat([dzg, dzu], 1)  # [S, 2r], the gradient of the forward's z
                if need[3]:  # [E, 2r, H]: each expert's dz^T times its slots' token rows, gathered in the kernel
                    grad_lora_a = rank_grad(dz, x, g, rows=g.token) if xs is None else rank_grad(dz, xs, g)
        grad_x = None
        if need[0]:
            pairs = [(d_gate, gate_w), (d_up, up_w)] + ([(dz, lora_a)] if dz is not None else [])
            terms = expert_products(pairs, g)  # one per pair, or their sum
            grad_x = token_sum(terms[0], _sum_into_first(terms[1:]), g, k)
        grads_base: list[torch.Tensor | None] = [None] * 3
        if any(need_bases):
            xs = x[g.token] if xs is None else xs
            h = h_dropped if keep is None else act.activation(gate, up, factors)
            grads_base = [segment_mm_tn(d, a, g) if n else None
                          for d, a, n in ((d_gate, xs, need_bases[0]), (d_up, xs, need_bases[1]),
                                          (dys, h, need_bases[2]))]
        return grad_x, grad_w, grad_za, grad_lora_a, *grads_base, *grads_lora, None, None, None
