"""One rank's DeepSpeed-MoE experts seen as a single stacked MoEExperts, so a batched expert
implementation runs them all in one call.

DeepSpeed-MoE keeps every local expert as its own module (``deepspeed_experts.<b>``, each parameter
[1, ...]), which fixes the parameter names and checkpoint files. Frozen base weights are packed once into
one [L, ...] tensor per projection with every expert's parameter a view of its slice, so the stacked
view costs no copy; packing is redone whenever something (a dtype cast, a device move, loading onto the
meta device and materialising) gave the parameters storage of their own. Trainable parameters (LoRA, or
bases being trained) are concatenated each forward instead, a differentiable copy that leaves their
storage to the optimizer (ZeRO flattens it).
"""

from __future__ import annotations

import torch
from torch import nn

from .experts import MoEExperts

BASES = ("gate_proj", "up_proj", "down_proj")


def _stacked_views(params: list[torch.Tensor]) -> torch.Tensor | None:
    """The [L, ...] tensor whose consecutive slices ``params`` ([1, ...] each) are, or None."""
    first = params[0]
    if first.device.type == "meta" or not first.is_contiguous():
        return None
    step = first.numel()
    storage = first.untyped_storage().data_ptr()
    for b, p in enumerate(params):
        same_kind = p.dtype == first.dtype and p.device == first.device and p.shape == first.shape
        in_place = p.untyped_storage().data_ptr() == storage and p.storage_offset() == first.storage_offset() + b * step
        if not (same_kind and p.is_contiguous() and in_place):
            return None
    return first.detach().as_strided((len(params), *first.shape[1:]), (step, *first.stride()[1:]),
                                     first.storage_offset())


@torch.no_grad()
def _pack(params: list[nn.Parameter]) -> torch.Tensor:
    """Copy ``params`` into one new [L, ...] tensor and make each parameter a view of its slice."""
    with torch.inference_mode(False):
        stacked = torch.cat([p.detach() for p in params])
    for b, p in enumerate(params):
        p.data = stacked[b : b + 1]
    return stacked


def stacked_tensor(params: list[nn.Parameter]) -> torch.Tensor:
    """``params`` stacked along dim 0: a differentiable concatenation if any takes a gradient, else the
    zero-copy view of their packed storage (packing them first when needed)."""
    if any(p.requires_grad for p in params):
        return torch.cat(list(params))
    stacked = _stacked_views(params)
    return stacked if stacked is not None else _pack(params)


class StackedExperts:
    """A MoEExperts whose tensors are those of ``experts`` (a ModuleList of one-expert MoEExperts),
    refreshed by :meth:`view` before each use. It is not a submodule: it owns no parameters."""

    def __init__(self, experts: nn.ModuleList) -> None:
        one = experts[0]
        with torch.device("meta"):
            self.template = MoEExperts(len(experts), one.hidden_size, one.intermediate_size, one.hidden_act, "mlp",
                                       one.lora_r, 1, 0.0)
        self.template.lora_scaling = one.lora_scaling
        self.template.lora_dropout = one.lora_dropout
        self.names = BASES + tuple(name for name, _ in self.template.named_parameters() if name not in BASES)
        for name in self.names:
            del self.template._parameters[name]

    def pack(self, experts: nn.ModuleList) -> None:
        """Pack the frozen bases now (after a dtype or device move) rather than in the next forward."""
        for name in BASES:
            params = [getattr(e, name) for e in experts]
            if params[0].device.type != "meta" and not any(p.requires_grad for p in params):
                stacked_tensor(params)

    def view(self, experts: nn.ModuleList, training: bool) -> MoEExperts:
        """The stacked experts as they are now (the same object each call, tensors replaced)."""
        for name in self.names:
            setattr(self.template, name, stacked_tensor([getattr(e, name) for e in experts]))
        self.template.training = training
        self.template.recompute_projections = experts[0].recompute_projections
        return self.template
