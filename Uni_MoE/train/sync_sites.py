"""Where a training step makes the host wait for the GPU: every synchronisation torch's sync debug mode
reports (``torch.cuda.set_sync_debug_mode("warn")``: ``.item()``, ``bool()`` of a tensor, a copy to the
host, ``torch.cuda.synchronize()``, ...), recorded with its Python stack and counted by the line that made
it. Each one empties the GPU's queue, so the kernels launched after it start only as fast as the host
launches them; a step with many is bound by its host. A synchronisation made by a C++ operator inside the
autograd engine's backward threads reaches Python when ``backward()`` returns, so it is counted at the line
that called the backward; one made by Python code of a custom backward is counted where it is."""

from __future__ import annotations

import os
import traceback
import warnings
from collections import Counter

import torch

SYNC_WARNING = "called a synchronizing CUDA operation"  # the sync debug mode's warning text
_SKIPPED = ("warnings.py", os.path.basename(__file__))  # the warning machinery and this recorder


def package_path(file: str) -> str:
    """A source path without the machine's prefix: from the package folder (``torch/...``,
    ``transformers/...``, ``Uni_MoE/...``); anything else by its own folder and name."""
    file = file.replace(os.sep, "/")
    if "/Uni_MoE/" in file:
        return "Uni_MoE/" + file.split("/Uni_MoE/", 1)[1]
    for anchor in ("/site-packages/", "/dist-packages/"):
        if anchor in file:
            return file.split(anchor, 1)[1]
    return "/".join(file.split("/")[-2:])


class SyncRecorder:
    """While started, records the stack of each synchronisation the sync debug mode warns about (CUDA;
    without a GPU nothing synchronises and nothing is recorded). Other warnings pass through unchanged."""

    def __init__(self) -> None:
        self.stacks: list[list[traceback.FrameSummary]] = []
        self._saved: tuple | None = None

    def start(self) -> None:
        self._saved = (warnings.showwarning, warnings.filters[:])
        warnings.filterwarnings("always", message=f".*{SYNC_WARNING}")
        warnings.showwarning = self._record
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
        if self._saved is not None:
            warnings.showwarning, warnings.filters[:] = self._saved
            self._saved = None

    def _record(self, message, category, filename, lineno, file=None, line=None) -> None:
        if SYNC_WARNING in str(message):
            self.stacks.append([f for f in traceback.extract_stack() if os.path.basename(f.filename) not in _SKIPPED])
        else:
            self._saved[0](message, category, filename, lineno, file, line)

    def table(self, rows: int = 30) -> str:
        """The recorded synchronisations counted by their innermost line outside torch, with the innermost
        line of this package beside it when that is another one."""
        sites: Counter[tuple[str, str]] = Counter()
        for stack in self.stacks:
            frames = [f"{path}:{f.lineno} {f.name}" for f in reversed(stack)
                      if not (path := package_path(f.filename)).startswith("torch/")]
            site = frames[0] if frames else "(inside torch only)"
            ours = next((label for label in frames if label.startswith("Uni_MoE/")), "-")
            sites[(site, "" if ours == site else ours)] += 1
        lines = [f"{len(self.stacks)} host synchronisations reported by torch's sync debug mode", "",
                 "| count | line (innermost outside torch) | the innermost line in Uni_MoE |", "|---|---|---|"]
        lines += [f"| {n} | {site} | {ours} |" for (site, ours), n in sites.most_common(rows)]
        return "\n".join(lines) + "\n"
