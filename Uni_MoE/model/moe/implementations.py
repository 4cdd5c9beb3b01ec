"""The expert implementations a MoE layer can run, as one literal table (``moe_implementation``).

Each entry computes the same function ``fn(x [T, H], weights [T, k], indices [T, k], experts) -> [T, H]``;
tests/test_moe_grouped.py checks every fast path against the reference loop, outputs and gradients.
"""

from __future__ import annotations

from typing import Callable

import torch

from .chosen import experts_chosen
from .decode import experts_all_dense
from .experts import MoEExperts
from .grouped import experts_grouped
from .reference import experts_reference

ExpertFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, MoEExperts], torch.Tensor]
EXPERT_IMPLEMENTATIONS: dict[str, ExpertFn] = {
    "reference": experts_reference,  # a clear loop over experts: the oracle
    "grouped": experts_grouped,  # batched over experts: grouped GEMMs, no per-expert loop
    "all_dense": experts_all_dense,  # every expert on every token, no host synchronisation: decoding steps
    "chosen": experts_chosen,  # only the chosen experts, no host synchronisation: the smallest decoding steps
}
SYNC_FREE = frozenset({"all_dense", "chosen"})  # no host synchronisation: a CUDA graph can capture them
DECODE_TOKENS = 64  # up to this many tokens without gradient, "auto" takes a sync-free decoding path


def resolve_expert_implementation(name: str, num_tokens: int | None = None, experts: MoEExperts | None = None,
                                  top_k: int | None = None) -> ExpertFn:
    """The named implementation. ``auto``: the grouped one, except without gradient for up to
    ``DECODE_TOKENS`` tokens (decoding steps), where a path with no host synchronisation runs, so a
    decoding step can be captured in a CUDA graph (benchmarks/generation.py): the chosen-expert one while
    the token-expert pairs are at most 3/4 of the distinct expert MLPs (given ``experts`` and ``top_k``),
    else the all-expert one. On an H200 its kernels stream weights at ~3.3 TB/s and the all-expert
    batched GEMMs at ~3.9, so reading fewer experts pays only below about 0.85 E pairs: one token of
    top-2 over 4 experts took 0.17 ms against 0.28, two tokens 0.31 against 0.28
    (benchmarks/results/decode_profile_h200.md)."""
    if name == "auto":
        decoding = num_tokens is not None and num_tokens <= DECODE_TOKENS and not torch.is_grad_enabled()
        few = experts is not None and top_k is not None and num_tokens is not None and experts.num_bases > 1 \
            and 4 * num_tokens * top_k <= 3 * experts.num_bases
        name = ("chosen" if few else "all_dense") if decoding else "grouped"  # decoding: one of SYNC_FREE
    if name not in EXPERT_IMPLEMENTATIONS:
        raise ValueError(f"unknown moe_implementation {name!r}; available: {sorted(EXPERT_IMPLEMENTATIONS)}")
    return EXPERT_IMPLEMENTATIONS[name]
