"""Safe checkpoint reading: safetensors, or ``torch.load(weights_only=True)`` for pickles.

A pickle that would construct arbitrary objects (and so could run code) is refused with an error
naming the file. Sharded folders are read through their index json, one shard at a time, and only
the tensors a caller keeps are materialised (safetensors ``safe_open``; zip pickles via ``mmap``).
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")


class UnsafeCheckpointError(RuntimeError):
    """A pickle holds objects other than tensors and plain containers; it is not loaded."""


def load_checkpoint(path: str | Path, mmap: bool = False) -> Any:
    """Read a .safetensors file or a weights-only pickle (tensors, dicts, lists, numbers, strings)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{path}: refused to load; the pickle asks to build objects other than tensors and plain "
            f"containers, which could run code. Re-save it as safetensors from a trusted source. ({err})"
        ) from err


def load_state_dict(path: str | Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from one file; anything else is an error naming the file."""
    state = load_checkpoint(path, mmap=mmap)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        kind = type(state).__name__
        raise ValueError(f"{path}: expected a dict of tensors, found {kind} with non-tensor entries")
    return state


def shard_files(folder: str | Path) -> list[Path]:
    """The weight files of a HF-style folder: the shards its index json lists, or its single file."""
    folder = Path(folder)
    for name in INDEX_NAMES:
        index = folder / name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = list(dict.fromkeys(weight_map.values()))
            missing = [f for f in files if not (folder / f).is_file()]
            if missing:
                raise FileNotFoundError(f"{index} lists shards that are absent: {missing}")
            return [folder / f for f in files]
    for name in SINGLE_NAMES:
        if (folder / name).is_file():
            return [folder / name]
    raise FileNotFoundError(f"{folder}: no {' / '.join(INDEX_NAMES + SINGLE_NAMES)} found")


def checkpoint_keys(folder: str | Path) -> list[str]:
    """Tensor names of a folder's checkpoint, read from the index or safetensors headers when possible."""
    folder = Path(folder)
    for name in INDEX_NAMES:
        if (folder / name).is_file():
            return list(json.loads((folder / name).read_text())["weight_map"])
    keys: list[str] = []
    for path in shard_files(folder):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                keys += list(f.keys())
        else:
            keys += list(load_state_dict(path, mmap=True))
    return keys


def iter_state_dicts(
    folder: str | Path, keep: Callable[[str], bool] = lambda name: True
) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
    """Yield (shard path, the kept tensors of that shard), one shard in memory at a time."""
    for path in shard_files(folder):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                yield path, {k: f.get_tensor(k) for k in f.keys() if keep(k)}
        else:
            state = load_state_dict(path, mmap=True)
            yield path, {k: v for k, v in state.items() if keep(k)}
            del state
