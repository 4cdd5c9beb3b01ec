"""Every way a checkpoint enters the program refuses a pickle that would run code: the code never runs
(its marker file is never written) and the error names the file.

Covered: our loaders (checkpoint.io, BEATs, connector weights), transformers' ``from_pretrained``, and
resuming training: the Trainer's own optimizer/scheduler/RNG loading in transformers 5.24 (weights_only)
and the pre-check of every pickle in the resume folder (which also guards DeepSpeed's weights_only=False).
"""

from __future__ import annotations

import builtins
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from Uni_MoE.checkpoint.io import (
    UnsafeCheckpointError,
    check_checkpoint_folder,
    check_pickle,
    iter_state_dicts,
    load_checkpoint,
)
from Uni_MoE.model.encoders.beats import load_beats_checkpoint
from Uni_MoE.model.uni_moe import UniMoEForCausalLM
from Uni_MoE.train.arguments import TrainingArguments
from Uni_MoE.train.stages import load_connector_weights
from Uni_MoE.train.trainer import UniMoETrainer


class WritesMarker:
    """Unpickling this runs code that writes a marker file: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def evil_file(path: Path, marker: Path, legacy: bool = False, **tensors: torch.Tensor) -> Path:
    """A checkpoint-looking pickle (torch zip, or the legacy stream) carrying the code-running object."""
    payload = {"weight": torch.ones(2), **tensors, "payload": WritesMarker(marker)}
    path.parent.mkdir(parents=True, exist_ok=True)
    if legacy:
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    return path


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "code-ran"
    yield path
    assert not path.exists(), "the pickle's code ran"


def test_the_crafted_pickle_really_runs_code_when_trusted(tmp_path) -> None:
    """The control: an unguarded load does write the marker, so its absence below means refusal."""
    marker = tmp_path / "control"
    torch.load(evil_file(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("legacy", [False, True])
def test_checkpoint_io_refuses(tmp_path, marker, legacy) -> None:
    path = evil_file(tmp_path / "model" / "pytorch_model.bin", marker, legacy)
    with pytest.raises(UnsafeCheckpointError, match=f"{path}: refused to load"):
        load_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError, match=f"{path}: refused to load"):
        next(iter_state_dicts(path.parent))
    with pytest.raises(UnsafeCheckpointError, match=rf"{path}: refused to load; the pickle would call \[.*'builtins.exec'"):
        check_pickle(path)


def test_beats_and_connector_loaders_refuse(tmp_path, marker, make_config) -> None:
    beats = evil_file(tmp_path / "BEATs.pt", marker)
    with pytest.raises(ValueError, match=f"refusing to load BEATs checkpoint {beats}"):
        load_beats_checkpoint(beats)
    adapter = evil_file(tmp_path / "mm_projector.bin", marker)
    with pytest.raises(UnsafeCheckpointError, match=f"{adapter}: refused to load"):
        load_connector_weights(UniMoEForCausalLM(make_config()), str(adapter), "mm_projector")


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_connector_weights_in_safe_files_still_load(tmp_path, make_config, suffix) -> None:
    source, target = UniMoEForCausalLM(make_config()), UniMoEForCausalLM(make_config())
    state = {f"model.mm_projector.{k}": v.clone() for k, v in source.model.mm_projector.state_dict().items()}
    path = tmp_path / f"mm_projector{suffix}"
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    assert not all(torch.equal(target.get_parameter(k), v) for k, v in state.items())
    assert load_connector_weights(target, str(path), "mm_projector") == len(state)
    for key, value in target.model.mm_projector.state_dict().items():
        assert torch.equal(value, source.model.mm_projector.state_dict()[key])


def test_from_pretrained_refuses_a_pickled_model(tmp_path, marker, make_config) -> None:
    """transformers 5.24 reads ``pytorch_model.bin`` with weights_only=True: refused, nothing runs (torch's
    message names the offending global, not the file; check_checkpoint_folder names the file)."""
    folder = tmp_path / "model"
    model = UniMoEForCausalLM(make_config())
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    evil_file(folder / "pytorch_model.bin", marker, **model.state_dict())
    with pytest.raises(pickle.UnpicklingError, match="GLOBAL exec"):
        UniMoEForCausalLM.from_pretrained(folder)
    with pytest.raises(UnsafeCheckpointError, match=f"{folder / 'pytorch_model.bin'}: refused to load"):
        check_checkpoint_folder(folder)


@pytest.fixture
def trainer(tmp_path, make_config) -> UniMoETrainer:
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", max_steps=1)
    return UniMoETrainer(model=UniMoEForCausalLM(make_config()), args=args, train_dataset=[{}])


@pytest.mark.parametrize("name", ["rng_state.pth", "optimizer.pt", "scheduler.pt",
                                  "global_step2/mp_rank_00_model_states.pt"])
def test_resume_refuses_before_anything_is_read(trainer, tmp_path, marker, name) -> None:
    checkpoint = tmp_path / "out" / "checkpoint-2"
    evil_file(checkpoint / name, marker)
    (checkpoint / "training_args.bin").write_bytes(pickle.dumps(trainer.args))  # written for the record only
    (checkpoint / "trainer_state.json").write_text("{}")
    with pytest.raises(UnsafeCheckpointError, match=f"{checkpoint / name}: refused to load"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    with pytest.raises(UnsafeCheckpointError, match=f"{checkpoint / name}: refused to load"):
        trainer.train(resume_from_checkpoint=True)


def test_trainer_own_state_loading_is_weights_only(trainer, tmp_path, marker) -> None:
    """Without our pre-check, transformers 5.24 still refuses: it loads these files with weights_only=True."""
    checkpoint = tmp_path / "checkpoint-2"
    evil_file(checkpoint / "rng_state.pth", marker)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        trainer._load_rng_state(str(checkpoint))
    evil_file(checkpoint / "optimizer.pt", marker)
    evil_file(checkpoint / "scheduler.pt", marker)
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        trainer._load_optimizer_and_scheduler(str(checkpoint))


def test_real_training_states_pass_the_check(trainer, tmp_path) -> None:
    """What the Trainer writes (tensors, numpy RNG state, plain dicts) passes; DeepSpeed classes pass,
    DeepSpeed functions do not."""
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    trainer._save_optimizer_and_scheduler(str(checkpoint))
    trainer._save_rng_state(str(checkpoint))
    check_checkpoint_folder(checkpoint)
    loss_scaler = checkpoint / "ds_states.pt"
    loss_scaler.write_bytes(b"\x80\x02cdeepspeed.runtime.fp16.loss_scaler\nLossScaler\n)R.")
    check_pickle(loss_scaler)
    reexported = checkpoint / "reexported.pt"  # a class DeepSpeed imported, not one of its own
    reexported.write_bytes(b"\x80\x02cdeepspeed.launcher.launch\ndefaultdict\n)R.")
    with pytest.raises(UnsafeCheckpointError, match=r"would call \['deepspeed.launcher.launch.defaultdict'\]"):
        check_pickle(reexported)
    launcher = checkpoint / "launch.pt"
    launcher.write_bytes(b"\x80\x02cdeepspeed.launcher.runner\nmain\n)R.")
    with pytest.raises(UnsafeCheckpointError, match=r"would call \['deepspeed.launcher.runner.main'\]"):
        check_pickle(launcher)
