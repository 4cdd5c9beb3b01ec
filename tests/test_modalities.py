"""The modality table names things that exist: config fields, sample fields, processor steps, model
inputs, encoders and connectors; and the model splices each modality's features at its own placeholders."""

from __future__ import annotations

import inspect

import pytest
import torch

from Uni_MoE.config import UniMoEConfig
from Uni_MoE.data.schema import Sample
from Uni_MoE.modalities import MEDIA_INPUT_KEYS, MODALITIES, PLACEHOLDERS, PROMPT_ORDER
from Uni_MoE.model.uni_moe import UniMoEForCausalLM
from Uni_MoE.processing_uni_moe import UniMoEProcessor


def test_the_table_spells_the_original_names():
    assert PLACEHOLDERS == {"image": "<image>", "video": "<video>", "speech": "<speech>", "audio": "<audio>"}
    assert MEDIA_INPUT_KEYS == ("pixel_values", "pixel_values_videos", "input_features", "input_values",
                                "padding_mask")
    assert sorted(PROMPT_ORDER) == sorted(MODALITIES)


@pytest.mark.parametrize("name", list(MODALITIES))
def test_every_name_in_a_record_exists(name, make_config):
    m = MODALITIES[name]
    config = make_config()
    model = UniMoEForCausalLM(config)
    assert isinstance(getattr(config, m.token_id_field), int)
    assert getattr(config, m.encoder_config) is not None and name in config.enabled_modalities()
    assert getattr(Sample(0, "s", []), m.sample_field) == []
    assert callable(getattr(UniMoEProcessor, m.processor_step))
    assert isinstance(getattr(model.model, m.encoder), torch.nn.Module)
    assert isinstance(getattr(model.model, m.connector), torch.nn.Module)
    forward = inspect.signature(UniMoEForCausalLM.forward).parameters
    features = inspect.signature(getattr(model.model, f"get_{name}_features")).parameters
    assert set(m.input_keys) <= set(forward) and list(features) == list(m.input_keys)


def test_a_modality_without_encoder_is_off(make_config):
    config = make_config(audio_config=None, audio_qformer_config=None)
    assert config.enabled_modalities() == ["image", "video", "speech"]
    assert UniMoEConfig().placeholder_token_ids() == {"image": 32000, "video": 32001, "speech": 32002,
                                                      "audio": 32003}


def test_each_modality_is_spliced_at_its_own_placeholders(make_config):
    """Image features land on the image placeholders and sound features on the audio ones, nowhere else."""
    model = UniMoEForCausalLM(make_config()).eval()
    ids_ = model.config.placeholder_token_ids()
    q = model.config.query_tokens_size
    ids = torch.tensor([[1, *[ids_["audio"]] * q, 5, *[ids_["image"]] * 64, 6]])
    media = dict(pixel_values=torch.randn(1, 3, 64, 64), input_values=torch.randn(1, 64000) * 0.1,
                 padding_mask=torch.zeros(1, 64000, dtype=torch.bool))
    with torch.no_grad():
        embeds = model.model.embed_multimodal(ids, **media)
        image = model.model.get_image_features(media["pixel_values"])[0]
        sound = model.model.get_audio_features(media["input_values"], media["padding_mask"])[0]
        text = model.get_input_embeddings()(ids)
    torch.testing.assert_close(embeds[0, 1 : 1 + q], sound)
    torch.testing.assert_close(embeds[0, 2 + q : 2 + q + 64], image)
    torch.testing.assert_close(embeds[0, [0, 1 + q, -1]], text[0, [0, 1 + q, -1]])
