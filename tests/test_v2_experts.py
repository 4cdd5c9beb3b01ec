"""Loading the original v2 Experts directory (``--mlp_dir``) into the expert bases of a local-backend model;
the DeepSpeed-MoE layer refusing to build without a process group."""

from __future__ import annotations

import pytest
import torch

from helpers import PROJ, write_experts_dir

from Uni_MoE.checkpoint.v2_experts import V2_EXPERT_FILES, V2_MLP_KEY, load_v2_expert_bases
from Uni_MoE.model.uni_moe import UniMoEForCausalLM

@pytest.fixture
def v2_model(make_config):
    return UniMoEForCausalLM(make_config(num_experts=8, expert_lora_r=4, moe_layers="even"))


def test_every_expert_gets_its_file_in_every_moe_layer(v2_model, tmp_path):
    files = write_experts_dir(tmp_path / "experts", v2_model.config)
    lora_before = v2_model.moe_mlps()[0].experts.gate_lora_A.clone()
    assert load_v2_expert_bases(v2_model, tmp_path / "experts") == list(range(8))
    for layer, moe in zip(v2_model.config.moe_layer_indices(), v2_model.moe_mlps()):
        for e, stem in enumerate(V2_EXPERT_FILES):
            for p in PROJ:
                assert torch.equal(getattr(moe.experts, p)[e], files[stem][V2_MLP_KEY.format(layer=layer, proj=p)])
    assert torch.equal(v2_model.moe_mlps()[0].experts.gate_lora_A, lora_before)  # LoRA untouched


def test_missing_file_names_it_and_its_experts(v2_model, tmp_path):
    write_experts_dir(tmp_path / "experts", v2_model.config)
    (tmp_path / "experts" / "mlp_base7.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"mlp_base7\.bin.*experts \[5, 7\]"):
        load_v2_expert_bases(v2_model, tmp_path / "experts")


def test_wrong_shape_names_file_key_and_expert(v2_model, tmp_path):
    files = write_experts_dir(tmp_path / "experts", v2_model.config)
    key = V2_MLP_KEY.format(layer=2, proj="up_proj")
    files["mlp_basev"][key] = files["mlp_basev"][key][:-1]
    torch.save(files["mlp_basev"], tmp_path / "experts" / "mlp_basev.bin")
    with pytest.raises(ValueError, match=r"mlp_basev\.bin: 'model\.layers\.2\.mlp\.up_proj\.weight'.*expert 1 of layer 2"):
        load_v2_expert_bases(v2_model, tmp_path / "experts")


def test_missing_key_and_wrong_expert_count_are_errors(make_config, tmp_path):
    model = UniMoEForCausalLM(make_config(num_experts=8))
    files = write_experts_dir(tmp_path / "experts", model.config)
    del files["mlp_audiocap"][V2_MLP_KEY.format(layer=3, proj="down_proj")]
    torch.save(files["mlp_audiocap"], tmp_path / "experts" / "mlp_audiocap.bin")
    with pytest.raises(KeyError, match=r"mlp_audiocap\.bin: no 'model\.layers\.3\.mlp\.down_proj\.weight'"):
        load_v2_expert_bases(model, tmp_path / "experts")
    with pytest.raises(ValueError, match="fills 8 experts; the model has 4"):
        load_v2_expert_bases(UniMoEForCausalLM(make_config()), tmp_path / "experts")


def test_deepspeed_layer_needs_a_process_group():
    from Uni_MoE.model.moe.deepspeed_backend import DeepSpeedMoELayer

    if torch.distributed.is_initialized():
        pytest.skip("another test left a process group initialised")
    with pytest.raises(RuntimeError, match=r"deepspeed\.init_distributed\(\)"):
        DeepSpeedMoELayer(16, 32, 4, 2)
