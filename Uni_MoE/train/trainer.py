"""UniMoETrainer: transformers' Trainer with Uni-MoE batches, statistics and sampling.

It drops the batch's bookkeeping keys (``modality``, ``sample_index``) before the forward pass, logs the
LM and balance losses, loss per sample modality and expert load per token modality, and serves the
modality-grouped sampler. Everything else (DeepSpeed, checkpoint/resume, TensorBoard, progress bars,
gradient checkpointing, mixed precision) is the Trainer's own, except that a checkpoint is written into a
staging folder and renamed into place once complete (``compat.StagedCheckpointSaving``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..checkpoint.io import check_checkpoint_folder
from ..compat import StagedCheckpointSaving
from .gpu_gaps import FORWARD
from .moe_optimizer import mark_expert_parameters, with_moe_param_groups
from .sampler import ModalityGroupedSampler
from .tracking import RoutingTracker

BOOKKEEPING_KEYS = ("modality", "sample_index")
CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
logger = logging.getLogger(__name__)


def last_complete_checkpoint(folder: str | Path) -> str | None:
    """The highest ``checkpoint-N`` in ``folder`` holding ``trainer_state.json`` (the Trainer's last write).

    Checkpoints are renamed into place only once complete; the state-file test also skips incomplete
    folders left by other writers.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    steps = {int(m.group(1)): p for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))}
    for path in (steps[step] for step in sorted(steps, reverse=True)):
        if (path / TRAINER_STATE_NAME).is_file():
            return str(path)
        logger.warning("ignoring incomplete checkpoint %s (no %s)", path, TRAINER_STATE_NAME)
    return None


class UniMoETrainer(StagedCheckpointSaving, Trainer):
    """Trainer for UniMoEForCausalLM (plain or with PEFT LoRA injected in place)."""

    def __init__(self, *args: Any, modalities: list[str] | None = None, lengths: list[int] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # the model returns a per-batch mean; Trainer scales it for GA
        self.sample_modalities = modalities
        self.sample_lengths = lengths
        core = self.model
        moe = core.moe_mlps()
        self.tracker = RoutingTracker(
            core.config.placeholder_token_ids(), moe[0].num_experts if moe else 0, len(moe)
        )

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """The Trainer's ``train``, after checking every pickle of the checkpoint to resume from (DeepSpeed
        reads its states with ``weights_only=False``; a pickle that could run code is refused, named)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
        if resume_from_checkpoint:
            check_checkpoint_folder(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _get_train_sampler(self, train_dataset=None) -> torch.utils.data.Sampler | None:
        if not getattr(self.args, "group_by_modality_length", False):
            return super()._get_train_sampler(train_dataset)
        if self.sample_modalities is None or self.sample_lengths is None:
            raise ValueError("--group_by_modality_length needs per-sample modalities and lengths")
        megabatch = self.args.world_size * self.args.train_batch_size * self.args.gradient_accumulation_steps
        return ModalityGroupedSampler(self.sample_modalities, self.sample_lengths, megabatch, self.args.seed)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """DeepSpeed-MoE experts get their own parameter groups (DeepSpeed reduces them over the
        expert-data-parallel ranks only)."""
        if self.optimizer is None and mark_expert_parameters(self.model):
            optimizer_cls, kwargs = self.optimizer_cls_and_kwargs or self.get_optimizer_cls_and_kwargs(
                self.args, self.model
            )
            self.optimizer_cls_and_kwargs = (with_moe_param_groups(optimizer_cls), kwargs)
        return super().create_optimizer(model)

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
        with torch.profiler.record_function(FORWARD):  # a phase of --profile_steps' gap table
            outputs = model(**inputs)
        if model.training:
            routing = self.accelerator.unwrap_model(model).collect_routing()
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
