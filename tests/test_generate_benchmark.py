"""benchmarks/generation.py runs on the CPU in smoke mode, prints every row, and its batched rows match the
one-by-one loop."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "generation.py"


@pytest.mark.slow
def test_smoke_run_writes_the_table(tmp_path):
    out = tmp_path / "generation.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(BENCH), "--smoke", "--out", str(out)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    text = out.read_text()
    assert text.strip() in run.stdout
    table = text.split("\n\n| path")[1].split("\n\n")[0]
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    paths = [r[0].strip() for r in rows]
    assert paths[0] == "one-by-one loop, KV cache (baseline)" and "no cache" in paths[1]
    assert [r[1].strip() for r in rows if "ours" in r[0]] == ["1", "4"]  # our engine at batch 1 and 4
    assert sum("dense LlamaForCausalLM" in p for p in paths) == 4  # dynamic and static cache, both batches
    assert sum("floor" in p for p in paths) == 2
    checked = [r for r in rows if r[7].strip() != "-"]
    assert len(checked) == 5  # no cache, previous path x2, ours x2
    for r in checked:  # float32: every path on our model gives the baseline's greedy tokens
        samples = r[2].strip()
        assert r[7].strip() == f"{samples}/{samples}" and r[8].strip() == "-"  # no difference, so no tie gap
    assert all(float(r[5]) > 0 for r in rows)
    assert "built during the timed runs: batch 1: 0, batch 4: 0" in text  # warmed up on the longest batch
    split = [line.split("|")[1:-1] for line in text.split("| batch | prompt tokens")[1].splitlines()[2:4]]
    assert [r[0].strip() for r in split] == ["1", "4"] and all(float(r[4].split()[0]) > 0 for r in split)


def test_generation_core_imports_without_the_media_stack():
    """The GPU machine lacks PyAV, deepspeed, gradio and whisper: the benchmark's imports must not need them."""
    code = ("import sys, runpy; sys.argv = ['generation.py', '--help']\n"
            f"try:\n    runpy.run_path({str(BENCH)!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "loaded = [m for m in ('av', 'deepspeed', 'gradio', 'whisper', 'Uni_MoE.data.media') if m in sys.modules]\n"
            "assert not loaded, loaded")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
