"""Optimizer parameter groups for DeepSpeed-MoE experts: DeepSpeed reduces expert gradients over the
expert-data-parallel ranks only, so expert parameters go into groups of their own, flagged as DeepSpeed
flags them when it builds the experts."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..model.moe.deepspeed_backend import DeepSpeedMoELayer


def moe_param_groups(param_groups: list[dict[str, Any]] | list[nn.Parameter]) -> list[dict[str, Any]]:
    """Optimizer groups with expert parameters moved into DeepSpeed-MoE groups (``moe=True``), which
    DeepSpeed requires to reduce expert gradients over the expert-data-parallel group only. A plain
    parameter list is one group; groups without a ``name`` are named ``group<i>`` (DeepSpeed keys its
    MoE groups by name)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    if param_groups and isinstance(param_groups[0], torch.Tensor):
        param_groups = [{"params": list(param_groups)}]
    named = [{"name": f"group{i}", **group} for i, group in enumerate(param_groups)]
    return split_params_into_different_moe_groups_for_optimizer(named)


def mark_expert_parameters(model: nn.Module) -> int:
    """Flag every DeepSpeed-MoE expert parameter as DeepSpeed does when it builds the experts
    (``allreduce=False``, ``group_name``); loading that replaces parameters (transformers'
    ``from_pretrained`` materialising them from the meta device) drops the flags. Returns the count."""
    count = 0
    for layer in (m for m in model.modules() if isinstance(m, DeepSpeedMoELayer)):
        for param in layer.local_experts().parameters():
            param.allreduce = False
            param.group_name = layer.moe.expert_group_name
            count += 1
    return count


def with_moe_param_groups(optimizer_cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """A subclass of ``optimizer_cls`` that passes its parameter groups through :func:`moe_param_groups`."""

    class MoEGroupedOptimizer(optimizer_cls):  # type: ignore[valid-type, misc]
        def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(moe_param_groups(list(params)), *args, **kwargs)

    MoEGroupedOptimizer.__name__ = MoEGroupedOptimizer.__qualname__ = f"MoEGrouped{optimizer_cls.__name__}"
    return MoEGroupedOptimizer
