"""Write tensors into a model's parameters by name, keeping account of what was filled.

Every key of the model (and every expert slice of a stacked expert tensor) must be written once
or more; every source tensor must land somewhere. What does not is collected, with file, name and
shape, so a conversion can report all problems at once instead of failing silently.
"""

from __future__ import annotations

import torch
from torch import nn

from .original_keys import Target

STACKED = (".mlp.experts.",)


class ConversionError(RuntimeError):
    """The checkpoint does not fit the model; the message lists every offending key."""


class StateWriter:
    """Fills ``model``'s state in place. ``row_prefix_keys`` may receive fewer rows than they have
    (vocabulary grown by the placeholder tokens); their remaining rows are set by the caller."""

    def __init__(self, model: nn.Module, row_prefix_keys: tuple[str, ...] = ()) -> None:
        self.state = model.state_dict(keep_vars=True)
        self.row_prefix_keys = row_prefix_keys
        self.filled: set[tuple[str, int | None]] = set()
        self.unmatched: list[str] = []
        self.mismatched: list[str] = []

    def _slot(self, target: Target) -> torch.Tensor | None:
        tensor = self.state.get(target.key)
        if tensor is None:
            return None
        if target.index is None:
            return tensor
        if not 0 <= target.index < tensor.shape[0]:
            return None
        return tensor[target.index]

    def _fits(self, dest: torch.Tensor, value: torch.Tensor, target: Target) -> bool:
        if target.key in self.row_prefix_keys and target.index is None:
            return value.dim() == dest.dim() and value.shape[1:] == dest.shape[1:] and value.shape[0] <= dest.shape[0]
        return value.shape == dest.shape

    def _locate(self, target: Target, shape: torch.Size, source: str) -> tuple[torch.Tensor | None, str]:
        """The destination tensor (None, recorded as unmatched, when the model has no such key) and a
        description of the write for messages."""
        dest = self._slot(target)
        where = f"{source} -> {target.key}" + ("" if target.index is None else f"[{target.index}]")
        if dest is None:
            self.unmatched.append(f"{where}: no such parameter in the model {tuple(shape)}")
        return dest, where

    @torch.no_grad()
    def write(self, target: Target, value: torch.Tensor, source: str) -> None:
        """Copy ``value`` into ``target`` (cast to the parameter's dtype)."""
        dest, where = self._locate(target, value.shape, source)
        if dest is None:
            return
        if not self._fits(dest, value, target):
            self.mismatched.append(f"{where}: checkpoint {tuple(value.shape)} vs model {tuple(dest.shape)}")
            return
        dest[: value.shape[0]].copy_(value.to(dest.dtype))
        self.filled.add((target.key, target.index))

    @torch.no_grad()
    def add(self, target: Target, delta: torch.Tensor, source: str) -> None:
        """Add an fp32 ``delta`` to an already written ``target`` (a LoRA merge)."""
        dest, where = self._locate(target, delta.shape, source)
        if dest is None:
            return
        if dest.shape != delta.shape:
            self.mismatched.append(f"{where}: LoRA delta {tuple(delta.shape)} vs model {tuple(dest.shape)}")
        elif not self.is_filled(target):
            self.mismatched.append(f"{where}: LoRA delta for a weight the base checkpoint did not provide")
        else:
            dest.copy_((dest.float() + delta).to(dest.dtype))

    def is_filled(self, target: Target) -> bool:
        """Whether ``target`` (or, for a whole stacked tensor, every expert slice of it) was written."""
        if (target.key, target.index) in self.filled:
            return True
        return target.index is None and self._is_stacked(target.key) and all(
            (target.key, i) in self.filled for i in range(self.state[target.key].shape[0])
        )

    def _is_stacked(self, key: str) -> bool:
        return any(s in key for s in STACKED)

    def missing(self, prefix: str = "") -> list[Target]:
        """Parameters under ``prefix`` never written, expert slices listed one by one."""
        out = []
        for key, tensor in self.state.items():
            if not key.startswith(prefix):
                continue
            if self._is_stacked(key):
                out += [Target(key, i) for i in range(tensor.shape[0]) if not self.is_filled(Target(key, i))]
            elif not self.is_filled(Target(key)):
                out.append(Target(key))
        return out

    def problems(self) -> list[str]:
        """Every unmatched, mismatched or missing entry as a line naming it and its shape."""
        lines = [f"unmatched: {u}" for u in self.unmatched] + [f"shape mismatch: {m}" for m in self.mismatched]
        for t in self.missing():
            shape = tuple(self._slot(t).shape)
            lines.append(f"missing: {t.key}" + ("" if t.index is None else f"[{t.index}]") + f" {shape}")
        return lines
