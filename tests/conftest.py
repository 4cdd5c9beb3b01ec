"""Shared fixtures: small configs and models built offline."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from Uni_MoE import presets  # noqa: E402
from Uni_MoE.config import UniMoEConfig  # noqa: E402

VOCAB = 300
IDS = dict(image_token_index=296, video_token_index=297, audio_token_index=298, speech_token_index=299)


def small_config(**overrides) -> UniMoEConfig:
    """The tiny preset with a 300-token vocabulary and placeholders at 296..299."""
    return presets.tiny(vocab_size=VOCAB, placeholder_ids=IDS, **overrides)


@pytest.fixture
def make_config():
    return small_config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def llama_sentencepiece() -> bytes:
    """A LLaMA-style sentencepiece model (tokenizer.model bytes), trained once per session."""
    from llama_sentencepiece import train_llama_sentencepiece

    return train_llama_sentencepiece()
