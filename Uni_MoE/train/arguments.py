"""Command-line arguments: the original launch scripts' names, plus ours (``--stage``, ``--expert_dirs`` ...).

Parsed with transformers' ``HfArgumentParser`` into three dataclasses. Flags the original accepts but
this implementation does not need (``--lazy_preprocess``, ``--version v1``, ``--mix_va`` ...) still parse;
:func:`parse_args` logs a note for each one given and otherwise ignores it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import Any

import transformers

from .profiling import parse_steps

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Which checkpoint to start from and how the stage builds its model."""

    model_name_or_path: str = field(default="checkpoint/tiny", metadata={"help": "save_pretrained folder to start from"})
    stage: int = field(default=3, metadata={"help": "1 connectors, 2 single-modality expert, 3 MoE tuning"})
    expert_dirs: list[str] = field(
        default_factory=list,
        metadata={"help": "stage 3: stage-2 outputs whose MLPs initialise the experts, in expert order (cycled)"},
    )
    num_experts: int | None = field(default=None, metadata={"help": "stage 3: experts per MoE layer (default: config)"})
    num_experts_per_tok: int | None = field(default=None, metadata={"help": "stage 3: top-k (default: config)"})
    moe_layers: str | None = field(
        default=None, metadata={"help": "stage 3: all | even | odd | comma-separated layer indices (default: all)"}
    )
    expert_lora_r: int = field(default=8, metadata={"help": "stage 3: rank of each expert's built-in LoRA (0 = none)"})
    expert_lora_alpha: int = 16
    aux_balance_loss_coef: float | None = field(default=None, metadata={"help": "stage 3: GShard balance loss weight"})
    train_full_llm: bool = field(
        default=False,
        metadata={"help": "train every LLM weight instead of LoRA (stages 1-2; for randomly initialised tiny models)"},
    )
    train_lm_head: bool = field(
        default=False, metadata={"help": "also train the output head (a random tiny LLM's head maps to no word)"}
    )
    tune_mm_mlp_adapter: bool | None = field(default=None, metadata={"help": "train the image projector"})
    tune_mm_audio_projector: bool | None = field(default=None, metadata={"help": "train the speech/audio projectors"})
    tune_mm_audio_aligner: bool | None = field(default=None, metadata={"help": "train the whole speech/audio Q-formers"})
    pretrain_mm_mlp_adapter: str | None = field(default=None, metadata={"help": "file with mm_projector weights"})
    pretrain_audio_aligner: str | None = field(default=None, metadata={"help": "file with Q-former + projector weights"})
    mm_projector_type: str | None = None
    mm_vision_select_layer: int | None = None
    mm_vision_select_feature: str | None = None
    enable_deepspeed_moe: bool = field(
        default=False, metadata={"help": "stage 3: DeepSpeed-MoE experts, sharded over --ep_size ranks (v2)"}
    )
    ep_size: int | None = field(default=None, metadata={"help": "expert-parallel ranks (default: config's ep_size)"})
    mlp_dir: str | None = field(
        default=None, metadata={"help": "stage 3: the original v2 Experts folder (mlp_*.bin) for the expert bases"}
    )
    vision_tower: str | None = field(default=None, metadata={"help": "recorded; the checkpoint holds the encoder"})
    audio_tower: str | None = field(default=None, metadata={"help": "recorded; the checkpoint holds the encoder"})


@dataclass
class DataArguments:
    """Training data and how it is read."""

    data_path: list[str] = field(default_factory=list, metadata={"help": "training JSON file(s) in the original schema"})
    data_root: str | None = field(default=None, metadata={"help": "folder that relative media paths are under"})
    image_folder: str | None = field(default=None, metadata={"help": "the original's name for --data_root"})
    image_aspect_ratio: str | None = None
    skip_bad_samples: bool = field(
        default=False, metadata={"help": "skip (and count) unreadable samples instead of stopping"}
    )
    cache_data: bool = field(default=False, metadata={"help": "keep decoded samples in memory (small data sets)"})

    def root(self) -> str | None:
        return self.data_root or self.image_folder


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """transformers' TrainingArguments with the original's extra fields and this project's defaults."""

    model_max_length: int = 2048
    group_by_modality_length: bool = field(
        default=False, metadata={"help": "batches of one modality mix each, similar lengths; nothing dropped"}
    )
    llm_lora_enable: bool | None = field(default=None, metadata={"help": "PEFT LoRA on the LLM (default: by stage)"})
    lora_enable: bool | None = field(default=None, metadata={"help": "the original's other name for --llm_lora_enable"})
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    warmup_ratio: float | None = field(default=None, metadata={"help": "warmup as a fraction of all steps"})
    evaluation_strategy: str | None = field(default=None, metadata={"help": "the old name for --eval_strategy"})
    optim: str = "adamw_torch"
    report_to: None | str | list[str] = "tensorboard"
    remove_unused_columns: bool = False
    activation_checkpointing_kwargs: dict[str, Any] | str | None = field(default_factory=lambda: {"use_reentrant": False})
    moe_recompute: bool = field(
        default=False,
        metadata={"help": "MoE layers keep no expert gate/up activations and recompute them in backward (less "
                  "memory for one more pass of those projections, and with expert parallelism one more exchange of "
                  "the received rows; unlike --gradient_checkpointing, nothing else is recomputed)"},
    )
    profile_steps: str = field(
        default="", metadata={"help": "A-B: profile optimizer steps A..B into output_dir/profile (tables, trace)"}
    )
    resume_from_checkpoint: str | None = field(
        default="auto", metadata={"help": "checkpoint folder, 'auto' (latest in output_dir if any) or 'none'"}
    )

    def __post_init__(self) -> None:
        if self.warmup_ratio is not None:
            self.warmup_steps = self.warmup_ratio
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        if self.lora_enable is not None and self.llm_lora_enable is None:
            self.llm_lora_enable = self.lora_enable
        if self.profile_steps:
            parse_steps(self.profile_steps)  # a bad range stops the run before the model loads
        if self.deepspeed:  # before transformers starts torch.distributed through DeepSpeed
            from ..model.moe.deepspeed_backend import skip_cpu_shared_memory_op

            skip_cpu_shared_memory_op()
        super().__post_init__()


@dataclass
class AcceptedArguments:
    """Flags of the original scripts that this implementation accepts and does not need."""

    version: str = field(default="v1", metadata={"help": "conversation template; vicuna_v1 is the only one"})
    lazy_preprocess: bool = field(default=True, metadata={"help": "samples are always read lazily"})
    is_multimodal: bool = True
    mix_va: bool = field(default=False, metadata={"help": "no dummy media are fed: absent modalities are skipped"})
    mm_use_im_start_end: bool = False
    mm_use_im_patch_token: bool = False
    freeze_backbone: bool = False
    freeze_mm_mlp_adapter: bool = False
    mm_projector_lr: float | None = None
    lora_weight_path: str = ""
    lora_bias: str = "none"
    bits: int = 16
    double_quant: bool = True
    quant_type: str = "nf4"
    cache_dir: str | None = None
    mpt_attn_impl: str = "triton"
    language: str | None = None
    eval_ep_size: int = 1


def note_accepted(accepted: AcceptedArguments) -> list[str]:
    """Log (and return) a note for each accepted-but-unused flag that differs from its default."""
    notes = []
    for f in fields(accepted):
        value = getattr(accepted, f.name)
        if value != (f.default_factory() if callable(f.default_factory) else f.default):
            reason = f.metadata.get("help", "not needed by this implementation")
            notes.append(f"--{f.name}={value!r} is accepted and ignored: {reason}")
    if accepted.version not in ("v1", "vicuna_v1"):
        raise ValueError(f"--version {accepted.version!r}: only the vicuna_v1 template ('v1') is implemented")
    if accepted.bits != 16:
        raise ValueError(f"--bits {accepted.bits}: quantised training is not implemented; use 16")
    if accepted.mm_use_im_start_end:
        raise ValueError("--mm_use_im_start_end True is not implemented (the released models use False)")
    for note in notes:
        logger.warning(note)
    return notes


def parse_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, TrainingArguments, AcceptedArguments]:
    """Parse a command line (``sys.argv`` when None); unknown flags are an error naming them."""
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, AcceptedArguments))
    model_args, data_args, train_args, accepted = parser.parse_args_into_dataclasses(args=argv)
    if model_args.stage not in (1, 2, 3):
        raise ValueError(f"--stage {model_args.stage}: expected 1, 2 or 3")
    if not data_args.data_path:
        raise ValueError("--data_path is required (one or more training JSON files)")
    note_accepted(accepted)
    return model_args, data_args, train_args, accepted
