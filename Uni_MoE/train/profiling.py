"""``--profile_steps A-B``: torch.profiler over optimizer steps A..B of a training run, written to
``<output_dir>/profile/`` as the operator table (``ops_rank<R>.txt``, by device time, then by host time), the
host synchronisations by the Python line that made them (``syncs_rank<R>.txt``) and a Chrome / Perfetto
trace (``trace_rank<R>.json``), so that a slow run can be taken apart where it runs."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments


def operator_tables(prof: profile, rows: int) -> str:
    """The profiled operators as two tables: by self device time (self host time without CUDA), then by self
    host time."""
    table = prof.key_averages()
    device_key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return "\n".join([table.table(sort_by=device_key, row_limit=rows), "",
                      table.table(sort_by="self_cpu_time_total", row_limit=rows)])


CUDA_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
CPU_SYNCS = ("aten::_local_scalar_dense",)  # a tensor read on the host (.item(), bool(), float()); a sync on CUDA
_FRAME = re.compile(r"^(?P<file>.+?)\((?P<line>\d+)\): (?P<func>.+)$")  # the profiler's Python-frame events


def _package_path(file: str) -> str:
    """A frame's source path as the profiler names it, without any machine prefix: from the package folder
    (``torch/...``, ``transformers/...``, ``Uni_MoE/...``), a script by its own folder and name."""
    file = file.replace(os.sep, "/")
    if "/Uni_MoE/" in file:
        return "Uni_MoE/" + file.split("/Uni_MoE/", 1)[1]
    for anchor in ("/site-packages/", "/dist-packages/"):
        if anchor in file:
            return file.split(anchor, 1)[1]
    return "/".join(file.split("/")[-2:]) if file.startswith("/") else file


def sync_sites(prof: profile, names: tuple[str, ...] = CUDA_SYNCS, rows: int = 30) -> str:
    """The profiled host synchronisations (events named ``names``) counted by where they were made: the
    innermost Python frame outside torch, and the innermost frame of this package when that is another one.
    Needs a profile taken ``with_stack=True``: its Python-frame events enclose the synchronisations in time
    on their thread (CUDA runtime events have no parent in the profiler's tree, so time decides)."""
    events = list(prof.events())
    frames_by_thread: dict[int, list[tuple[int, int, str, str]]] = {}
    for event in events:
        match = _FRAME.match(event.name)
        if match:
            path = _package_path(match["file"])
            if not path.startswith("torch/"):
                frames_by_thread.setdefault(event.thread, []).append(
                    (event.time_range.start, event.time_range.end, path, f"{path}:{match['line']} {match['func']}"))
    sites: Counter[tuple[str, str]] = Counter()
    for event in events:
        if event.name not in names:
            continue
        start, end = event.time_range.start, event.time_range.end
        def around(frames: list[tuple[int, int, str, str]]) -> list[tuple[int, int, str, str]]:
            return sorted((f for f in frames if f[0] <= start and end <= f[1]), key=lambda f: f[0], reverse=True)

        # innermost first; on the event's own thread, else (a runtime thread id that differs) on any
        enclosing = around(frames_by_thread.get(event.thread, [])) or around(
            [f for frames in frames_by_thread.values() for f in frames])
        site = enclosing[0][3] if enclosing else "(no Python frame recorded)"
        ours = next((label for _, _, path, label in enclosing if path.startswith("Uni_MoE/")), "-")
        sites[(site, ours if ours != site else "")] += 1
    lines = [f"{sum(sites.values())} host synchronisations ({', '.join(names)})", "",
             "| count | function (file:first line; innermost outside torch) | the innermost in Uni_MoE |",
             "|---|---|---|"]
    lines += [f"| {n} | {site} | {ours} |" for (site, ours), n in sites.most_common(rows)]
    return "\n".join(lines) + "\n"


def parse_steps(spec: str) -> tuple[int, int]:
    """"A-B" (or "A") -> (A, B), first and last profiled step, 1-based; raises ValueError naming the flag."""
    first, _, last = spec.partition("-")
    try:
        a, b = int(first), int(last or first)
    except ValueError:
        raise ValueError(f"--profile_steps {spec!r}: expected A-B, e.g. 5-7") from None
    if not 1 <= a <= b:
        raise ValueError(f"--profile_steps {spec!r}: need 1 <= A <= B")
    return a, b


class ProfileCallback(TrainerCallback):
    """Starts the profiler before step A and writes its tables after step B (steps counted from 1)."""

    def __init__(self, spec: str, output_dir: str | Path, rank: int = 0, rows: int = 40) -> None:
        self.first, self.last = parse_steps(spec)
        self.folder = Path(output_dir) / "profile"
        self.rank = rank
        self.rows = rows
        self.prof: profile | None = None

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if self.prof is None and state.global_step + 1 == self.first:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=activities, record_shapes=True, with_stack=True)
            self.prof.start()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if self.prof is not None and state.global_step >= self.last:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.prof.stop()
            self.write(state.global_step - self.first + 1)
            self.prof = None

    def write(self, steps: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        text = f"{steps} profiled steps; totals over all of them\n\n{operator_tables(self.prof, self.rows)}"
        (self.folder / f"ops_rank{self.rank}.txt").write_text(text)
        names = CUDA_SYNCS if torch.cuda.is_available() else CPU_SYNCS
        syncs = sync_sites(self.prof, names)
        (self.folder / f"syncs_rank{self.rank}.txt").write_text(f"{steps} profiled steps\n\n{syncs}")
        self.prof.export_chrome_trace(str(self.folder / f"trace_rank{self.rank}.json"))
