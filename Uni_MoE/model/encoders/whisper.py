"""Whisper's encoder with its hidden states stored token-major from the start, and attention without copies.

transformers' ``WhisperEncoder`` turns the second convolution's [B, d, frames] output into [B, frames, d]
by ``permute``, a view, so every layer after it inherits the transposed strides: each residual add and
layer norm runs as a strided kernel and every projection first copies its input (at 8 x 1500 frames of
Whisper-small, about a third of the encoder's GPU time). ``store_states_token_major`` makes the
convolution's output [B, d, frames] with token-major memory (one copy of one tensor), so the permute
yields a contiguous tensor and the encoder runs as if written for it. The values are the same up to the
rounding of GEMMs that now see a different input layout.

transformers' ``WhisperAttention`` then copies q, k and v into contiguous [B, heads, frames, head_dim] tensors
and the attention output back: four copies a layer, in the encoder and in the speech aligner's decoder (whose
cross-attention copies keys and values of the encoder's length). ``TokenMajorWhisperAttention`` hands the
attention function [B, heads, frames, head_dim] views of the projections' own memory instead, as
``FusedLlamaAttention`` does for the language model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.models.whisper.modeling_whisper import WhisperAttention, eager_attention_forward

from ..attention import attention_function, without_cache
from ..retype import retype_modules


def _token_major(_module: nn.Module, _inputs: tuple, out: torch.Tensor) -> torch.Tensor:
    return out.transpose(1, 2).contiguous().transpose(1, 2)


class TokenMajorWhisperAttention(WhisperAttention):
    """``WhisperAttention`` with the same parameters and keys; self- and cross-attention without a cache (the
    encoder's, and the speech aligner's decoder, which runs without one) on views of the projections; with a
    cache, transformers' forward."""

    def forward(self, hidden_states: torch.Tensor, key_value_states: torch.Tensor | None = None,
                cache: Any = None, attention_mask: torch.Tensor | None = None, output_attentions: bool = False,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        rest = without_cache(kwargs)
        if cache is not None or rest is None:
            return super().forward(hidden_states, key_value_states=key_value_states, cache=cache,
                                   attention_mask=attention_mask, output_attentions=output_attentions, **kwargs)
        states = hidden_states if key_value_states is None else key_value_states
        # keys and values take the queries' batch size, as in transformers (a broadcast batch joins the sequence)
        kv_shape = (hidden_states.shape[0], -1, self.num_heads, self.head_dim)
        query = (self.q_proj(hidden_states) * self.scaling).view(*hidden_states.shape[:-1], -1, self.head_dim)
        key = self.k_proj(states).view(kv_shape)
        value = self.v_proj(states).view(kv_shape)
        out, weights = attention_function(self.config, eager_attention_forward)(
            self, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attention_mask,
            dropout=self.dropout if self.training else 0.0, scaling=1.0, output_attentions=output_attentions,
            **rest,
        )
        return self.out_proj(out.reshape(*hidden_states.shape[:-1], -1)), weights


def attend_without_copies(module: nn.Module) -> int:
    """Give every ``WhisperAttention`` inside ``module`` ``TokenMajorWhisperAttention``'s forward; returns how many."""
    return retype_modules(module, WhisperAttention, TokenMajorWhisperAttention)


def store_states_token_major(encoder: nn.Module) -> None:
    """Give ``encoder.conv2`` (a Whisper encoder's last convolution) token-major output memory, and its attention
    layers ``TokenMajorWhisperAttention``'s forward."""
    encoder.conv2.register_forward_hook(_token_major)
    attend_without_copies(encoder)
