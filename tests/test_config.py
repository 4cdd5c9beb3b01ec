import pytest

from Uni_MoE import presets
from Uni_MoE.config import UniMoEConfig


def test_round_trip_through_save_pretrained(tmp_path, make_config):
    cfg = make_config(moe_layers=[0, 2], expert_lora_r=4, aux_balance_loss_coef=0.01)
    cfg.save_pretrained(tmp_path)
    back = UniMoEConfig.from_pretrained(tmp_path)
    assert back.to_dict() == cfg.to_dict()
    assert back.text_config.hidden_size == 128
    assert back.vision_config.patch_size == 8
    assert back.speech_config.max_source_positions == 200
    assert back.audio_config["encoder_embed_dim"] == 64
    assert back.moe_layer_indices() == [0, 2]


@pytest.mark.parametrize("layers,expected", [("all", [0, 1, 2, 3]), ("even", [0, 2]), ("odd", [1, 3]), ("none", [])])
def test_moe_layer_selection(make_config, layers, expected):
    assert make_config(moe_layers=layers).moe_layer_indices() == expected


@pytest.mark.parametrize(
    "field,value",
    [("moe_layers", "some"), ("expert_type", "huge"), ("moe_backend", "tpu"), ("num_experts_per_tok", 9),
     ("voice_modality", "music")],
)
def test_bad_values_name_the_field(make_config, field, value):
    with pytest.raises(ValueError, match=field):
        make_config(**{field: value})


def test_out_of_range_layer_index(make_config):
    with pytest.raises(ValueError, match="outside"):
        make_config(moe_layers=[7]).moe_layer_indices()


def test_real_size_presets_describe_the_releases():
    speech = presets.speech_v1()
    assert speech.text_config.hidden_size == 4096 and speech.text_config.num_hidden_layers == 32
    assert speech.moe_layer_indices() == list(range(32)) and speech.num_experts == 4
    assert speech.speech_chunk_samples() == 480000  # 30 s windows
    assert presets.speech_v1_5().moe_layer_indices() == list(range(0, 32, 2))
    audio = presets.audio_v1()
    assert audio.voice_modality == "audio" and audio.audio_chunk_samples() == 480000
    v2 = presets.v2_8e()
    assert (v2.num_experts, v2.expert_lora_r, v2.aux_balance_loss_coef, v2.moe_backend) == (8, 8, 0.01, "deepspeed")
    assert set(presets.tiny().enabled_modalities()) == {"image", "video", "speech", "audio"}
