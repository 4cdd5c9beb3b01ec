"""Dropless expert-parallel dispatch: each token-slot travels to the rank holding its expert, and only
routed rows move.

With ``ep_size`` ranks of L experts each (global expert e lives on rank e // L as local expert e % L),
every rank sorts its [T, k] slots by expert, tells every other rank how many rows it will send for each
of that rank's experts (one small all-to-all of counts, then one host sync for the split sizes), sends
the rows (an all-to-all with those splits, differentiable), runs its L experts on what it received in
one call of the expert implementation, and returns the outputs the same way. The routing weights are
applied back on the token's own rank, so only hidden-size rows cross. No capacity, no padding, no
dropped token: the function is the local layer's for any routing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_to_all_single

from .experts import MoEExperts
from .implementations import ExpertFn
from .segments import SlotGrouping, group_slots
from .slot_kernels import combine, slot_grads, token_sum


class _SlotRows(torch.autograd.Function):
    """x [T, H] -> the rows of the sorted slots [S, H] (x[g.token]); the backward sums each token's k slot
    gradients straight into its row (``token_sum``): no atomic scatter, deterministic."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, g: SlotGrouping, top_k: int) -> torch.Tensor:
        ctx.grouping, ctx.top_k = g, top_k
        return x[g.token]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return token_sum(grad.contiguous(), None, ctx.grouping, ctx.top_k), None, None


class _MixSlots(torch.autograd.Function):
    """Expert outputs of the sorted slots ys [S, H] and routing weights [T, k] -> sum_j w[t, j] * ys[(t, j)],
    the local layer's own ``combine`` (fp32 accumulation). Keeps ys, the one [S, H] tensor the weights'
    gradient needs, and no per-slot product."""

    @staticmethod
    def forward(ctx, ys: torch.Tensor, weights: torch.Tensor, g: SlotGrouping) -> torch.Tensor:
        ctx.save_for_backward(ys if ctx.needs_input_grad[1] else None, weights)
        ctx.grouping = g
        return combine(ys, g, weights)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        ys, weights = ctx.saved_tensors
        dys, grad_w = slot_grads(grad, ys, ctx.grouping, weights)
        return dys, grad_w, None


def _zero_link(inbox: torch.Tensor, experts: MoEExperts) -> torch.Tensor:
    """0, depending on the received rows and every trainable expert tensor: a rank that received no row
    still takes part in the backward's exchanges, as the ranks with rows do (else they would wait forever)."""
    link = inbox.sum() * 0
    for p in experts.base_parameters() + experts.lora_parameters():
        if p.requires_grad:
            link = link + p.sum() * 0
    return link


def _exchange_counts(counts: torch.Tensor, ep_size: int,
                     group: dist.ProcessGroup) -> tuple[torch.Tensor, list[int], list[int]]:
    """counts [E]: rows this rank sends to each global expert. Returns rows received per (source rank,
    local expert) [ep_size * L], and the rows sent to / received from each rank (Python ints)."""
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=group)
    per_rank = torch.stack([counts.view(ep_size, -1).sum(1), received.view(ep_size, -1).sum(1)]).tolist()
    return received, per_rank[0], per_rank[1]


def expert_parallel_mix(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: MoEExperts,
                        implementation: ExpertFn, ep_size: int,
                        group: dist.ProcessGroup | None) -> tuple[torch.Tensor, int]:
    """Mix the chosen experts' outputs when ``experts`` holds this rank's L = E / ep_size experts.

    x [T, H]; weights [T, k] (x's dtype); indices [T, k] global expert ids -> ([T, H], rows this rank's
    experts ran, a load-balance figure). A collective over ``group``: every rank of it must call this
    once per layer forward, with any T (also 0), and run the backward alike (it exchanges rows too).
    """
    if ep_size == 1:
        return implementation(x, weights, indices, experts), indices.numel()
    top_k = indices.shape[1]
    num_local = experts.num_experts
    g = group_slots(indices, ep_size * num_local)  # slots by global expert, hence by destination rank
    received, sent_per_rank, received_per_rank = _exchange_counts(g.counts, ep_size, group)  # the host sync
    rows = _SlotRows.apply(x, g, top_k)  # [S, H], freed once sent
    total = sum(received_per_rank)
    inbox = all_to_all_single(rows.new_empty(total, rows.shape[1]), rows, received_per_rank, sent_per_rank, group)
    del rows
    local_expert = torch.arange(num_local, device=x.device).repeat(ep_size)
    local_expert = local_expert.repeat_interleave(received, output_size=total)
    outputs = implementation(inbox, inbox.new_ones(total, 1), local_expert[:, None], experts)
    if total == 0 and torch.is_grad_enabled():
        outputs = outputs + _zero_link(inbox, experts)
    back = all_to_all_single(outputs.new_empty(g.order.numel(), outputs.shape[1]), outputs, sent_per_rank,
                             received_per_rank, group)
    return _MixSlots.apply(back, weights, g), total
