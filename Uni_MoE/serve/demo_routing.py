"""Which experts a reply's tokens went to: forward hooks that keep every MoE layer's choices during
generation (each forward overwrites the layer's ``routing``), counts per token group, and a heatmap.

The prefill forward routes the prompt; each later forward routes one answer token as it is fed back,
so the answer's routing covers every generated token but the last (which is never fed back).
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from typing import Iterator

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

ANSWER = "answer"


class RoutingRecorder:
    """Collects the [S, k] expert choices of batch row 0 from each MoE layer, forward by forward."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        self.steps: list[list[torch.Tensor]] = [[] for _ in layers]

    def _hook(self, index: int):
        def keep(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if module.routing is not None:
                self.steps[index].append(module.routing[0].reshape(-1, module.routing.shape[-1]).cpu())

        return keep

    @contextmanager
    def recording(self) -> Iterator["RoutingRecorder"]:
        """Hooks on every MoE layer for the duration of the block; earlier records are dropped."""
        self.steps = [[] for _ in self.layers]
        handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def counts(self, prompt_groups: list[str], num_experts: int) -> dict[str, np.ndarray]:
        """Per group (a prompt token's modality, or ``answer``): [layers, experts] routed-token counts.

        ``prompt_groups[i]`` names prompt position i; each token counts once for each expert it chose.
        """
        groups = list(dict.fromkeys(prompt_groups)) + [ANSWER]
        out = {g: np.zeros((len(self.layers), num_experts), dtype=np.int64) for g in groups}
        labels = np.asarray(prompt_groups)
        for layer, steps in enumerate(self.steps):
            if not steps:
                continue
            prompt = steps[0].numpy()
            for group in groups[:-1]:
                chosen = prompt[labels == group].ravel()
                out[group][layer] += np.bincount(chosen, minlength=num_experts)
            for step in steps[1:]:
                out[ANSWER][layer] += np.bincount(step[-1].numpy(), minlength=num_experts)
        return out


def routing_summary(counts: dict[str, np.ndarray]) -> dict[str, list[list[int]]]:
    """Counts as plain lists (JSON for the UI and the API)."""
    return {group: table.tolist() for group, table in counts.items()}


def routing_figure(counts: dict[str, np.ndarray], layer_ids: list[int], top_k: int) -> Image.Image:
    """One heatmap per token group (answer first): MoE layers down, experts across, token counts."""
    groups = [ANSWER] + [g for g in counts if g != ANSWER]
    n_layers, n_experts = counts[ANSWER].shape
    fig, axes = plt.subplots(1, len(groups), figsize=(2.0 + 1.9 * len(groups) + 0.25 * n_experts * len(groups),
                                                        1.4 + 0.32 * n_layers), squeeze=False)
    for ax, group in zip(axes[0], groups):
        table = counts[group]
        ax.imshow(table, cmap="viridis", aspect="auto", vmin=0, vmax=max(1, int(table.max())))
        ax.set_title(f"{group} ({int(table[0].sum()) // top_k} tokens)", fontsize=9)
        ax.set_xticks(range(n_experts), [str(e) for e in range(n_experts)], fontsize=7)
        ax.set_yticks(range(n_layers), [str(i) for i in layer_ids], fontsize=7)
        ax.set_xlabel("expert", fontsize=8)
        if n_layers * n_experts <= 256:
            peak = max(1, int(table.max()))
            for (row, col), value in np.ndenumerate(table):
                ax.text(col, row, str(value), ha="center", va="center", fontsize=6,
                        color="black" if value > 0.6 * peak else "white")
    axes[0][0].set_ylabel("layer", fontsize=8)
    fig.suptitle("Experts chosen per MoE layer (top-%d)" % top_k, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")
