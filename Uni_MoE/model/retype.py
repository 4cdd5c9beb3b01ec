"""Swapping a module class for a subclass in place, the way the fused layers replace transformers' and PEFT's."""

from __future__ import annotations

from torch import nn


def retype_modules(root: nn.Module, old: type[nn.Module], new: type[nn.Module]) -> int:
    """Give every module inside ``root`` whose type is exactly ``old`` the class ``new`` (a subclass that adds
    no state: parameters, buffers, hooks and state-dict keys stay as they are); returns how many."""
    if not issubclass(new, old):
        raise TypeError(f"{new.__name__} must subclass {old.__name__}")
    count = 0
    for sub in root.modules():
        if type(sub) is old:
            sub.__class__ = new
            count += 1
    return count
