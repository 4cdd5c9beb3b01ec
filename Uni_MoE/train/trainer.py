"""UniMoETrainer: transformers' Trainer with Uni-MoE batches, statistics and sampling.

It drops the batch's bookkeeping keys (``modality``, ``sample_index``) before the forward pass, logs the
LM and balance losses, loss per sample modality and expert load per token modality, and serves the
modality-grouped sampler. Everything else (DeepSpeed, checkpoint/resume, TensorBoard, progress bars,
gradient checkpointing, mixed precision) is the Trainer's own.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import Trainer

from .sampler import ModalityGroupedSampler
from .tracking import RoutingTracker

BOOKKEEPING_KEYS = ("modality", "sample_index")


class UniMoETrainer(Trainer):
    """Trainer for UniMoEForCausalLM (plain or with PEFT LoRA injected in place)."""

    def __init__(self, *args: Any, modalities: list[str] | None = None, lengths: list[int] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # the model returns a per-batch mean; Trainer scales it for GA
        self.sample_modalities = modalities
        self.sample_lengths = lengths
        core = self.model
        moe = core.moe_layers()
        self.tracker = RoutingTracker(
            core.config.placeholder_token_ids(), moe[0].num_experts if moe else 0, len(moe)
        )

    def _get_train_sampler(self, train_dataset=None) -> torch.utils.data.Sampler | None:
        if not getattr(self.args, "group_by_modality_length", False):
            return super()._get_train_sampler(train_dataset)
        if self.sample_modalities is None or self.sample_lengths is None:
            raise ValueError("--group_by_modality_length needs per-sample modalities and lengths")
        megabatch = self.args.world_size * self.args.train_batch_size * self.args.gradient_accumulation_steps
        return ModalityGroupedSampler(self.sample_modalities, self.sample_lengths, megabatch, self.args.seed)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        modalities = inputs.pop("modality", None)
        for key in BOOKKEEPING_KEYS[1:]:
            inputs.pop(key, None)
        outputs = model(**inputs)
        if model.training:
            routing = self.accelerator.unwrap_model(model).routing()
            self.tracker.update(inputs, outputs, modalities, [r for r in routing if r is not None])
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self._gathered(self.tracker.pop_logs()))
        super().log(logs, start_time)

    def _gathered(self, logs: dict[str, float]) -> dict[str, float]:
        """Average each statistic over the ranks that have it."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return logs
        every: list[dict[str, float]] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(every, logs)
        keys = sorted({k for d in every for k in d})
        return {k: sum(d[k] for d in every if k in d) / sum(k in d for d in every) for k in keys}
