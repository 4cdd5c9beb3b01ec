"""The expert-parallel row exchange: this rank's own rows stay off the wire, and its experts run once on
the own and the received rows together.

Two autograd functions frame the expert implementation, which runs on ordinary autograd between them (so
activation checkpointing recomputes the layer once, like any other op): ``Dispatch`` sends the rows for
other ranks' experts (an asynchronous all-to-all straight into the inbox's tail) while it gathers the own
rows into its head; ``Return`` sends the outputs of the received rows home (into their places among the
sorted slots) while it copies the own outputs into theirs. Their backwards are the same exchanges of
gradients, the other way round. With a ``Refetch`` the experts keep no copy of the inbox for backward:
``Return``'s backward receives its rows once more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .segments import SlotGrouping
from .slot_kernels import token_sum


@dataclass
class ExchangePlan:
    """Which sorted slot rows go where (host ints, known after the counts exchange)."""

    group: dist.ProcessGroup | None
    own: slice  # sorted slot rows of this rank's own experts
    send: list[slice]  # the sorted slot rows sent, in rank order
    send_sizes: list[int]  # rows sent to each rank (0 to itself)
    recv_sizes: list[int]  # rows received from each rank (0 from itself)
    ids: torch.Tensor  # local expert id of each inbox row: own, received, padding (``padded_rows``)
    top_k: int

    @property
    def n_own(self) -> int:
        """Own rows: the head of the inbox."""
        return self.own.stop - self.own.start

    @property
    def rows(self) -> int:
        """Inbox rows: own + received, padded."""
        return self.ids.numel()

    @property
    def arrived(self) -> slice:
        """The received rows' place in the inbox, after the own rows."""
        return slice(self.n_own, self.n_own + sum(self.recv_sizes))


def padded_rows(rows: int, multiple: int = 128) -> int:
    """Inbox rows for ``rows`` routed rows: rounded up to ``multiple`` from ``multiple`` rows on. The dense
    GEMMs of the expert block (LoRA products over all inbox rows) then see a few recurring row counts
    instead of a new one every layer and step, each of which costs cuBLAS a fresh heuristic search on the
    host (measured at 0.2-3 ms a call on an H200, against an expert block of about 3 ms). The padding rows
    are zeros, their outputs are dropped and their gradients are zero."""
    return rows if rows < multiple else -(-rows // multiple) * multiple


def take(t: torch.Tensor, slices: list[slice]) -> torch.Tensor:
    """The rows of ``t`` at ``slices``, one after the other (a view when they are one block)."""
    return t[slices[0]] if len(slices) == 1 else torch.cat([t[s] for s in slices])


class Transfer:
    """One asynchronous all-to-all of rows (``async_op=True``: on CUDA a wait is a stream dependency, not a
    host block); received straight into ``into`` at ``slices`` when they are one block, else into a buffer
    copied there on :meth:`wait`."""

    def __init__(self, rows: torch.Tensor, out_sizes: list[int], in_sizes: list[int], group: dist.ProcessGroup | None,
                 into: torch.Tensor, slices: list[slice]) -> None:
        self.into, self.slices = into, slices
        direct = len(slices) == 1
        self.buffer = into[slices[0]] if direct else rows.new_empty(sum(out_sizes), rows.shape[1])
        self.copy_back = not direct
        self.work = dist.all_to_all_single(self.buffer, rows.contiguous(), out_sizes, in_sizes, group=group,
                                           async_op=True)

    def wait(self) -> None:
        self.work.wait()
        if self.copy_back:
            start = 0
            for s in self.slices:
                self.into[s] = self.buffer[start : start + s.stop - s.start]
                start += s.stop - s.start


def dispatch_rows(x: torch.Tensor, g: SlotGrouping, plan: ExchangePlan) -> torch.Tensor:
    """The inbox [own + received rows, H] of ``x`` [T, H]: the own sorted slot rows, then what the other ranks
    sent (grouped by source rank, then local expert), then zero padding. A collective over ``plan.group``."""
    inbox = x.new_empty(plan.rows, x.shape[1])
    send = Transfer(x[take(g.token, plan.send)], plan.recv_sizes, plan.send_sizes, plan.group,
                    inbox, [plan.arrived])
    torch.index_select(x, 0, g.token[plan.own], out=inbox[:plan.n_own])
    inbox[plan.arrived.stop :].zero_()
    send.wait()
    return inbox


_REFETCHED = object()  # what the saved-tensor hook keeps instead of the inbox


def _signature(t: torch.Tensor) -> tuple:
    return t.data_ptr(), t.shape, t.stride(), t.dtype, t.device


class Refetch:
    """Saved-tensor hooks (:meth:`hooks`) for the expert block of one layer: the inbox itself (not a view,
    not a cast) is kept as a marker, and backward hands out the rows received again by :meth:`fetch`, which
    ``Return``'s backward calls on every rank (it precedes the experts' backward), until ``Dispatch``'s
    backward releases them. Costs one more exchange of the inbox rows in backward, saves [rows, H]."""

    def __init__(self, x: torch.Tensor, g: SlotGrouping, plan: ExchangePlan) -> None:
        self.x, self.g, self.plan = x.detach(), g, plan
        self.key: tuple | None = None
        self.inbox: torch.Tensor | None = None

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> object:
        return _REFETCHED if self.key is not None and _signature(t) == self.key else t

    def _unpack(self, packed: object) -> torch.Tensor:
        if packed is not _REFETCHED:
            return packed
        if self.inbox is None:
            raise RuntimeError("the expert-parallel inbox was read in backward outside its layer's exchange "
                               "(between Return's and Dispatch's backward)")
        return self.inbox

    def fetch(self) -> None:
        self.inbox = dispatch_rows(self.x, self.g, self.plan)


class Dispatch(torch.autograd.Function):
    """x [T, H] -> inbox [own + received rows, H] (``dispatch_rows``); ``refetch`` learns which tensor the
    inbox is, and its refetched rows are released once this backward has run."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, g: SlotGrouping, plan: ExchangePlan, refetch: Refetch | None) -> torch.Tensor:
        inbox = dispatch_rows(x, g, plan)
        if refetch is not None:
            refetch.key = _signature(inbox)
        ctx.grouping, ctx.plan, ctx.refetch = g, plan, refetch
        return inbox

    @staticmethod
    def backward(ctx, grad_inbox: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        g, plan = ctx.grouping, ctx.plan
        if ctx.refetch is not None:
            ctx.refetch.inbox = None
        grad_inbox = grad_inbox.contiguous()
        grad_rows = grad_inbox.new_empty(g.token.numel(), grad_inbox.shape[1])
        back = Transfer(grad_inbox[plan.arrived], plan.send_sizes, plan.recv_sizes, plan.group, grad_rows,
                        plan.send)
        grad_rows[plan.own] = grad_inbox[:plan.n_own]
        back.wait()
        return token_sum(grad_rows, None, g, plan.top_k), None, None, None


class Return(torch.autograd.Function):
    """The experts' outputs of the inbox rows [own + received, H] -> the outputs of this rank's sorted slots
    [S, H] (``g``'s order)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, g: SlotGrouping, plan: ExchangePlan, refetch: Refetch | None) -> torch.Tensor:
        ys = out.new_empty(g.token.numel(), out.shape[1])
        back = Transfer(out[plan.arrived], plan.send_sizes, plan.recv_sizes, plan.group, ys, plan.send)
        ys[plan.own] = out[:plan.n_own]
        back.wait()
        ctx.plan, ctx.refetch = plan, refetch
        return ys

    @staticmethod
    def backward(ctx, grad_ys: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        plan = ctx.plan
        grad_ys = grad_ys.contiguous()
        grad_out = grad_ys.new_empty(plan.rows, grad_ys.shape[1])
        send = Transfer(take(grad_ys, plan.send), plan.recv_sizes, plan.send_sizes, plan.group, grad_out,
                        [plan.arrived])
        grad_out[:plan.n_own] = grad_ys[plan.own]
        grad_out[plan.arrived.stop :].zero_()
        if ctx.refetch is not None:
            ctx.refetch.fetch()  # queued behind the gradients' exchange
        send.wait()
        return grad_out, None, None, None
