"""Entry point of every training stage: ``python -m Uni_MoE.train --stage 1|2|3 ...`` (or ``deepspeed``).

Parses the original scripts' arguments, builds the stage's model and trainable set, trains with
UniMoETrainer (resuming from the latest checkpoint in ``--output_dir`` by default), and exports a plain
``save_pretrained`` folder with PEFT LoRA merged.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import torch
import transformers

from ..config import UniMoEConfig
from ..data.collate import Collator
from ..data.tokenizer import load_tokenizer
from ..data.validate import DataValidationError
from ..model_folder import ModelFolderError, require_model_folder
from ..processing_uni_moe import visual_token_count
from . import stages
from .arguments import DataArguments, ModelArguments, TrainingArguments, parse_args
from .callbacks import ExpertLoadCallback
from .gc_freeze import GcFreezeCallback
from .profiling import ProfileCallback
from .data import checked_samples, estimated_length, training_dataset
from .trainer import UniMoETrainer, last_complete_checkpoint

logger = logging.getLogger(__name__)


def resolve_resume(train_args: TrainingArguments) -> str | None:
    """``auto``: the last complete checkpoint in output_dir, if any; ``none``: start fresh; else the folder."""
    value = train_args.resume_from_checkpoint
    if value in (None, "", "none", "None", "false", "False"):
        return None
    if value == "auto":
        last = last_complete_checkpoint(train_args.output_dir)
        if last:
            logger.warning("resuming from %s", last)
        return last
    if not Path(value).is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: no such checkpoint folder")
    return value


def _zero3_gathered(trainer: UniMoETrainer) -> contextlib.AbstractContextManager:
    """Full parameters for export under ZeRO-3 (a no-op otherwise)."""
    ds = getattr(trainer, "deepspeed", None)
    if ds is None or ds.config.get("zero_optimization", {}).get("stage") != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(trainer.model.parameters()), modifier_rank=0)


def data_config(model_args: ModelArguments, data_args: DataArguments) -> UniMoEConfig:
    """The model's config as the data pipeline reads it (encoders, image size and aspect, tokens per image,
    audio limits), read without the weights so the data is checked before the model loads."""
    config = UniMoEConfig.from_pretrained(model_args.model_name_or_path)
    if model_args.mm_vision_select_feature is not None:
        config.mm_vision_select_feature = model_args.mm_vision_select_feature
    if data_args.image_aspect_ratio is not None:
        config.image_aspect_ratio = data_args.image_aspect_ratio
    return config


def run(model_args: ModelArguments, data_args: DataArguments, train_args: TrainingArguments) -> Path:
    """Check the data, then train one stage and export its output folder; returns that folder."""
    transformers.set_seed(train_args.seed)
    tokenizer = load_tokenizer(require_model_folder(model_args.model_name_or_path))
    report = checked_samples(
        data_args.data_path, tokenizer, data_config(model_args, data_args), data_args.root(),
        train_args.model_max_length, data_args.skip_bad_samples, train_args.dataloader_num_workers,
        show_progress=train_args.local_process_index == 0 and not train_args.disable_tqdm,
    )
    model = stages.build_model(model_args)
    if model_args.pretrain_mm_mlp_adapter:
        stages.load_connector_weights(model, model_args.pretrain_mm_mlp_adapter, "mm_projector")
    if model_args.pretrain_audio_aligner:
        stages.load_connector_weights(model, model_args.pretrain_audio_aligner, "mm_audio_aligner")
    if data_args.image_aspect_ratio is not None:
        model.config.image_aspect_ratio = data_args.image_aspect_ratio
    stages.apply_moe_recompute(model, train_args)
    recipe = stages.make_recipe(model, model_args, train_args)
    stages.apply_recipe(model, recipe, train_args)

    samples = report.samples
    dataset = training_dataset(samples, tokenizer, model.config, data_args.root(), train_args.model_max_length,
                               data_args.cache_data)
    per_visual = visual_token_count(model.config) if model.config.vision_config else 0
    trainer = UniMoETrainer(
        model=model,
        args=train_args,
        train_dataset=dataset,
        data_collator=Collator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        modalities=[s.modality for s in samples],
        lengths=[estimated_length(s, model.config, per_visual) for s in samples],
    )
    trainer.add_callback(ExpertLoadCallback(trainer.tracker))
    trainer.add_callback(GcFreezeCallback())
    if train_args.profile_steps:
        trainer.add_callback(ProfileCallback(train_args.profile_steps, train_args.output_dir,
                                             train_args.process_index))
    trainer.train(resume_from_checkpoint=resolve_resume(train_args))
    if report.issues:
        logger.warning("training data: %s%s", report.summary(), "; the bad ones were skipped" if report.errors else "")
    with _zero3_gathered(trainer):
        out = stages.export(trainer.accelerator.unwrap_model(trainer.model), model_args.stage, train_args.output_dir,
                            tokenizer, trainer.args.should_save)
    logger.warning("stage %d output written to %s", model_args.stage, out)
    return out


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    model_args, data_args, train_args, _ = parse_args(argv if argv is not None else sys.argv[1:])
    if torch.cuda.is_available() and not (train_args.bf16 or train_args.fp16):
        logger.warning("training on GPU in fp32; the original scripts pass --bf16 True")
    try:
        run(model_args, data_args, train_args)
    except (ModelFolderError, DataValidationError) as err:
        sys.exit(str(err))


if __name__ == "__main__":
    main()
