"""benchmarks/expert_parallel.py: its greedy-comparison rule, and its CPU smoke run end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_file, torchrun, without_rank_vars


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "expert_parallel.py"


def _bench():
    return load_file("expert_parallel_bench", SCRIPT)


def test_greedy_difference_passes_only_at_a_near_tie():
    bench = _bench()
    ref_ids = torch.tensor([[5, 6, 7]])
    scores = torch.zeros(1, 3, 10)
    scores[0, 1, 6], scores[0, 1, 9] = 2.0, 1.9  # at token 1 the reference barely preferred 6 over 9
    assert bench.compare_greedy(ref_ids.clone(), ref_ids, scores, 0.25) == (True, "identical")
    ok, note = bench.compare_greedy(torch.tensor([[5, 9, 1]]), ref_ids, scores, 0.25)
    assert ok and "near-tie at token 1" in note
    ok, note = bench.compare_greedy(torch.tensor([[5, 9, 1]]), ref_ids, scores, 0.05)
    assert not ok and "differs at token 1" in note


def test_gc_pauses_count_each_collection_and_its_time():
    """The collector's pauses inside the block are summed per generation; outside it none are counted."""
    import gc

    bench = _bench()
    with bench.GcPauses() as pauses:
        gc.collect(2)
        gc.collect(0)
    gc.collect()
    assert pauses.runs[2] >= 1 and pauses.runs[0] >= 1 and pauses.ms > 0
    assert pauses._callback not in gc.callbacks


@pytest.mark.slow
def test_smoke_run_over_two_ranks_compares_backends_and_writes_reports(tmp_path):
    """Two gloo ranks: the exact pass holds local, ep_size 1 and ep_size 2 to float32 rounding (greedy,
    first-step gradients, losses, logits); the speed pass times all three and DeepSpeed-MoE's own layer."""
    pytest.importorskip("deepspeed")
    env = without_rank_vars()
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = [*torchrun(2), str(SCRIPT), "--smoke", "--out", str(tmp_path), "--train_steps", "2",
           "--timed_steps", "1", "--native_deepspeed"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "expert_parallel.json").read_text())
    rows = {(r["mode"], r["name"]): r for r in report["results"]}
    native_row = ("speed", "deepspeed-moe native ep1")
    assert set(rows) == {(mode, name) for mode in ("exact", "speed")
                         for name in ("deepspeed ep1", "deepspeed ep2", "local")} | {native_row}
    native = rows[native_row]  # DeepSpeed's own dispatch: the same function, dropless
    assert native["passed"] and native["loss_max_rel_diff"] < 1e-3 and native["train_tokens_per_s"] > 0
    for name in ("deepspeed ep1", "deepspeed ep2"):
        exact = rows[("exact", name)]
        assert exact["passed"] and exact["greedy_equal"] and exact["routing_agreement"] == 1.0
        assert exact["grad_rel_err"] < 1e-5 and exact["loss_max_rel_diff"] < 1e-5 and exact["logits_rel_err"] < 1e-5
        speed = rows[("speed", name)]
        assert speed["train_tokens_per_s"] > 0 and speed["decode_tokens_per_s"] > 0
        assert len(speed["step_ms_each"]) == 1 and speed["step_ms_each"][0] == pytest.approx(speed["step_ms"])
        assert len(speed["gc_runs"]) == 3 and speed["gc_ms"] >= 0
    ep2 = rows[("speed", "deepspeed ep2")]
    assert ep2["experts_per_device"] == 4 and sum(ep2["expert_rows"]) == 2 * 2 * 16 * 2 * 2  # ranks*batch*seq*k*layers
    table = (tmp_path / "expert_parallel.md").read_text()
    assert "## Exact comparison (float32" in table and "| deepspeed ep2 | 2 | 4 |" in table


@pytest.mark.slow
@pytest.mark.parametrize("recompute", ["--checkpointing", "--moe_recompute"])
def test_smoke_exact_pass_with_activation_checkpointing(tmp_path, recompute):
    """--checkpointing: every configuration recomputes its decoder layers in the backward (ep_size 2 its row
    exchanges too); --moe_recompute: only the experts' gate/up projections. The float32 comparison still holds
    to rounding."""
    pytest.importorskip("deepspeed")
    env = without_rank_vars()
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = [*torchrun(2), str(SCRIPT), "--smoke", "--out", str(tmp_path), "--train_steps", "2", "--skip_speed",
           recompute]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "expert_parallel.json").read_text())
    assert (report["checkpointing"], report["moe_recompute"]) == (recompute == "--checkpointing",
                                                                   recompute == "--moe_recompute")
    rows = {r["name"]: r for r in report["results"]}
    assert sorted(rows) == ["deepspeed ep1", "deepspeed ep2", "local"]
    for name in ("deepspeed ep1", "deepspeed ep2"):
        assert rows[name]["passed"] and rows[name]["routing_agreement"] == 1.0
        assert rows[name]["grad_rel_err"] < 1e-5 and rows[name]["logits_rel_err"] < 1e-5
