"""Write tensors into a model's parameters by name, keeping account of what was filled.

Every key of the model (and every expert slice of a stacked expert tensor) must be written once
or more; every source tensor must land somewhere. What does not is collected, with file, name and
shape, so a conversion can report all problems at once instead of failing silently.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .original_keys import Target

STACKED = (".mlp.experts.",)


class ConversionError(RuntimeError):
    """The checkpoint does not fit the model; the message lists every offending key."""


class StateWriter:
    """Fills ``model``'s state in place. ``vocab_rows[key]`` is the exact row count a checkpoint gives
    ``key`` (the release's vocabulary); the model's further rows (the added placeholder tokens) become the
    mean of those rows: inputs there are replaced by media features, and the mean keeps them unlikely outputs.

    LoRA deltas staged with ``stage_delta`` are added in float32 to every write of their weight until
    ``end_merge``, so the merged weight is cast to the model's dtype once.
    """

    def __init__(self, model: nn.Module, vocab_rows: dict[str, int] | None = None) -> None:
        self.state = model.state_dict(keep_vars=True)
        self.vocab_rows = vocab_rows or {}
        self.filled: set[tuple[str, int | None]] = set()
        self.unmatched: list[str] = []
        self.mismatched: list[str] = []
        self.staged: dict[tuple[str, int | None], tuple[Callable[[], torch.Tensor], str]] = {}
        self.merged: set[tuple[str, int | None]] = set()

    def _slot(self, target: Target) -> torch.Tensor | None:
        tensor = self.state.get(target.key)
        if tensor is None:
            return None
        if target.index is None:
            return tensor
        if not 0 <= target.index < tensor.shape[0]:
            return None
        return tensor[target.index]

    def _expected_shape(self, dest: torch.Tensor, target: Target) -> tuple[int, ...]:
        if target.key in self.vocab_rows and target.index is None:
            return (self.vocab_rows[target.key], *dest.shape[1:])
        return tuple(dest.shape)

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
        expected = self._expected_shape(dest, target)
        if tuple(value.shape) != expected:
            model = f"model {expected}" if expected == tuple(dest.shape) else (
                f"{expected} from the release's vocab_size {expected[0]} (model {tuple(dest.shape)} with placeholders)"
            )
            self.mismatched.append(f"{where}: checkpoint {tuple(value.shape)} vs {model}")
            return
        slot = (target.key, target.index)
        if slot in self.staged:
            value = value.float() + self.staged[slot][0]()
            self.merged.add(slot)
        dest[: value.shape[0]].copy_(value.to(dest.dtype))
        if target.key in self.vocab_rows:
            dest[value.shape[0]:] = value.float().mean(dim=0).to(dest.dtype)
        self.filled.add(slot)

    def stage_delta(
        self, target: Target, delta: Callable[[], torch.Tensor], shape: tuple[int, ...], source: str
    ) -> None:
        """Add the float32 ``delta()`` (a LoRA merge, of ``shape``) to each write of ``target`` until
        ``end_merge``."""
        dest, where = self._locate(target, shape, source)
        if dest is None:
            return
        if tuple(shape) != tuple(dest.shape):
            self.mismatched.append(f"{where}: LoRA delta {tuple(shape)} vs model {tuple(dest.shape)}")
            return
        self.staged[(target.key, target.index)] = (delta, where)

    def end_merge(self) -> None:
        """Stop adding staged deltas; one whose weight was never written is reported."""
        for slot, (_, where) in self.staged.items():
            if slot not in self.merged:
                self.mismatched.append(f"{where}: LoRA delta for a weight the base checkpoint did not provide")
        self.staged.clear()

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
