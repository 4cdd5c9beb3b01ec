"""--profile_steps writes an operator table and a trace of the named training steps, and a bad range stops
the run before anything loads."""

import json
import warnings
from pathlib import Path

import pytest

from Uni_MoE.checkpoint.tiny import build_tiny
from Uni_MoE.train.arguments import parse_args
from Uni_MoE.train.profiling import parse_steps
from Uni_MoE.train.sync_sites import SYNC_WARNING, SyncRecorder, package_path
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


def _synchronising_read() -> None:
    warnings.warn(f"x.item() {SYNC_WARNING}")  # what torch's sync debug mode raises from a CUDA read


def test_sync_recorder_counts_each_synchronisation_by_the_line_that_made_it():
    recorder = SyncRecorder()
    shown = []
    saved = warnings.showwarning
    warnings.showwarning = lambda message, *args, **kwargs: shown.append(str(message))
    try:
        recorder.start()
        for _ in range(3):
            _synchronising_read()
        _synchronising_read()
        warnings.warn("an unrelated warning")
        recorder.stop()
        assert warnings.showwarning is not recorder._record
        _synchronising_read()  # after stop: not recorded
    finally:
        warnings.showwarning = saved
    assert len(recorder.stacks) == 4
    assert shown == ["an unrelated warning", f"x.item() {SYNC_WARNING}"]  # passed through, as before
    table = recorder.table()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| count")]
    assert table.startswith("4 host synchronisations")
    line = _synchronising_read.__code__.co_firstlineno + 1
    assert rows == [f"| 4 | tests/test_profiling.py:{line} _synchronising_read | - |"]


def test_package_path_drops_the_machine_prefix():
    assert package_path("/x/lib/python3.11/site-packages/transformers/trainer.py") == "transformers/trainer.py"
    assert package_path("/home/u/repo/Uni_MoE/model/moe/layer.py") == "Uni_MoE/model/moe/layer.py"
    assert package_path("/home/u/repo/benchmarks/launcher_run.py") == "benchmarks/launcher_run.py"


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
    syncs = (out / "profile" / "syncs_rank0.txt").read_text()  # without a GPU nothing synchronises
    assert syncs.startswith("2 profiled steps; 0 CUDA runtime") and "0 host synchronisations reported" in syncs
    trace = json.loads((out / "profile" / "trace_rank0.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "Optimizer.step#AdamW.step" in names or any("AdamW" in str(n) for n in names)
