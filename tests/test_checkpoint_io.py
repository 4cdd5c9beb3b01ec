"""Safe checkpoint loading: formats, sharded folders, and refusal of pickles that would run code."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from Uni_MoE.checkpoint.io import (
    UnsafeCheckpointError,
    checkpoint_keys,
    iter_state_dicts,
    load_checkpoint,
    load_state_dict,
    shard_files,
)


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __reduce__(self):
        return (os.system, ("echo unpickled > /dev/null",))


def test_formats_round_trip(tmp_path) -> None:
    state = {"a": torch.arange(4.0), "b.weight": torch.ones(2, 3)}
    save_file(state, tmp_path / "x.safetensors")
    torch.save(state, tmp_path / "x.bin")
    torch.save({"cfg": {"layers": 2, "name": "beats"}, "model": state}, tmp_path / "x.pt")
    for name in ("x.safetensors", "x.bin"):
        loaded = load_state_dict(tmp_path / name)
        assert loaded.keys() == state.keys() and torch.equal(loaded["b.weight"], state["b.weight"])
    assert load_checkpoint(tmp_path / "x.pt")["cfg"] == {"layers": 2, "name": "beats"}
    with pytest.raises(ValueError, match="x.pt: expected a dict of tensors"):
        load_state_dict(tmp_path / "x.pt")


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_pickle_is_refused(tmp_path, zip_format) -> None:
    path = tmp_path / "evil.bin"
    if zip_format:
        torch.save({"w": torch.ones(1), "payload": RunsCode()}, path)
    else:
        path.write_bytes(pickle.dumps({"payload": RunsCode()}))
    with pytest.raises(UnsafeCheckpointError, match="evil.bin: refused to load"):
        load_state_dict(path)


def test_sharded_folder(tmp_path) -> None:
    torch.save({"a": torch.zeros(2), "b": torch.ones(2)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"c": torch.full((2,), 2.0)}, tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00001-of-00002.bin",
                  "c": "pytorch_model-00002-of-00002.bin"}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert [p.name for p in shard_files(tmp_path)] == sorted(set(weight_map.values()))
    assert checkpoint_keys(tmp_path) == ["a", "b", "c"]
    kept = {k: v for _, part in iter_state_dicts(tmp_path, keep=lambda k: k != "b") for k, v in part.items()}
    assert sorted(kept) == ["a", "c"] and torch.equal(kept["c"], torch.full((2,), 2.0))


def test_missing_shard_and_folder_are_named(tmp_path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-1.safetensors"):
        shard_files(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model.safetensors.index.json"):
        shard_files(tmp_path / "empty")


def test_single_safetensors_keys(tmp_path) -> None:
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    assert checkpoint_keys(tmp_path) == ["x"]
    assert [k for _, part in iter_state_dicts(tmp_path) for k in part] == ["x"]
