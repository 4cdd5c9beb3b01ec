"""Mixture-of-experts layer: router, stacked experts, and interchangeable expert implementations."""

from .experts import MoEExperts
from .implementations import EXPERT_IMPLEMENTATIONS, resolve_expert_implementation
from .layer import MoELayer
from .reference import experts_reference
from .router import balance_loss, route_tokens

__all__ = [
    "EXPERT_IMPLEMENTATIONS",
    "MoEExperts",
    "MoELayer",
    "balance_loss",
    "experts_reference",
    "resolve_expert_implementation",
    "route_tokens",
]
