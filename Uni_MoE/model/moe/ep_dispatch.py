"""Dropless expert-parallel dispatch: each token-slot travels to the rank holding its expert, and only
routed rows move.

With ``ep_size`` ranks of L experts each (global expert e lives on rank e // L as local expert e % L),
every rank sorts its [T, k] slots by expert, tells every other rank how many rows it will send for each
of that rank's experts (one small all-to-all of counts, then one host sync for the split sizes), and
sends only the rows for other ranks' experts, gathering its own rows meanwhile; its experts run once on
both (``ep_merged``), and the outputs come back the same way. The routing weights are applied back on the
token's own rank, so only hidden-size rows cross. No capacity, no padding, no dropped token: the function
is the local layer's for any routing. With ``recompute_projections`` the experts keep no copy of the received
rows for backward (``ep_merged.Refetch``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .ep_merged import Dispatch, ExchangePlan, Refetch, Return, padded_rows, take
from .experts import MoEExperts
from .implementations import ExpertFn
from .router import in_backward
from .segments import SlotGrouping, group_slots
from .slot_kernels import combine, slot_grads


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
    """0, depending on the received rows and every trainable expert tensor: a rank whose experts ran no row
    (or whose implementation returned no graph for none) still takes part in the backward's exchanges."""
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
    both = torch.cat([counts, received]).tolist()  # one copy to the host: sent, then received, per expert
    per = len(both) // (2 * ep_size)
    sums = [sum(both[i : i + per]) for i in range(0, len(both), per)]
    return received, sums[:ep_size], sums[ep_size:]


@dataclass
class CountsMemo:
    """One layer's last training-forward count exchange, for the backward's recompute of that forward under
    activation checkpointing: the same routing sends the same counts, so the recompute skips the exchange
    and its host sync. Used once; a recompute whose counts differ stops with a device-side assertion."""

    counts: torch.Tensor | None = None
    exchange: tuple[torch.Tensor, list[int], list[int]] | None = None


def _exchange_or_reuse_counts(counts: torch.Tensor, ep_size: int, group: dist.ProcessGroup,
                              memo: CountsMemo | None) -> tuple[torch.Tensor, list[int], list[int]]:
    """``_exchange_counts``, or in a checkpoint's recompute the memo of the forward it repeats."""
    if memo is not None and in_backward():
        saved, exchange = memo.counts, memo.exchange
        memo.counts = memo.exchange = None
        if saved is not None:
            torch._assert_async((saved == counts).all(), "expert-parallel recompute routed differently from its "
                                "forward (a checkpointed layer run twice before one backward?)")
            return exchange
        return _exchange_counts(counts, ep_size, group)
    exchange = _exchange_counts(counts, ep_size, group)
    if memo is not None:
        memo.counts, memo.exchange = counts, exchange
    return exchange


def _plan(g: SlotGrouping, received: torch.Tensor, sent: list[int], got: list[int], rank: int, num_local: int,
          top_k: int, group: dist.ProcessGroup | None) -> ExchangePlan:
    """Where the sorted slot rows go (one block per destination rank, as they are sorted by expert) and the
    local expert of each inbox row: the own rows, then the received ones grouped by (source rank, local
    expert), ``received`` [ep_size * L] counting them, then the padding (expert 0)."""
    ep_size = len(sent)
    first = [sum(sent[:d]) for d in range(ep_size)]
    arrived = [sum(got[:s]) for s in range(ep_size)]
    local = torch.arange(num_local, device=received.device).repeat(ep_size)
    local = local.repeat_interleave(received, output_size=sum(got))  # local expert of each received row
    remote = [d for d in range(ep_size) if d != rank]
    send = [slice(first[d], first[d] + sent[d]) for d in remote]
    send_sizes = [sent[d] if d != rank else 0 for d in range(ep_size)]
    recv_sizes = [got[d] if d != rank else 0 for d in range(ep_size)]
    own_ids = local[arrived[rank] : arrived[rank] + got[rank]]
    recv_ids = take(local, [slice(arrived[d], arrived[d] + got[d]) for d in remote])
    ids = torch.cat([own_ids, recv_ids, local.new_zeros(padded_rows(sum(got)) - sum(got))])
    own = slice(first[rank], first[rank] + sent[rank])
    return ExchangePlan(group, own, send, send_sizes, recv_sizes, ids, top_k)


def _refetch(x: torch.Tensor, g: SlotGrouping, plan: ExchangePlan, experts: MoEExperts) -> Refetch | None:
    """With ``recompute_projections`` in a training forward: the inbox is not kept for backward but received
    again there (``Refetch``). Not under other saved-tensor hooks (activation checkpointing keeps nothing of
    the layer anyway), and not for an empty inbox."""
    if not (experts.recompute_projections and torch.is_grad_enabled() and plan.rows > 0):
        return None
    outer_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)  # torch has no public query
    if outer_hooks is None or outer_hooks(False) is not None:
        return None
    return Refetch(x, g, plan)


def expert_parallel_mix(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: MoEExperts,
                        implementation: ExpertFn, ep_size: int, group: dist.ProcessGroup | None,
                        memo: CountsMemo | None = None) -> tuple[torch.Tensor, int]:
    """Mix the chosen experts' outputs when ``experts`` holds this rank's L = E / ep_size experts.

    x [T, H]; weights [T, k] (x's dtype); indices [T, k] global expert ids -> ([T, H], rows this rank's
    experts ran, a load-balance figure). A collective over ``group``: every rank of it must call this
    once per layer forward, with any T (also 0), and run the backward alike (it exchanges rows too).
    ``memo`` (training) lets a checkpoint's recompute of this forward reuse its count exchange.
    """
    if ep_size == 1:
        return implementation(x, weights, indices, experts), indices.numel()
    top_k = indices.shape[1]
    num_local = experts.num_experts
    g = group_slots(indices, ep_size * num_local)  # slots by global expert, hence by destination rank
    received, sent, got = _exchange_or_reuse_counts(g.counts, ep_size, group, memo)  # the host sync, once per step
    plan = _plan(g, received, sent, got, dist.get_rank(group), num_local, top_k, group)
    refetch = _refetch(x, g, plan, experts)
    inbox = Dispatch.apply(x, g, plan, refetch)
    with refetch.hooks() if refetch is not None else contextlib.nullcontext():
        out = implementation(inbox, inbox.new_ones(inbox.shape[0], 1), plan.ids[:, None], experts)
    if torch.is_grad_enabled() and (inbox.shape[0] == 0 or not out.requires_grad):
        out = out + _zero_link(inbox, experts)  # every rank must run the backward's exchanges
    ys = Return.apply(out, g, plan, refetch)
    return _MixSlots.apply(ys, weights, g), sum(got)
