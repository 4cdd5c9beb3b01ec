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


def token_modality_masks(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, placeholder_ids: dict[str, int]
) -> dict[str, torch.Tensor]:
    """[B, S] bool mask per token modality: each placeholder id, and text = real tokens that are none."""
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    masks = {m: input_ids == placeholder_ids[m] for m in TOKEN_MODALITIES[1:]}
    media = torch.stack(list(masks.values())).any(dim=0)
    return {"text": real & ~media, **masks}


def expert_load(
    routing: list[torch.Tensor], masks: dict[str, torch.Tensor], num_experts: int
) -> dict[str, torch.Tensor]:
    """Per token modality, [L, E] counts of (token, chosen expert) pairs in each MoE layer."""
    return {
        m: torch.stack([torch.bincount(r[mask].flatten(), minlength=num_experts) for r in routing]).cpu()
        for m, mask in masks.items()
    }


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of each row [B] (NaN where a row has no target)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    ce = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE_INDEX, reduction="none")
    count = (shift_labels != IGNORE_INDEX).sum(dim=1)
    return ce.sum(dim=1) / count


class RoutingTracker:
    """Accumulates statistics between log steps (``pop_logs``) and expert load between saves (``pop_load``)."""

    def __init__(self, placeholder_ids: dict[str, int], num_experts: int, num_layers: int) -> None:
        self.placeholder_ids = placeholder_ids
        self.num_experts = num_experts
        self.num_layers = num_layers
        self._reset_logs()
        self.load = self._zero_load()

    def _zero_load(self) -> dict[str, torch.Tensor]:
        return {m: torch.zeros(self.num_layers, self.num_experts, dtype=torch.long) for m in TOKEN_MODALITIES}

    def _reset_logs(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.window_load = self._zero_load()
        self.window_tokens = 0
        self.window_start = time.perf_counter()

    def _add(self, key: str, value: float) -> None:
        self.sums[key] += value
        self.counts[key] += 1

    @torch.no_grad()
    def update(self, inputs: dict, outputs, modalities: list[str] | None, routing: list[torch.Tensor]) -> None:
        """Record one micro-batch: inputs as given to the model, its outputs, sample modality labels."""
        self.window_tokens += outputs.logits.shape[0] * outputs.logits.shape[1]
        if outputs.lm_loss is not None:
            self._add("lm_loss", float(outputs.lm_loss))
        if outputs.aux_loss is not None:
            self._add("aux_loss", float(outputs.aux_loss))
        if modalities is not None and inputs.get("labels") is not None:
            for modality, loss in zip(modalities, per_sample_loss(outputs.logits, inputs["labels"]).tolist()):
                if loss == loss:
                    self._add(f"loss/{modality}", loss)
        if routing and self.num_layers:
            masks = token_modality_masks(inputs["input_ids"], inputs.get("attention_mask"), self.placeholder_ids)
            for m, counts in expert_load(routing, masks, self.num_experts).items():
                self.window_load[m] += counts
                self.load[m] += counts

    def pop_logs(self) -> dict[str, float]:
        """Means since the last call, each token modality's share of tokens per expert, and the LLM tokens
        (spliced sequence incl. padding) this process handled per second of wall time since the last call."""
        logs = {k: self.sums[k] / self.counts[k] for k in sorted(self.sums)}
        if self.window_tokens:
            logs["tokens_per_second_per_device"] = self.window_tokens / (time.perf_counter() - self.window_start)
        for m, counts in self.window_load.items():
            per_expert = counts.sum(dim=0)
            total = int(per_expert.sum())
            if total:
                logs.update({f"expert_load/{m}/e{e}": float(c) / total for e, c in enumerate(per_expert.tolist())})
        self._reset_logs()
        return logs

    def pop_load(self) -> dict[str, torch.Tensor]:
        """[L, E] counts per token modality since the last call."""
        load, self.load = self.load, self._zero_load()
        return load
