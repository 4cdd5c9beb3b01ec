"""The device's idle gaps in a profiler trace, charged to the host operation whose launch ended each one,
checked on a hand-built trace whose gaps are known."""

import gzip
import json

from Uni_MoE.model.uni_moe import FEATURES_ANNOTATION
from Uni_MoE.train.gpu_gaps import FORWARD, find_gaps, gap_table, phase


def _op(name, ts, dur, tid=1, cat="cpu_op"):
    return {"ph": "X", "cat": cat, "name": name, "pid": 10, "tid": tid, "ts": ts, "dur": dur}


def _launch(corr, ts, tid=1):
    return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": 10, "tid": tid, "ts": ts,
            "dur": 2.0, "args": {"correlation": corr}}


def _kernel(corr, ts, dur, stream=7):
    return {"ph": "X", "cat": "kernel", "name": f"k{corr}", "pid": 0, "tid": stream, "ts": ts, "dur": dur,
            "args": {"correlation": corr, "stream": stream}}


def _trace():
    """Host: step [0, 400] holds the forward [0, 200] (mm at 10, a Python-heavy router [100, 190] whose
    softmax launches at 180) and backward on another thread [220, 400] (mm at 300). Device: k1 [20, 100],
    k2 (softmax) [185, 195]: a 85 us gap; a copy [150, 160] on another stream inside that gap splits
    it into 50 + 25; k3 [310, 350]: a 115 us gap ended by the backward's mm; k4 overlaps k3 (no gap)."""
    events = [
        _op("step", 0, 400, cat="user_annotation"), _op(FORWARD, 0, 200, cat="user_annotation"),
        _op("aten::mm", 10, 5), _launch(1, 11),
        _op("router", 100, 90), _op("aten::copy_", 140, 8), _launch(5, 141),
        _op("aten::softmax", 180, 4), _launch(2, 181),
        _op("autograd::engine::evaluate_function: DistinctExpertsBackward", 220, 180, tid=2),
        _op("DistinctExpertsBackward", 220, 180, tid=2), _op("aten::mm", 300, 5, tid=2), _launch(3, 301, tid=2),
        _launch(4, 302, tid=2),
        _kernel(1, 20, 80), {**_kernel(5, 150, 10, stream=9), "cat": "gpu_memcpy"}, _kernel(2, 185, 10),
        _kernel(3, 310, 40), _kernel(4, 320, 40),
        {"ph": "i", "name": "marker", "ts": 0},  # not a complete event: ignored
    ]
    return {"traceEvents": events}


def test_gaps_are_measured_and_charged_to_the_launching_operation(tmp_path):
    gaps, busy, span = find_gaps(_trace())
    assert [(g.start, g.length) for g in gaps] == [(100, 50), (160, 25), (195, 115)]
    assert busy == 80 + 10 + 10 + 40 + 10  # k4 adds only its 10 us past k3
    assert span == 360 - 20
    assert gaps[0].chain == ["step", FORWARD, "router", "aten::copy_"]
    assert gaps[1].chain == ["step", FORWARD, "router", "aten::softmax"]
    assert gaps[2].chain == ["autograd::engine::evaluate_function: DistinctExpertsBackward",
                             "DistinctExpertsBackward", "aten::mm"]
    assert [phase(g.chain) for g in gaps] == ["forward", "forward", "backward"]
    assert phase(["Optimizer.step#AdamW.step", "aten::_foreach_add_"]) == "rest"
    assert phase(["step", FORWARD, f"{FEATURES_ANNOTATION}image", "aten::addmm"]) == "encoders"
    assert find_gaps(_trace(), min_gap_us=30)[0][0].length == 50  # the 25 us gap falls under the threshold

    path = tmp_path / "trace.json"
    path.write_text(json.dumps(_trace()))
    zipped = tmp_path / "trace.json.gz"
    with gzip.open(zipped, "wt") as f:
        json.dump(_trace(), f)
    table = gap_table(path, steps=1)
    assert gap_table(zipped, steps=1) == table
    assert table.startswith("device span 0.3 ms a step: busy 0.1 ms, idle in gaps of at least 5 us 0.2 ms (3 gaps")
    assert "idle ms a step by phase: encoders 0.0, forward 0.1, backward 0.1, rest 0.0" in table  # 0.075, 0.115
    rows = [line for line in table.splitlines() if line.startswith("| 0.")]
    engine = "autograd::engine::evaluate_function: DistinctExpertsBackward"
    assert rows == [
        f"| 0.12 | 1.0 | aten::mm | DistinctExpertsBackward < {engine} |",
        f"| 0.05 | 1.0 | aten::copy_ | router < {FORWARD} < step |",
        f"| 0.03 | 1.0 | aten::softmax | router < {FORWARD} < step |"]


def test_no_device_activity_gives_an_empty_report():
    gaps, busy, span = find_gaps({"traceEvents": [_op("forward", 0, 10)]})
    assert (gaps, busy, span) == ([], 0.0, 0.0)
    assert "idle in gaps of at least 5 us 0.0 ms (0 gaps a step)" in gap_table({"traceEvents": []})
