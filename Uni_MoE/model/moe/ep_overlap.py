"""The expert-parallel row exchange with the experts computing while rows travel, forward and backward
(``UNI_MOE_EP_PIECES`` > 0 in training; the shared plan and transfers of every mode live here too).

Rows (token-slots sorted by global expert) for this rank's own experts never leave it; the rows for each
other rank are cut into ``UNI_MOE_EP_PIECES`` pieces, each one asynchronous all-to-all (``async_op=True``:
on CUDA a wait is a stream dependency, not a host block). Forward: all pieces are sent, the own rows run through the
experts while they travel, then each received piece runs and is sent back while the next one runs.
Backward, the same with gradients: the output gradients of the sent rows travel while the own rows'
backward runs, and each piece's input gradient goes home while the next piece's backward runs. Only the
last return trip is exposed. Each piece runs the configured expert implementation on its own autograd
graph (built inside the forward, replayed by ``torch.autograd.grad`` in the backward); the function keeps
the ends of those graphs, not their tensors, so activation checkpointing still frees them, but each such
nested backward is a graph task of its own, for which a non-reentrant checkpoint recomputes the layer once
more (three forwards per step instead of two).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch.autograd.graph import get_gradient_edge

from .experts import MoEExperts
from .segments import SlotGrouping
from .slot_kernels import token_sum

RunExperts = Callable[[torch.Tensor, torch.Tensor, MoEExperts], torch.Tensor]  # (rows, local expert ids, experts)


@dataclass
class ExchangePlan:
    """Which sorted slot rows go where (host ints, known after the counts exchange), per piece."""

    group: dist.ProcessGroup | None
    own: slice  # sorted slot rows of this rank's own experts
    own_ids: torch.Tensor  # [rows] their local expert ids (non-decreasing)
    send: list[list[slice]]  # per piece: the sorted slot rows sent, in rank order
    send_sizes: list[list[int]]  # per piece: rows sent to each rank (0 to itself)
    recv_sizes: list[list[int]]  # per piece: rows received from each rank (0 from itself)
    recv_ids: list[torch.Tensor]  # per piece: local expert id of each received row
    top_k: int
    merged: bool  # one expert call on the own rows and the (single) received piece (``ep_merged``)


def take(t: torch.Tensor, slices: list[slice]) -> torch.Tensor:
    """The rows of ``t`` at ``slices``, one after the other (a view when they are one block)."""
    return t[slices[0]] if len(slices) == 1 else torch.cat([t[s] for s in slices])


class Transfer:
    """One asynchronous all-to-all of rows; received straight into ``into`` at ``slices`` when they are one
    block, else into a buffer copied there on :meth:`wait`."""

    def __init__(self, rows: torch.Tensor, out_sizes: list[int], in_sizes: list[int], group: dist.ProcessGroup | None,
                 into: torch.Tensor | None = None, slices: list[slice] | None = None) -> None:
        self.into, self.slices = into, slices
        direct = into is not None and len(slices) == 1
        self.buffer = into[slices[0]] if direct else rows.new_empty(sum(out_sizes), rows.shape[1])
        self.copy_back = into is not None and not direct
        self.work = dist.all_to_all_single(self.buffer, rows.contiguous(), out_sizes, in_sizes, group=group,
                                           async_op=True)

    def wait(self) -> torch.Tensor:
        self.work.wait()
        if self.copy_back:
            start = 0
            for s in self.slices:
                self.into[s] = self.buffer[start : start + s.stop - s.start]
                start += s.stop - s.start
        return self.buffer


class _Sink(torch.autograd.Function):
    """Identity on rows that hands their gradient to ``holder``: the piece's graph starts here without a leaf
    that would keep the rows alive (``anchor``, an empty tensor, makes the output take a gradient)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, anchor: torch.Tensor, holder: list) -> torch.Tensor:
        ctx.holder = holder
        return rows.view_as(rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        ctx.holder.append(grad)
        return None, grad.new_empty(0), None


class _Piece:
    """The experts run on one block of rows (``run`` takes their order) on a graph of their own, whose end
    it keeps to replay in :meth:`backward` (``leaves``: the detached trainable expert tensors)."""

    def __init__(self, rows: torch.Tensor, ids: torch.Tensor, run: RunExperts, experts: MoEExperts,
                 out_dtype: torch.dtype, leaves: list[torch.Tensor], rows_grad: bool) -> None:
        self.rows, self.edge, self.anchor, self.holder = rows.shape[0], None, None, []
        if rows.shape[0] == 0:
            self.out = rows.new_zeros(0, rows.shape[1], dtype=out_dtype)
            return
        with torch.enable_grad():
            if rows_grad:
                self.anchor = rows.new_empty(0).requires_grad_()
                rows = _Sink.apply(rows, self.anchor, self.holder)
            out = run(rows, ids, experts).to(out_dtype)
        self.edge = get_gradient_edge(out) if out.requires_grad else None
        self.out = out.detach()

    def backward(self, grad: torch.Tensor, leaves: list[torch.Tensor]) -> tuple[torch.Tensor | None, list]:
        """(the rows' gradient or None, the leaves' gradients, None where unused)."""
        inputs = leaves + ([self.anchor] if self.anchor is not None else [])
        if self.edge is None or not inputs:
            return None, [None] * len(leaves)
        grads = torch.autograd.grad([self.edge], inputs, grad_outputs=[grad], allow_unused=True)
        return (self.holder.pop() if self.holder else None), list(grads[: len(leaves)])


def _with_tensors(experts: MoEExperts, tensors: dict[str, torch.Tensor]) -> MoEExperts:
    """A shallow copy of ``experts`` whose named tensors are replaced (the original is left alone)."""
    clone = copy.copy(experts)
    clone._parameters = {k: v for k, v in experts._parameters.items() if k not in tensors}
    clone.__dict__.update(tensors)
    return clone


def _add(total: list, grads: list) -> list:
    return [g if t is None else t if g is None else t + g for t, g in zip(total, grads)]


class OverlappedExperts(torch.autograd.Function):
    """x [T, H] -> the experts' outputs of the sorted slots [S, H] (``g``'s order), with this rank's experts
    computing while the other ranks' rows travel (in training). ``tensors`` are the experts' trainable
    tensors, named by ``names``; their gradients (summed over every piece) and x's come back from the
    backward. ``run`` runs the experts on a piece's rows (the own rows, then each received piece)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, g: SlotGrouping, plan: ExchangePlan, run: RunExperts,
                experts: MoEExperts,
                out_dtype: torch.dtype, names: tuple[str, ...], *tensors: torch.Tensor) -> torch.Tensor:
        leaves = [t.detach().requires_grad_() for t in tensors]
        local = _with_tensors(experts, dict(zip(names, leaves)))
        rows_grad = x.requires_grad
        ys = x.new_empty(g.token.numel(), x.shape[1], dtype=out_dtype)
        sends = [Transfer(x[take(g.token, s)], plan.recv_sizes[c], plan.send_sizes[c], plan.group)
                 for c, s in enumerate(plan.send)]
        own = _Piece(x[g.token[plan.own]], plan.own_ids, run, local, out_dtype, leaves, rows_grad)
        ys[plan.own] = own.out
        pieces, returns = [], []
        for c, send in enumerate(sends):
            pieces.append(_Piece(send.wait(), plan.recv_ids[c], run, local, out_dtype, leaves, rows_grad))
            returns.append(Transfer(pieces[-1].out, plan.send_sizes[c], plan.recv_sizes[c], plan.group, ys,
                                    plan.send[c]))
        for r in returns:
            r.wait()
        for piece in [own, *pieces]:
            piece.out = None
        ctx.own, ctx.pieces, ctx.leaves, ctx.plan, ctx.grouping = own, pieces, leaves, plan, g
        ctx.x_dtype = x.dtype
        return ys

    @staticmethod
    def backward(ctx, grad_ys: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        plan, leaves, g = ctx.plan, ctx.leaves, ctx.grouping
        need_x = ctx.needs_input_grad[0]
        grad_ys = grad_ys.contiguous()
        width, dtype = grad_ys.shape[1], ctx.x_dtype
        grad_rows = grad_ys.new_empty(g.token.numel(), width, dtype=dtype) if need_x else None
        sends = [Transfer(take(grad_ys, s), plan.recv_sizes[c], plan.send_sizes[c], plan.group)
                 for c, s in enumerate(plan.send)]
        grad_own, totals = ctx.own.backward(grad_ys[plan.own], leaves)
        if need_x:
            grad_rows[plan.own] = 0 if grad_own is None else grad_own
        returns = []
        for c, (send, piece) in enumerate(zip(sends, ctx.pieces)):
            grad_in, grads = piece.backward(send.wait(), leaves)
            totals = _add(totals, grads)
            if need_x:
                grad_in = grad_in if grad_in is not None else grad_ys.new_zeros(piece.rows, width, dtype=dtype)
                returns.append(Transfer(grad_in, plan.send_sizes[c], plan.recv_sizes[c], plan.group, grad_rows,
                                        plan.send[c]))
        for r in returns:
            r.wait()
        grad_x = token_sum(grad_rows, None, g, plan.top_k) if need_x else None
        totals = [torch.zeros_like(leaf) if t is None else t for t, leaf in zip(totals, leaves)]  # ran no row: 0
        return grad_x, None, None, None, None, None, None, *totals
