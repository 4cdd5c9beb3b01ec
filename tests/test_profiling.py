"""--profile_steps writes an operator table and a trace of the named training steps, and a bad range stops
the run before anything loads."""

import json
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from Uni_MoE.checkpoint.tiny import build_tiny
from Uni_MoE.train.arguments import parse_args
from Uni_MoE.train.profiling import CPU_SYNCS, parse_steps, sync_sites
from Uni_MoE.train.train import run

SAMPLES = Path(__file__).resolve().parents[1] / "data_sample" / "samples.json"


def _argv(tiny: Path, out: Path, profile: str) -> list[str]:
    return ["--stage", "3", "--model_name_or_path", str(tiny), "--num_experts", "2", "--expert_lora_r", "4",
            "--data_path", str(SAMPLES), "--data_root", str(SAMPLES.parent), "--output_dir", str(out),
            "--per_device_train_batch_size", "2", "--max_steps", "3", "--save_steps", "100", "--report_to", "none",
            "--disable_tqdm", "True", "--profile_steps", profile]


def test_parse_steps():
    assert parse_steps("5-7") == (5, 7)
    assert parse_steps("4") == (4, 4)
    for bad in ("0-2", "3-2", "a-b", "-4"):
        with pytest.raises(ValueError, match="--profile_steps"):
            parse_steps(bad)


def _read_on_host(x: torch.Tensor) -> float:
    return float(x.sum())


def test_sync_sites_count_host_reads_by_the_function_that_made_them():
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        x = torch.arange(6.0)
        for _ in range(3):
            _read_on_host(x)
        bool(x.max() > 0)
    table = sync_sites(prof, CPU_SYNCS)
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| count")]
    assert table.startswith("4 host synchronisations")
    assert rows[0].startswith("| 3 | ") and "test_profiling.py:" in rows[0] and "_read_on_host | - |" in rows[0]
    assert rows[1].startswith("| 1 | ") and "test_profiling.py:" in rows[1] and "test_sync_sites_count" in rows[1]


def test_bad_range_stops_at_parsing(tmp_path):
    with pytest.raises(ValueError, match="--profile_steps '3-1'"):
        parse_args(_argv(tmp_path / "none", tmp_path / "out", "3-1"))


@pytest.mark.timeout(300)
def test_profiled_steps_are_written(tmp_path):
    tiny = build_tiny(tmp_path / "tiny")
    out = tmp_path / "out"
    run(*parse_args(_argv(tiny, out, "2-3"))[:3])
    ops = (out / "profile" / "ops_rank0.txt").read_text()
    assert ops.startswith("2 profiled steps")
    assert "aten::mm" in ops or "aten::addmm" in ops  # the model's matrix products were recorded
    syncs = (out / "profile" / "syncs_rank0.txt").read_text()
    counts = [int(line.split("|")[1]) for line in syncs.splitlines()
              if line.startswith("| ") and not line.startswith("| count")]
    assert syncs.startswith("2 profiled steps") and f"{sum(counts)} host synchronisations" in syncs
    assert "Uni_MoE/" in syncs  # the training loop's reads are traced back to this package's frames
    trace = json.loads((out / "profile" / "trace_rank0.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "Optimizer.step#AdamW.step" in names or any("AdamW" in str(n) for n in names)
