"""Mixture-of-experts layer: router, stacked experts, and interchangeable expert implementations."""

from . import decode, grouped  # noqa: F401  (register the "all_dense" and "grouped" implementations)
from .experts import MoEExperts
from .layer import MoELayer, register_expert_implementation, resolve_expert_implementation
from .reference import experts_reference
from .router import balance_loss, route_tokens

__all__ = [
    "MoEExperts",
    "MoELayer",
    "balance_loss",
    "experts_reference",
    "register_expert_implementation",
    "resolve_expert_implementation",
    "route_tokens",
]
