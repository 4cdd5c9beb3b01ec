"""The eval_*.sh / inference_*.sh wrappers: original argument names in, our entry points out."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from Uni_MoE.checkpoint.tiny import build_tiny
from Uni_MoE.eval.fixtures import write_benchmark_files

SCRIPTS = Path(__file__).resolve().parents[1] / "Uni_MoE"


def _bash(script: str, *args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **env}
    return subprocess.run(["bash", str(SCRIPTS / script), *args], env=full_env, cwd=cwd, capture_output=True,
                          text=True, check=True, timeout=300)


def test_eval_audio_with_expert_parallel_builds_the_8e_command():
    out = _bash("eval_audio.sh", "--data_path", "a b.json", "--data_type", "clothov1", "--output", "o.json",
                DRY_RUN="1", EP_SIZE="2")
    assert out.stdout.strip() == (
        "+ deepspeed --num_gpus 2 --master_port 29502 --module Uni_MoE.eval --model_path "
        "checkpoint/Uni-MoE-audio-e2 --dtype float32 --enable_deepspeed_moe True --eval_ep_size 2 "
        "--data_path a b.json --data_type clothov1 --output o.json")


def test_inference_speech_dry_run_passes_media_flags():
    out = _bash("inference_speech.sh", "--image", "x.png", "--speech", "q.wav", DRY_RUN="1", MODEL="m")
    assert out.stderr.strip() == "+ python -m Uni_MoE.serve.cli --model_path m --image x.png --speech q.wav"


@pytest.mark.slow
def test_eval_speech_runs_from_another_folder(tmp_path):
    """Relative paths stay relative to where the user is; both JSON files and the table appear."""
    build_tiny(tmp_path / "model", moe=True)
    write_benchmark_files(tmp_path / "bench", n=2, data_types=["pope"])
    out = _bash("eval_speech.sh", "--data_path", "bench/pope.json", "--data_type", "pope", "--output",
                "out/pope.json", "--max_new_tokens", "3", cwd=tmp_path, MODEL="model")
    rows = json.loads((tmp_path / "out" / "pope.json").read_text())
    metrics = json.loads((tmp_path / "out" / "pope_metrics.json").read_text())
    assert len(rows) == 2 and metrics["metrics"]["f1"] >= 0
    assert "pope  f1" in out.stdout
