"""Safe checkpoint reading: safetensors, or ``torch.load(weights_only=True)`` for pickles.

A pickle that would construct arbitrary objects (and so could run code) is refused with an error
naming the file. Sharded folders are read through their index json, one shard at a time, and only
the tensors a caller keeps are materialised (safetensors ``safe_open``; zip pickles via ``mmap``).

Files that other libraries load (a training checkpoint's optimizer, scheduler, RNG and DeepSpeed states)
are checked first with :func:`check_checkpoint_folder`: each pickle's globals are listed without
importing or calling anything, and any outside tensors, numbers, containers and DeepSpeed's own classes
is refused. DeepSpeed reads its states with ``weights_only=False``, so this check is what guards them.
"""

from __future__ import annotations

import _compat_pickle
import importlib
import io
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


SAFE_GLOBALS = frozenset({
    "collections.OrderedDict", "collections.defaultdict", "_codecs.encode", "builtins.set", "builtins.frozenset",
    "builtins.slice", "builtins.range", "builtins.complex", "builtins.bytearray", "torch.Size", "torch.device",
    "torch.storage.UntypedStorage", "torch.nn.parameter.Parameter", "numpy.ndarray", "numpy.dtype",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
})
NOT_LOADED_ON_RESUME = ("training_args.bin",)  # the Trainer writes it for the record and never reads it


class UnsafeCheckpointError(RuntimeError):
    """A pickle holds objects other than tensors and plain containers; it is not loaded."""


class _Stub:
    """Stands for any global while a pickle is listed: accepts every call and mutation, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> "_Stub":
        return _Stub()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _GlobalLister(pickle.Unpickler):
    """Unpickles with every global replaced by a stub, recording ``module.name`` of each."""

    def __init__(self, stream: io.BufferedIOBase, found: set[str]) -> None:
        super().__init__(stream)
        self.found = found

    def find_class(self, module: str, name: str) -> type:
        if (module, name) in _compat_pickle.NAME_MAPPING:  # protocol-2 names (torch.save): __builtin__ ...
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        self.found.add(f"{module}.{name}")
        return type(name, (_Stub,), {})

    def persistent_load(self, pid: Any) -> None:
        return None


def pickle_globals(path: str | Path) -> set[str]:
    """Every global a pickle file (torch zip or legacy format) names, found without importing or running it."""
    path = Path(path)
    found: set[str] = set()
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    if member.endswith(".pkl"):
                        _GlobalLister(io.BytesIO(archive.read(member)), found).load()
            return found
        with path.open("rb") as stream:  # legacy torch.save: up to five pickles, then raw storage bytes
            _GlobalLister(stream, found).load()
            for _ in range(4):
                _GlobalLister(stream, found).load()
    except EOFError:  # the stream ended: a plain pickle or a short legacy file
        pass
    except Exception as err:  # noqa: BLE001 - whatever breaks the listing, the file is not loaded
        raise UnsafeCheckpointError(f"{path}: refused to load; not a readable pickle ({type(err).__name__}: {err})") from err
    return found


def _is_safe_global(qualified: str) -> bool:
    module, _, name = qualified.rpartition(".")
    if qualified in SAFE_GLOBALS or module == "numpy.dtypes":
        return True
    if module == "torch._utils" and name.startswith("_rebuild_"):
        return True
    if module == "torch":
        return name.endswith("Storage") or isinstance(getattr(torch, name, None), torch.dtype)
    if module.startswith("deepspeed."):  # DeepSpeed's own state classes (enums, loss scalers); no functions
        try:
            obj = getattr(importlib.import_module(module), name, None)
        except ImportError:
            return False
        return isinstance(obj, type) and obj.__module__.startswith("deepspeed.")  # not one it imported
    return False


def check_pickle(path: str | Path) -> None:
    """Raise UnsafeCheckpointError naming the file and the globals unless the pickle only builds tensors,
    numbers, plain containers and DeepSpeed state classes."""
    unsafe = sorted(g for g in pickle_globals(path) if not _is_safe_global(g))
    if unsafe:
        raise UnsafeCheckpointError(
            f"{path}: refused to load; the pickle would call {unsafe}, which could run code. "
            "Only tensors, numbers and plain containers are accepted; re-create the file from a trusted source."
        )


def check_checkpoint_folder(folder: str | Path) -> None:
    """Check every pickle under a training checkpoint folder (optimizer, scheduler, RNG, DeepSpeed states)."""
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and path.suffix in PICKLE_SUFFIXES + (".pkl",) and path.name not in NOT_LOADED_ON_RESUME:
            check_pickle(path)


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
