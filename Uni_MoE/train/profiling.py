"""``--profile_steps A-B``: torch.profiler over optimizer steps A..B of a training run, written to
``<output_dir>/profile/`` as the operator table (``ops_rank<R>.txt``, by device time, then by host time), the
host synchronisations by the Python line that made them (``syncs_rank<R>.txt``), a Chrome / Perfetto
trace (``trace_rank<R>.json``) and, on a GPU, the device's idle time by the host operation that ended it
(``gaps_rank<R>.txt``), so that a slow run can be taken apart where it runs."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .gpu_gaps import gap_table
from .sync_sites import SyncRecorder


def operator_tables(prof: profile, rows: int) -> str:
    """The profiled operators as two tables: by self device time (self host time without CUDA), then by self
    host time."""
    table = prof.key_averages()
    device_key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return "\n".join([table.table(sort_by=device_key, row_limit=rows), "",
                      table.table(sort_by="self_cpu_time_total", row_limit=rows)])


CUDA_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


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
        self.syncs = SyncRecorder()

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if self.prof is None and state.global_step + 1 == self.first:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=activities, record_shapes=True)
            self.prof.start()
            self.syncs.start()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if self.prof is not None and state.global_step >= self.last:
            self.syncs.stop()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.prof.stop()
            self.write(state.global_step - self.first + 1)
            self.prof = None

    def write(self, steps: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        text = f"{steps} profiled steps; totals over all of them\n\n{operator_tables(self.prof, self.rows)}"
        (self.folder / f"ops_rank{self.rank}.txt").write_text(text)
        runtime = sum(1 for e in self.prof.events() if e.name in CUDA_SYNCS)
        (self.folder / f"syncs_rank{self.rank}.txt").write_text(
            f"{steps} profiled steps; {runtime} CUDA runtime synchronisations in the profile\n\n{self.syncs.table()}")
        trace = self.folder / f"trace_rank{self.rank}.json"
        self.prof.export_chrome_trace(str(trace))
        if torch.cuda.is_available():
            (self.folder / f"gaps_rank{self.rank}.txt").write_text(
                f"{steps} profiled steps\n\n{gap_table(trace, steps, self.rows)}")
