"""The expert implementations a MoE layer can run, as one literal table (``moe_implementation``).

Each entry computes the same function ``fn(x [T, H], weights [T, k], indices [T, k], experts) -> [T, H]``;
tests/test_moe_grouped.py checks every fast path against the reference loop, outputs and gradients.
"""

from __future__ import annotations

from typing import Callable

import torch

from .decode import experts_all_dense
from .experts import MoEExperts
from .grouped import experts_grouped
from .reference import experts_reference

ExpertFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, MoEExperts], torch.Tensor]
EXPERT_IMPLEMENTATIONS: dict[str, ExpertFn] = {
    "reference": experts_reference,  # a clear loop over experts: the oracle
    "grouped": experts_grouped,  # batched over experts: grouped GEMMs, no per-expert loop
    "all_dense": experts_all_dense,  # every expert on every token, no host synchronisation: decoding steps
}
DECODE_TOKENS = 64  # up to this many tokens without gradient, "auto" computes every expert densely


def resolve_expert_implementation(name: str, num_tokens: int | None = None) -> ExpertFn:
    """The named implementation. ``auto``: the grouped one, except without gradient for up to
    ``DECODE_TOKENS`` tokens (decoding steps), where the all-expert dense path runs with no host
    synchronisation, so a decoding step can be captured in a CUDA graph (benchmarks/generation.py)."""
    if name == "auto":
        decoding = num_tokens is not None and num_tokens <= DECODE_TOKENS and not torch.is_grad_enabled()
        name = "all_dense" if decoding else "grouped"
    if name not in EXPERT_IMPLEMENTATIONS:
        raise ValueError(f"unknown moe_implementation {name!r}; available: {sorted(EXPERT_IMPLEMENTATIONS)}")
    return EXPERT_IMPLEMENTATIONS[name]
