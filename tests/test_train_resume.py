"""Stopping mid-run and resuming from the checkpoint continues the same loss curve (same seed, same data
order), and the run writes its expert-load plot and a plain stage output."""

import json
import shutil
from pathlib import Path

import pytest

from Uni_MoE.checkpoint.tiny import build_tiny
from Uni_MoE.model.uni_moe import UniMoEForCausalLM
from Uni_MoE.train.arguments import parse_args
from Uni_MoE.train.train import run

SAMPLES = Path(__file__).resolve().parents[1] / "data_sample" / "samples.json"


def _train(tiny, out, resume="none"):
    argv = ["--stage", "3", "--model_name_or_path", str(tiny), "--num_experts", "2", "--expert_lora_r", "4",
            "--data_path", str(SAMPLES), "--data_root", str(SAMPLES.parent), "--output_dir", str(out),
            "--per_device_train_batch_size", "2", "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1",
            "--learning_rate", "1e-3", "--report_to", "none", "--disable_tqdm", "True", "--seed", "3",
            "--resume_from_checkpoint", resume]
    return run(*parse_args(argv)[:3])


def _losses(checkpoint):
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


@pytest.mark.timeout(600)
def test_resume_continues_the_same_loss_curve(tmp_path):
    tiny = build_tiny(tmp_path / "tiny")
    full = tmp_path / "full"
    out = _train(tiny, full)
    assert (full / "checkpoint-2" / "expert_load.png").exists()
    assert set(json.loads((full / "checkpoint-4" / "expert_load.json").read_text())) >= {"text", "image"}
    load = {step: json.loads((full / f"checkpoint-{step}" / "expert_load.json").read_text()) for step in (2, 4)}
    whole_run = json.loads((Path(out) / "expert_load.json").read_text())
    for modality, counts in whole_run.items():  # the output folder holds the sum over both save windows
        summed = [[a + b for a, b in zip(r2, r4)] for r2, r4 in zip(load[2][modality], load[4][modality])]
        assert counts == summed
    assert sum(map(sum, whole_run["text"])) > 0
    assert UniMoEForCausalLM.from_pretrained(out).moe_mlps()

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    _train(tiny, resumed, resume="auto")
    expected, got = _losses(full / "checkpoint-4"), _losses(resumed / "checkpoint-4")
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], rel=1e-4)
