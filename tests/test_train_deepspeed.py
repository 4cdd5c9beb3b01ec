"""A DeepSpeed ZeRO-2 run on the CPU (gloo, world size 1) trains a few steps and exports a loadable model."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from Uni_MoE.checkpoint.tiny import build_tiny
from Uni_MoE.model.uni_moe import UniMoEForCausalLM

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data_sample" / "samples.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_zero2_on_cpu_trains_and_exports(tmp_path):
    pytest.importorskip("deepspeed")
    tiny = build_tiny(tmp_path / "tiny")
    out = tmp_path / "out"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "Uni_MoE.train", "--stage", "3", "--model_name_or_path", str(tiny),
           "--num_experts", "2", "--data_path", str(SAMPLES), "--data_root", str(SAMPLES.parent),
           "--output_dir", str(out), "--deepspeed", str(ROOT / "scripts" / "zero2.json"), "--ddp_backend", "gloo",
           "--per_device_train_batch_size", "2", "--max_steps", "3", "--save_steps", "3", "--logging_steps", "1",
           "--learning_rate", "1e-3", "--report_to", "none", "--disable_tqdm", "True"]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=880)
    assert done.returncode == 0, done.stderr[-3000:]
    history = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3]
    assert UniMoEForCausalLM.from_pretrained(out).moe_layers()
