"""The transformers internals the package leans on (Uni_MoE/compat.py) are where it expects them."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

from transformers import LlamaModel, Trainer
from transformers.modeling_outputs import BaseModelOutputWithPast

from Uni_MoE.compat import CACHE_ARG, STAGING_DIR, StagedCheckpointSaving, build_sub_configs, publish_checkpoint
from Uni_MoE.train.trainer import UniMoETrainer


def test_cache_keyword_is_the_models_and_its_outputs():
    assert CACHE_ARG in ("cache", "past_key_values")
    assert CACHE_ARG in inspect.signature(LlamaModel.forward).parameters
    assert CACHE_ARG in BaseModelOutputWithPast.__dataclass_fields__


def test_sub_configs_built_from_dicts_and_defaults():
    holder = SimpleNamespace(text_config={"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4}, vision_config=None,
                             speech_config=None)
    build_sub_configs(holder, {"text_config": ("llama", False), "vision_config": ("clip_vision_model", True),
                               "speech_config": ("whisper", False)})
    assert type(holder.text_config).__name__ == "LlamaConfig" and holder.text_config.hidden_size == 64
    assert holder.vision_config is None  # optional: stays off
    assert type(holder.speech_config).__name__ == "WhisperConfig"  # required: built with its defaults


def test_trainer_still_saves_through_the_methods_we_override():
    """The staged save works by pointing _get_output_dir at the staging folder during _save_checkpoint:
    both must still exist on Trainer, and the latter must still ask the former where to write."""
    for name in ("_save_checkpoint", "_get_output_dir"):
        assert callable(getattr(Trainer, name)), name
        assert getattr(UniMoETrainer, name) is getattr(StagedCheckpointSaving, name)
    assert "self._get_output_dir(" in inspect.getsource(Trainer._save_checkpoint)
    assert list(inspect.signature(Trainer._save_checkpoint).parameters) == ["self", "model", "trial"]


def test_publish_swaps_a_complete_folder_into_place(tmp_path):
    staged, final = tmp_path / STAGING_DIR / "checkpoint-2", tmp_path / "checkpoint-2"
    staged.mkdir(parents=True)
    (staged / "new").write_text("2")
    publish_checkpoint(staged, final)
    assert [p.name for p in final.iterdir()] == ["new"] and not staged.exists()
    staged.mkdir()
    (staged / "newer").write_text("3")
    publish_checkpoint(staged, final)
    assert [p.name for p in final.iterdir()] == ["newer"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [STAGING_DIR, "checkpoint-2"]  # no .old left
