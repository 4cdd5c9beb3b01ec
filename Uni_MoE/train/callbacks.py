"""Saves the expert load per token modality beside each checkpoint: a plot (``expert_load.png``) and the
raw [layer, expert] counts (``expert_load.json``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .tracking import RoutingTracker


def plot_expert_load(load: dict[str, torch.Tensor], path: Path, title: str = "") -> None:
    """Grouped bars: for each token modality, the share of its routed tokens each expert received."""
    import matplotlib  # at the first save, not at import: training itself does not need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = {m: c.sum(dim=0).double() for m, c in load.items() if int(c.sum())}
    fig, ax = plt.subplots(figsize=(7, 3.5))
    if shown:
        num_experts = next(iter(shown.values())).numel()
        width = 0.8 / len(shown)
        for k, (modality, counts) in enumerate(shown.items()):
            xs = [e + (k - (len(shown) - 1) / 2) * width for e in range(num_experts)]
            ax.bar(xs, (counts / counts.sum()).tolist(), width, label=modality)
        ax.set_xticks(range(num_experts), [f"expert {e}" for e in range(num_experts)])
        ax.legend(fontsize="small")
    ax.set_ylabel("share of the modality's tokens")
    ax.set_title(title or "expert load per modality (all MoE layers)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_expert_load(load: dict[str, torch.Tensor], folder: Path, title: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "expert_load.json").write_text(json.dumps({m: c.tolist() for m, c in load.items()}) + "\n")
    plot_expert_load(load, folder / "expert_load.png", title)


class ExpertLoadCallback(TrainerCallback):
    """At every save, writes the load accumulated since the previous save into the checkpoint folder; at the
    end of training, the whole run's load into the output folder."""

    def __init__(self, tracker: RoutingTracker) -> None:
        self.tracker = tracker
        self.total: dict[str, torch.Tensor] = {}

    def _write(self, load: dict[str, torch.Tensor], folder: Path, state: TrainerState, title: str) -> None:
        if state.is_world_process_zero and self.tracker.num_layers:
            write_expert_load(load, folder, f"{title}, step {state.global_step}")

    def _pop(self) -> dict[str, torch.Tensor]:
        load = self.tracker.pop_load()
        for modality, counts in load.items():
            self.total[modality] = self.total[modality] + counts if modality in self.total else counts.clone()
        return load

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self._write(self._pop(), folder, state, "expert load per modality since the previous checkpoint")

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        self._pop()
        self._write(self.total, Path(args.output_dir), state, "expert load per modality, whole run up to")
