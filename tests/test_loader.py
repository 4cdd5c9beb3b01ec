"""The one checkpoint loader on our own folders: what it reads, the settings it applies, the folders it
refuses with a message naming what to do instead (original releases and expert parallelism: see
test_convert_original.py, test_eval_original_release.py and test_deepspeed_backend.py)."""

from __future__ import annotations

import json

import pytest
import torch

from Uni_MoE.checkpoint.loader import is_original_release, load_checkpoint, load_model, tokenizer_folder
from Uni_MoE.checkpoint.tiny import build_tiny
from Uni_MoE.model.uni_moe import UniMoEForCausalLM


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("loader") / "tiny", moe=True)


def test_our_folder_loads_as_saved(tiny):
    ids = torch.tensor([[1, 7, 9, 11, 2]])
    plain = UniMoEForCausalLM.from_pretrained(tiny).eval()
    model = load_checkpoint(tiny).eval()
    assert model.dtype == torch.float32 and not is_original_release(tiny)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)


def test_dtype_and_config_overrides_apply(tiny):
    model = load_checkpoint(tiny, torch.bfloat16, moe_implementation="reference", num_experts_per_tok=1)
    assert model.dtype == torch.bfloat16
    assert model.config.moe_implementation == "reference" and model.moe_mlps()[0].top_k == 1


def test_load_model_gives_eval_mode_and_the_folders_tokenizer(tiny):
    model, tokenizer = load_model(tiny, "cpu", "bfloat16")
    assert not model.training and model.dtype == torch.bfloat16
    assert tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_index


def test_release_parts_on_our_folder_are_refused(tiny):
    with pytest.raises(ValueError, match=r"not an original release.*\['model_base'\]"):
        load_checkpoint(tiny, release={"model_base": "somewhere", "clip_dir": None})


def test_from_pretrained_refuses_the_original_arguments(tiny):
    with pytest.raises(ValueError, match="Uni_MoE.checkpoint.loader.load_checkpoint"):
        UniMoEForCausalLM.from_pretrained(tiny, model_base="base")


def test_original_release_is_told_by_its_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_llama"}))
    assert is_original_release(tmp_path) and not is_original_release(tmp_path / "absent")
    with pytest.raises(ValueError, match="convert it first.*moe_implementation"):
        load_checkpoint(tmp_path, moe_implementation="reference")


def test_tokenizer_folder_is_the_first_with_tokenizer_files(tmp_path, tiny):
    assert tokenizer_folder([tmp_path, None, tiny]) == tiny
    with pytest.raises(FileNotFoundError, match=f"no tokenizer files.*{tmp_path.name}"):
        tokenizer_folder([tmp_path, None])
