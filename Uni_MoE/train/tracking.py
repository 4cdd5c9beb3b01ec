"""Training statistics beyond the loss: LM and balance loss, loss per sample modality, and expert load
per token modality (how many tokens of text, image, video, speech and audio each expert receives), and
throughput."""

from __future__ import annotations

import time
from collections import defaultdict

import torch
import torch.nn.functional as F

from ..data.conversation import IGNORE_INDEX
from ..modalities import MODALITY_NAMES

TOKEN_MODALITIES = ("text", *MODALITY_NAMES)


def token_modality_ids(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, placeholder_ids: dict[str, int]
) -> torch.Tensor:
    """[B, S] index into TOKEN_MODALITIES of every token (text = a real token that is no placeholder), -1 for
    padding."""
    ids = torch.zeros_like(input_ids)
    for i, m in enumerate(TOKEN_MODALITIES[1:], start=1):
        ids = torch.where(input_ids == placeholder_ids[m], i, ids)
    if attention_mask is not None:
        ids = ids.masked_fill(~attention_mask.bool(), -1)
    return ids


def expert_load(routing: list[torch.Tensor], token_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[L, M, E] counts of (token, chosen expert) pairs per MoE layer and token modality (TOKEN_MODALITIES
    order), padding left out; one scatter on the routing's device, no host synchronisation."""
    layers, modalities = len(routing), len(TOKEN_MODALITIES)
    bins = modalities * num_experts + 1  # the last bin takes padding
    chosen = torch.stack([r.reshape(*token_ids.shape, -1) for r in routing])  # [L, B, S, k]
    tm = token_ids.unsqueeze(-1).expand_as(chosen[0])
    idx = torch.where(tm >= 0, tm * num_experts + chosen, bins - 1)
    idx = idx + torch.arange(layers, device=idx.device).view(-1, 1, 1, 1) * bins
    counts = torch.zeros(layers * bins, dtype=torch.long, device=idx.device)
    counts.scatter_add_(0, idx.flatten(), torch.ones_like(idx).flatten())
    return counts.view(layers, bins)[:, :-1].view(layers, modalities, num_experts)


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of each row [B] (NaN where a row has no target), in float32 one row at a time
    (no float32 copy of the whole batch's logits)."""
    rows = []
    for row_logits, row_labels in zip(logits, labels):
        rows.append(F.cross_entropy(row_logits[:-1].float(), row_labels[1:], ignore_index=IGNORE_INDEX,
                                    reduction="sum"))
    count = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
    return torch.stack(rows) / count


class RoutingTracker:
    """Accumulates statistics between log steps (``pop_logs``) and expert load between saves (``pop_load``).

    ``update`` runs once per micro-batch between the forward and the backward, so it keeps everything on the
    model's device and never waits for it: the values reach the host once per log step (and save)."""

    def __init__(self, placeholder_ids: dict[str, int], num_experts: int, num_layers: int) -> None:
        self.placeholder_ids = placeholder_ids
        self.num_experts = num_experts
        self.num_layers = num_layers
        self._reset_logs()
        self.load: torch.Tensor | None = None  # [L, M, E] since the last save, on the device

    def _reset_logs(self) -> None:
        self.scalars: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.sample_losses: list[tuple[list[str], torch.Tensor]] = []
        self.window_load: torch.Tensor | None = None
        self.window_tokens = 0
        self.window_start = time.perf_counter()

    @torch.no_grad()
    def update(self, inputs: dict, outputs, modalities: list[str] | None, routing: list[torch.Tensor]) -> None:
        """Record one micro-batch: inputs as given to the model, its outputs, sample modality labels."""
        self.window_tokens += inputs["input_ids"].numel()
        for key in ("lm_loss", "aux_loss"):
            value = getattr(outputs, key)
            if value is not None:
                self.scalars[key].append(value.detach().float())
        if modalities is not None and inputs.get("labels") is not None:
            losses = getattr(outputs, "sample_loss", None)
            if losses is None:
                losses = per_sample_loss(outputs.logits, inputs["labels"])
            self.sample_losses.append((list(modalities), losses.float()))
        if routing and self.num_layers:
            ids = token_modality_ids(inputs["input_ids"], inputs.get("attention_mask"), self.placeholder_ids)
            counts = expert_load(routing, ids, self.num_experts)
            self.window_load = counts if self.window_load is None else self.window_load + counts
            self.load = counts if self.load is None else self.load + counts

    def pop_logs(self) -> dict[str, float]:
        """Means since the last call, each token modality's share of tokens per expert, and the LLM tokens
        (spliced sequence incl. padding) this process handled per second of wall time since the last call."""
        logs = {key: float(torch.stack(values).mean()) for key, values in self.scalars.items()}
        if self.sample_losses:
            names = [name for batch, _ in self.sample_losses for name in batch]
            losses = torch.cat([loss for _, loss in self.sample_losses]).tolist()
            per_modality: dict[str, list[float]] = defaultdict(list)
            for name, loss in zip(names, losses):
                if loss == loss:
                    per_modality[name].append(loss)
            logs.update({f"loss/{m}": sum(v) / len(v) for m, v in per_modality.items()})
        if self.window_tokens:
            logs["tokens_per_second_per_device"] = self.window_tokens / (time.perf_counter() - self.window_start)
        if self.window_load is not None:
            for m, counts in zip(TOKEN_MODALITIES, self.window_load.sum(dim=0).tolist()):
                total = sum(counts)
                if total:
                    logs.update({f"expert_load/{m}/e{e}": c / total for e, c in enumerate(counts)})
        self._reset_logs()
        return dict(sorted(logs.items()))

    def pop_load(self) -> dict[str, torch.Tensor]:
        """[L, E] counts per token modality since the last call (on the CPU)."""
        load = self.load.cpu() if self.load is not None else torch.zeros(
            self.num_layers, len(TOKEN_MODALITIES), self.num_experts, dtype=torch.long)
        self.load = None
        return {m: load[:, i] for i, m in enumerate(TOKEN_MODALITIES)}
