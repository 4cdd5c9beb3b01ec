"""Connectors from encoder features to the LLM's embedding space.

Images and video frames: an MLP projector (``mm_projector``; ``mlp2x_gelu``: Linear -> GELU -> Linear,
LLaVA-1.5's). Speech and sound each have an aligner (the original's ``mm_audio_aligner``): learnable query
tokens read the encoder states through a Q-former, then a linear projection. The speech aligner's
Q-former is a Whisper decoder (as the original's), the sound aligner's a BLIP-2 Q-Former over BEATs
features. Each 30 s window becomes ``query_tokens_size`` LLM tokens.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import Blip2QFormerModel, PreTrainedConfig
from transformers.models.whisper.modeling_whisper import WhisperDecoder

from .encoders.whisper import attend_without_copies


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """``linear`` | ``identity`` | ``mlp{N}x_gelu`` (N linear layers with GELU between)."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "identity":
        if in_dim != out_dim:
            raise ValueError(f"identity projector needs in_dim == out_dim, got {in_dim} and {out_dim}")
        return nn.Identity()
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if match is None:
        raise ValueError(f"unknown projector type {kind!r}; use linear, identity or mlpNx_gelu")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


class SpeechAligner(nn.Module):
    """The speech aligner: query tokens -> Whisper decoder as Q-former (cross-attending the Whisper encoder
    states) -> projection."""

    def __init__(self, speech_config: PreTrainedConfig, num_queries: int, out_dim: int, projector: str) -> None:
        super().__init__()
        d = speech_config.d_model
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, d))
        self.decoder = WhisperDecoder(speech_config)
        attend_without_copies(self.decoder)
        # The queries are fed as embeddings; the decoder's 51865-token table would be dead weight.
        self.decoder.embed_tokens = None
        self.projector = build_projector(projector, d, out_dim)

    def forward(self, encoder_states: torch.Tensor) -> torch.Tensor:
        """encoder_states [n, L, d] -> [n, Q, out_dim]."""
        queries = self.query_tokens.expand(encoder_states.shape[0], -1, -1).to(encoder_states.dtype)
        # no cache: the queries are one pass, and a cache would copy every layer's keys and values
        hidden = self.decoder(inputs_embeds=queries, encoder_hidden_states=encoder_states,
                              use_cache=False).last_hidden_state
        return self.projector(hidden)


class AudioAligner(nn.Module):
    """The sound aligner: query tokens -> BLIP-2 Q-Former (cross-attending BEATs features) -> projection."""

    def __init__(self, qformer_config: PreTrainedConfig, num_queries: int, out_dim: int, projector: str) -> None:
        super().__init__()
        d = qformer_config.hidden_size
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, d))
        self.qformer = Blip2QFormerModel(qformer_config)
        self.projector = build_projector(projector, d, out_dim)

    def forward(self, features: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """features [n, N, d_enc], padding_mask [n, N] (True = pad) -> [n, Q, out_dim]."""
        queries = self.query_tokens.expand(features.shape[0], -1, -1).to(features.dtype)
        attend = None if padding_mask is None else (~padding_mask).long()
        hidden = self.qformer(
            query_embeds=queries, encoder_hidden_states=features, encoder_attention_mask=attend
        ).last_hidden_state
        return self.projector(hidden)
