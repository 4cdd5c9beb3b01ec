"""The package's coupling to transformers internals and versions, kept in one place.

- ``SubConfigSpec``: how a composite config declares its sub-configs (transformers >= 5.18); older
  versions get them built by :func:`build_sub_configs`.
- ``CACHE_ARG``: the KV cache's keyword and output field ("cache" from 5.18, "past_key_values" before).
- :class:`StagedCheckpointSaving`: the Trainer's private ``_save_checkpoint`` / ``_get_output_dir``
  overridden so that a checkpoint is written into a staging folder and renamed into place once complete.

tests/test_compat.py checks each assumption against the installed transformers, so an upgrade that
moves one of them fails there, by name, instead of in the middle of a run.
"""

from __future__ import annotations

import inspect
import os
import shutil
from pathlib import Path
from typing import Any

from transformers import LlamaModel, PreTrainedConfig

try:
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # transformers < 5.18: sub-configs are built in __post_init__ by build_sub_configs
    SubConfigSpec = None

CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
STAGING_DIR = ".saving"  # under output_dir: checkpoints being written; never read by resume


def build_sub_configs(config: PreTrainedConfig, types: dict[str, tuple[str, bool]]) -> None:
    """Dict sub-configs to config objects (field: (default model_type, may be None)), as SubConfigSpec
    does in newer transformers."""
    from transformers import CONFIG_MAPPING

    for key, (kind, optional) in types.items():
        value = getattr(config, key)
        if isinstance(value, dict):
            value = CONFIG_MAPPING[value.get("model_type", kind)](**value)
        elif value is None and not optional:
            value = CONFIG_MAPPING[kind]()
        setattr(config, key, value)


def publish_checkpoint(staged: Path, final: Path) -> None:
    """Move a completely written checkpoint folder to its final name (a same-filesystem rename)."""
    if final.exists():  # the same step saved again: swap, so a complete copy exists at every moment
        old = staged.with_name(staged.name + ".old")
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old)
    else:
        os.replace(staged, final)


class StagedCheckpointSaving:
    """Trainer mixin: ``checkpoint-N`` is written under ``output_dir/.saving`` and renamed into place, so a
    run killed while saving never leaves a half-written checkpoint for resume to pick.

    The Trainer writes a checkpoint to ``_get_output_dir(trial) / checkpoint-N`` inside
    ``_save_checkpoint``; pointing the first at the staging folder for the duration of the second moves
    every file it writes (model, optimizer, scheduler, RNG, state) there.
    """

    def _get_output_dir(self, trial: Any) -> str:
        staging = getattr(self, "_staging_dir", None)
        return str(staging) if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        from transformers.trainer import TRAINER_STATE_NAME  # the Trainer's modules load only when training
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        run_dir = Path(self._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / STAGING_DIR
        if self.args.should_save and staging.exists():  # left by a run killed while saving
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()
        self._staging_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        best = self.state.best_model_checkpoint
        if best and Path(best).parent == staging:  # the Trainer looked for the best checkpoint in staging
            self.state.best_model_checkpoint = str(run_dir / Path(best).name)
            if self.args.should_save:
                self.state.save_to_json(str(staging / name / TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish_checkpoint(staging / name, run_dir / name)
            if not any(staging.iterdir()):
                staging.rmdir()
            rotate_checkpoints(str(run_dir), self.args.save_total_limit, self.state.best_model_checkpoint,
                               use_mtime=True)
        self.accelerator.wait_for_everyone()
