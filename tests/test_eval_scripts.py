"""The eval_*.sh / inference_*.sh wrappers: original argument names in, our entry points out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import pope_by_hand

from Uni_MoE.checkpoint.tiny import build_tiny
from Uni_MoE.eval.fixtures import write_benchmark_files

SCRIPTS = Path(__file__).resolve().parents[1] / "Uni_MoE"


def _bash(script: str, *args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **env}
    return subprocess.run(["bash", str(SCRIPTS / script), *args], env=full_env, cwd=cwd, capture_output=True,
                          text=True, check=True, timeout=300)


def test_eval_audio_with_expert_parallel_builds_the_8e_command(tmp_path):
    (tmp_path / "checkpoint" / "Uni-MoE-audio-e2").mkdir(parents=True)
    out = _bash("eval_audio.sh", "--data_path", "a b.json", "--data_type", "clothov1", "--output", "o.json",
                cwd=tmp_path, DRY_RUN="1", EP_SIZE="2")
    assert out.stdout.strip() == (
        "+ deepspeed --num_gpus 2 --master_port 29502 --module Uni_MoE.eval --model_path "
        "checkpoint/Uni-MoE-audio-e2 --dtype float32 --enable_deepspeed_moe True --eval_ep_size 2 "
        "--data_path a b.json --data_type clothov1 --output o.json")


def test_inference_speech_dry_run_passes_media_flags(tmp_path):
    (tmp_path / "m").mkdir()
    out = _bash("inference_speech.sh", "--image", "x.png", "--speech", "q.wav", cwd=tmp_path, DRY_RUN="1", MODEL="m")
    assert out.stderr.strip() == "+ python -m Uni_MoE.serve.cli --model_path m --image x.png --speech q.wav"


def test_eval_names_a_missing_model_folder_in_one_line_without_the_network(tmp_path):
    """The shell check, and behind it the Python one (reached when the script's check is bypassed by
    calling the module directly), both say the same line; nothing is looked up online."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    done = subprocess.run(["bash", str(SCRIPTS / "eval_speech.sh"), "--data_path", "x.json", "--data_type", "vqa",
                           "--output", "o.json"], env={**env, "MODEL": "no/such/model"}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == "eval_speech.sh: no such model folder: no/such/model\n"
    done = subprocess.run([sys.executable, "-m", "Uni_MoE.eval", "--model_path", "no/such/model", "--data_path",
                           "x.json", "--data_type", "vqa", "--output", "o.json"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**env, "PYTHONPATH": str(SCRIPTS.parent)})
    assert (done.returncode, done.stderr) == (1, "no such model folder: no/such/model\n")


@pytest.mark.slow
def test_eval_speech_runs_from_another_folder(tmp_path):
    """Relative paths stay relative to where the user is; both JSON files and the table appear."""
    build_tiny(tmp_path / "model", moe=True)
    write_benchmark_files(tmp_path / "bench", n=2, data_types=["pope"])
    out = _bash("eval_speech.sh", "--data_path", "bench/pope.json", "--data_type", "pope", "--output",
                "out/pope.json", "--max_new_tokens", "3", cwd=tmp_path, MODEL="model")
    rows = json.loads((tmp_path / "out" / "pope.json").read_text())
    metrics = json.loads((tmp_path / "out" / "pope_metrics.json").read_text())
    assert len(rows) == 2
    _, f1 = pope_by_hand([r["prediction"] for r in rows], [r["reference"] for r in rows])
    assert metrics["metrics"]["f1"] == pytest.approx(f1)
    assert "pope  f1" in out.stdout
