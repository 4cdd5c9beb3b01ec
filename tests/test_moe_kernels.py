"""The Triton expert kernels: their tile schedule, and (where Triton is installed) the kernels run by
Triton's CPU interpreter against the reference loop."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from Uni_MoE.model.moe.swiglu_lora_kernels import tile_schedule

ROOT = Path(__file__).resolve().parents[1]


def test_tile_schedule_never_straddles_experts_and_covers_every_row() -> None:
    counts = torch.tensor([3, 0, 5])  # expert 1 empty; expert 2 needs two tiles of 4
    offs = counts.cumsum(0).to(torch.int32)
    sched = tile_schedule(counts, offs, num_rows=8, block_m=4)
    assert sched.tolist() == [[0, 2, 2, 2, 2], [0, 3, 7, 0, 0], [3, 8, 8, 0, 0]]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_kernels_in_the_triton_interpreter_match_the_loop() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "check_moe_kernels.py"), "--small",
                             "--device", "cpu"], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout
