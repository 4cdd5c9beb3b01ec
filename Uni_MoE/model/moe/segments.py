"""Token-slots sorted by expert, and exact segment matmuls over the sorted rows.

A slot is one (token, chosen expert) pair; S = T * k slots. Sorting them by expert once lets every
per-expert product run as one grouped GEMM (``grouped_mm``), with a padded ``bmm`` where this torch
build or dtype has no grouped kernel. Both give every expert exactly its own rows: no wasted FLOPs.
The frozen bases' wide products (``expert_products``) run instead as one GEMM per expert on its row slice
where the slices are long enough (``PER_EXPERT_MIN_SLOTS``, ``PER_EXPERT_MIN_ROWS``) to pay for the row
counts' copy to the host, made once per grouping.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import group_kernels

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
# From this many slot rows in all, and this many an expert on average, the frozen bases' products are one cuBLAS
# GEMM per expert: distinct-block steps at E = 4 and 8 were 1.7-9 % faster that way from 8,192 slot rows (4,096
# tokens, top-2; 1,024 rows an expert at E = 8) to 65,536, and 10-31 % slower at 4,096, where the host copy of the
# counts holds up the launches (setting_ab_h200.md).
PER_EXPERT_MIN_SLOTS = 8192
PER_EXPERT_MIN_ROWS = 1024


@dataclass
class SlotGrouping:
    """Token-slots sorted by expert; rows of sorted tensors follow ``order``."""

    order: torch.Tensor  # [S] flat slot id (t*k + j) of each sorted row
    inverse: torch.Tensor  # [S] sorted row of each flat slot
    token: torch.Tensor  # [S] token of each sorted row
    expert: torch.Tensor  # [S] expert of each sorted row (non-decreasing)
    counts: torch.Tensor  # [E] rows per expert
    offs: torch.Tensor  # [E] int32 end offset of each expert's rows
    host_counts: list[int] | None = None  # ``counts`` on the host, once ``counts_on_host`` copied them

    def counts_on_host(self) -> list[int]:
        """The rows per expert as Python ints: one device-to-host copy (a synchronisation) per grouping."""
        if self.host_counts is None:
            self.host_counts = self.counts.tolist()
        return self.host_counts


def group_slots(indices: torch.Tensor, num_experts: int) -> SlotGrouping:
    """Sort the [T, k] expert choices by expert (stable), with per-expert counts and end offsets (two Triton
    launches on CUDA, group_kernels.py; torch ops elsewhere)."""
    if group_kernels.usable(indices, num_experts):
        grouped = group_kernels.group(indices, num_experts)
        if grouped is not None:
            return SlotGrouping(*grouped)
    flat = indices.reshape(-1)
    expert, order = flat.sort(stable=True)
    ends = torch.searchsorted(expert, torch.arange(num_experts, device=flat.device), right=True)  # no host sync
    counts = ends.diff(prepend=ends.new_zeros(1))
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=flat.device))
    return SlotGrouping(order, inverse, order // indices.shape[1], expert, counts, ends.to(torch.int32))


@functools.lru_cache(maxsize=None)
def _grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this torch build runs ``grouped_mm`` for the device type and dtype (probed once)."""
    if _grouped_mm is None or (device_type == "cuda" and dtype != torch.bfloat16):
        return False
    try:
        a = torch.ones(4, 8, device=device_type, dtype=dtype)
        b = torch.ones(2, 8, 8, device=device_type, dtype=dtype)
        _grouped_mm(a, b, offs=torch.tensor([1, 4], device=device_type, dtype=torch.int32))
    except (RuntimeError, NotImplementedError):
        return False
    return True


def _aligned(t: torch.Tensor) -> bool:
    """grouped_mm needs 16-byte aligned strides and base pointers."""
    step = 16 // t.element_size()
    return t.data_ptr() % 16 == 0 and all(s % step == 0 for s, n in zip(t.stride(), t.shape) if s != 1 and n > 1)


def _use_grouped_mm(*tensors: torch.Tensor) -> bool:
    a = tensors[0]
    if not _grouped_mm_works(a.device.type, a.dtype) or any(t.dtype != a.dtype for t in tensors):
        return False
    return all(_aligned(t) for t in tensors)


def _row_positions(g: SlotGrouping) -> torch.Tensor:
    """[S] position of each sorted row within its expert's segment."""
    starts = g.offs.long() - g.counts
    return torch.arange(g.expert.numel(), device=g.expert.device) - starts[g.expert]


def _pad(rows: torch.Tensor, g: SlotGrouping, pos: torch.Tensor, width: int) -> torch.Tensor:
    """Sorted rows [S, D] -> [E, width, D], each expert's rows first, zeros after."""
    padded = rows.new_zeros(g.counts.numel(), width, rows.shape[1])
    return padded.index_put((g.expert, pos), rows)


def segment_mm(a: torch.Tensor, b: torch.Tensor, g: SlotGrouping) -> torch.Tensor:
    """Rows of a [S, K] (sorted by expert) times their expert's b [E, K, N] -> [S, N]."""
    if a.shape[0] == 0:
        return a.new_zeros(0, b.shape[-1])
    if _use_grouped_mm(a, b):
        return _grouped_mm(a, b, offs=g.offs)
    pos = _row_positions(g)
    return torch.bmm(_pad(a, g, pos, int(g.counts.max())), b)[g.expert, pos]


def segment_mm_tn(a: torch.Tensor, b: torch.Tensor, g: SlotGrouping) -> torch.Tensor:
    """Per expert, its rows' a [S, M] transposed times b [S, N] -> [E, M, N]; zero for empty experts."""
    num_experts = g.counts.numel()
    if a.shape[0] == 0:
        return a.new_zeros(num_experts, a.shape[1], b.shape[1])
    if _use_grouped_mm(a.t(), b):
        out = _grouped_mm(a.t(), b, offs=g.offs)
        return torch.where(g.counts[:, None, None] > 0, out, 0)  # some kernels leave empty groups unwritten
    pos = _row_positions(g)
    width = int(g.counts.max())
    return torch.bmm(_pad(a, g, pos, width).transpose(1, 2), _pad(b, g, pos, width))


def per_expert_pays(rows: int, g: SlotGrouping) -> bool:
    """Whether the frozen bases' products over ``rows`` sorted slot rows run as one GEMM per expert."""
    return rows >= max(PER_EXPERT_MIN_SLOTS, PER_EXPERT_MIN_ROWS * g.counts.numel())


def expert_products(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], g: SlotGrouping,
                    per_expert: bool | None = None) -> list[torch.Tensor]:
    """sum_i a_i [S, K_i] (sorted by expert) times the rows' expert's b_i [E, K_i, N], for the frozen bases:
    the grouped GEMM of each pair (``segment_mm``; their sum left to the caller), or, with ``per_expert``
    (by default where ``per_expert_pays``), one tensor from one GEMM per expert and pair, the pairs accumulated
    into the expert's rows."""
    first, weight = pairs[0]
    if not (per_expert_pays(first.shape[0], g) if per_expert is None else per_expert):
        return [segment_mm(a, b, g) for a, b in pairs]
    out = first.new_empty(first.shape[0], weight.shape[-1])
    start = 0
    for e, n in enumerate(g.counts_on_host()):
        if n:
            rows = slice(start, start + n)
            torch.mm(first[rows], weight[e], out=out[rows])
            for a, b in pairs[1:]:
                out[rows].addmm_(a[rows], b[e])
        start += n
    return [out]
