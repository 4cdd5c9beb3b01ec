"""Where the GPU waits for the host, read from a torch.profiler Chrome trace: every interval in which no
kernel, copy or memset runs on the device, charged to the host operation that launched the work which
ended it. A gap charged to an operation means the GPU had run out of queued work when that operation got
round to its launch: the host was behind (Python, launches, a synchronisation that emptied the queue), not
the GPU. The table ranks the operations by the idle time they ended, with the chain of enclosing host
operations, so that the code which starves the GPU can be found by name."""

from __future__ import annotations

import bisect
import gzip
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..model.uni_moe import FEATURES_ANNOTATION

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
HOST_CATEGORIES = ("cpu_op", "user_annotation", "python_function")
FORWARD = "train_step: forward"  # the trainer's annotation around the model's forward
PHASES = (("backward", "autograd::engine::evaluate_function"), ("encoders", FEATURES_ANNOTATION),
          ("forward", FORWARD))  # first match wins


def phase(chain: list[str]) -> str:
    """The step phase a gap's host operations belong to: backward (the autograd engine, recomputation of
    checkpointed layers included), the forward's encoders and connectors, the rest of the forward, or the
    rest of the step (optimizer, gradient checks, the trainer)."""
    for name, prefix in PHASES:
        if any(op.startswith(prefix) for op in chain):
            return name
    return "rest"


@dataclass
class _Thread:
    """One host thread's operations, sorted by start, each with the index of the one enclosing it."""

    starts: list[float] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)

    def add(self, event: dict) -> None:
        """Append ``event`` (in start order) and find its parent among the open operations."""
        parent = len(self.events) - 1
        while parent >= 0 and not self._encloses(parent, event["ts"]):
            parent = self.parents[parent]
        self.starts.append(event["ts"])
        self.events.append(event)
        self.parents.append(parent)

    def _encloses(self, i: int, ts: float) -> bool:
        event = self.events[i]
        return event["ts"] <= ts <= event["ts"] + event.get("dur", 0.0)

    def enclosing(self, ts: float) -> list[str]:
        """Names of the operations running at ``ts``, outermost first."""
        i = bisect.bisect_right(self.starts, ts) - 1
        while i >= 0 and not self._encloses(i, ts):
            i = self.parents[i]
        names = []
        while i >= 0:
            names.append(self.events[i]["name"])
            i = self.parents[i]
        return names[::-1]


@dataclass
class Gap:
    """An idle interval of the device (µs) and the host operations around the launch that ended it."""

    start: float
    length: float
    chain: list[str]


def _events(trace: dict | str | Path) -> list[dict]:
    """The complete ("X") events of a trace: a dict, or a JSON file (gzipped when its name ends in .gz)."""
    if not isinstance(trace, dict):
        path = Path(trace)
        with (gzip.open(path, "rt") if path.suffix == ".gz" else path.open()) as f:
            trace = json.load(f)
    return [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]


def find_gaps(trace: dict | str | Path, min_gap_us: float = 5.0) -> tuple[list[Gap], float, float]:
    """(the device's idle gaps of at least ``min_gap_us`` between its first and last activity, busy µs,
    span µs). Work on every stream of the device counts as busy."""
    events = _events(trace)
    device = sorted((e for e in events if e.get("cat") in DEVICE_CATEGORIES), key=lambda e: e["ts"])
    gaps: list[Gap] = []
    if not device:
        return gaps, 0.0, 0.0
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {})}
    threads: dict[tuple, _Thread] = defaultdict(_Thread)
    host = sorted((e for e in events if e.get("cat") in HOST_CATEGORIES), key=lambda e: (e["ts"], -e.get("dur", 0.0)))
    for e in host:
        threads[(e.get("pid"), e.get("tid"))].add(e)
    busy, end = 0.0, device[0]["ts"]
    for e in device:
        start, stop = e["ts"], e["ts"] + e.get("dur", 0.0)
        if start - end >= min_gap_us:
            launch = launches.get(e.get("args", {}).get("correlation"))
            chain = ["(launch not in the trace)"]
            if launch is not None:
                chain = threads[(launch.get("pid"), launch.get("tid"))].enclosing(launch["ts"]) or [launch["name"]]
            gaps.append(Gap(end, start - end, chain))
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return gaps, busy, end - device[0]["ts"]


def gap_table(trace: dict | str | Path, steps: int = 1, rows: int = 30, min_gap_us: float = 5.0) -> str:
    """A markdown report: the device's busy and idle time, the idle time by step phase, then by the
    innermost host operation of the launch that ended it (with its three outer operations), per step."""
    gaps, busy, span = find_gaps(trace, min_gap_us)
    idle = sum(g.length for g in gaps)
    by_phase: dict[str, float] = defaultdict(float)
    by_site: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for g in gaps:
        by_phase[phase(g.chain)] += g.length
        inner = g.chain[-1]
        outer = " < ".join(reversed(g.chain[-4:-1])) or "-"
        by_site[(inner, outer)][0] += g.length
        by_site[(inner, outer)][1] += 1
    lines = [f"device span {span / 1e3 / steps:.1f} ms a step: busy {busy / 1e3 / steps:.1f} ms, idle in gaps of "
             f"at least {min_gap_us:g} us {idle / 1e3 / steps:.1f} ms ({len(gaps) / steps:.0f} gaps a step)",
             "idle ms a step by phase: " + ", ".join(f"{name} {by_phase[name] / 1e3 / steps:.1f}"
                                                      for name in ("encoders", "forward", "backward", "rest")),
             "",
             "| idle ms a step | gaps a step | host operation that launched the work ending the gap | within |",
             "|---|---|---|---|"]
    for (inner, outer), (total, count) in sorted(by_site.items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f"| {total / 1e3 / steps:.2f} | {count / steps:.1f} | {inner} | {outer} |")
    return "\n".join(lines) + "\n"
