"""Where one training step's GPU memory goes, and how often it makes the host wait for the GPU.

``measure_step`` runs one forward and backward and reports: what was resident before (weights, gradients,
optimizer state), what the forward left allocated for the backward (split by module kind via forward
hooks: the memory each kind's forwards left behind), the forward's and the backward's peaks above the
resident memory, and the synchronising CUDA calls of both (torch's sync debug mode).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

GB = 2**30


@dataclass
class StepMemory:
    """One step's memory (GiB) on one device, and its host synchronisations."""

    resident_gb: float = 0.0  # allocated before the forward
    saved_gb: float = 0.0  # allocated after the forward, above resident: kept for the backward (and the loss)
    saved_by_kind_gb: dict[str, float] = field(default_factory=dict)  # of saved: left behind by each module kind
    forward_peak_gb: float = 0.0  # peak during the forward, above resident
    backward_peak_gb: float = 0.0  # peak during the backward, above resident
    host_syncs: int = 0  # synchronising CUDA calls in the forward and the backward


def _hook_kinds(modules: dict[str, list[nn.Module]], device: torch.device, out: dict[str, float]) -> list:
    """Forward hooks adding, per kind, the allocation each module's forward left behind."""
    handles = []
    for kind, mods in modules.items():
        out[kind] = 0.0
        for module in mods:
            before: list[int] = []

            def pre(_m, _a, before=before) -> None:
                before.append(torch.cuda.memory_allocated(device))

            def post(_m, _a, _o, before=before, kind=kind) -> None:
                out[kind] += (torch.cuda.memory_allocated(device) - before.pop()) / GB

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def measure_step(loss_fn: Callable[[], torch.Tensor], modules: dict[str, list[nn.Module]],
                 device: torch.device) -> StepMemory:
    """Run ``loss_fn()`` and its backward once on ``device`` (CUDA); ``modules`` names the kinds to split
    the saved memory by. Gradients are left for the caller to clear."""
    res = StepMemory()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    res.resident_gb = base / GB
    handles = _hook_kinds(modules, device, res.saved_by_kind_gb)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                loss = loss_fn()
                res.saved_gb = (torch.cuda.memory_allocated(device) - base) / GB
                res.forward_peak_gb = (torch.cuda.max_memory_allocated(device) - base) / GB
                torch.cuda.reset_peak_memory_stats(device)
                loss.backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize(device)
        res.host_syncs = sum("synchroniz" in str(w.message) for w in caught)
    finally:
        for handle in handles:
            handle.remove()
    res.backward_peak_gb = (torch.cuda.max_memory_allocated(device) - base) / GB
    return res
