"""The reference MoE expert computation: a per-expert loop, the ground truth for faster paths."""

from __future__ import annotations

import torch

from .experts import MoEExperts


def experts_reference(
    x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: MoEExperts
) -> torch.Tensor:
    """Mix the chosen experts' outputs.

    x [T, H]; weights [T, k] (x's dtype); indices [T, k] -> [T, H].
    For each expert, gather the tokens routed to it, run it, and add its weighted output back.
    """
    out = torch.zeros_like(x)
    for e in range(experts.num_experts):
        token, slot = torch.where(indices == e)
        if token.numel() == 0:
            continue
        y = experts.expert_forward(e, x[token]) * weights[token, slot, None]
        out.index_add_(0, token, y)
    return out
