"""LLaMA attention with the rotary embedding applied in the projections' own layout.

transformers' ``LlamaAttention`` transposes the q/k/v projections to [B, heads, S, head_dim] views and
rotates those, so the rotation runs elementwise over strided tensors and the attention kernels meet mixed
layouts that cost copies forward and backward. ``FusedLlamaAttention`` keeps q/k/v as [B, S, heads,
head_dim] (what the projections write), rotates them there (``rotary.apply_rotary``: one Triton kernel
each way on CUDA) and hands the attention function transposed views of contiguous tensors. Where a KV
cache is given (generation), transformers' forward runs unchanged. Parameters and keys are unchanged.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaAttention, eager_attention_forward

from .retype import retype_modules
from .rotary import apply_rotary

_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")  # the names a KV cache is passed by


def without_cache(kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """``kwargs`` less its empty KV-cache keywords, or None when one of them holds a cache."""
    if any(kwargs.get(k) is not None for k in _CACHE_KWARGS):
        return None
    return {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}


def attention_function(config: Any, eager: Callable) -> Callable:
    """The attention function ``config`` asks for: transformers' registered one, or the model's own ``eager``."""
    impl = config._attn_implementation
    return eager if impl in (None, "eager") else ALL_ATTENTION_FUNCTIONS[impl]


class FusedLlamaAttention(LlamaAttention):
    """``LlamaAttention`` with the same parameters and keys; rotary in [B, S, heads, head_dim] without a cache."""

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, *args: Any,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        rest = without_cache(kwargs)
        if args or position_embeddings is None or rest is None:
            return super().forward(hidden_states, position_embeddings, attention_mask, *args, **kwargs)
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape)
        key = self.k_proj(hidden_states).view(shape)
        value = self.v_proj(hidden_states).view(shape)
        query, key = apply_rotary(query, key, *position_embeddings)
        out, weights = attention_function(self.config, eager_attention_forward)(
            self, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attention_mask,
            dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling, **rest,
        )
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1)), weights


def fuse_attention(module: nn.Module) -> int:
    """Turn every ``LlamaAttention`` inside ``module`` into a ``FusedLlamaAttention`` in place (same
    parameters, hooks and keys); returns how many."""
    return retype_modules(module, LlamaAttention, FusedLlamaAttention)
