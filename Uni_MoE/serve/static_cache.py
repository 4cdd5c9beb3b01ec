"""The language model over a preallocated (static) KV cache: prefill of a left-padded batch, then one token
per sequence per step with every shape fixed, so a step can be captured in a CUDA graph and replayed.

The LLaMA decoder layers' own modules (norms, projections, rotary embedding, MLP or MoE) run here; only
the cache and the attention call are ours, because transformers' cache objects change their keywords
between versions and their mask builders synchronise with the host. Attention is PyTorch SDPA.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

# Prompts come in every length, and cuDNN's attention builds a new execution graph for each new sequence
# length (tens to hundreds of ms on the host); flash attention (causal, no padding) or the memory-efficient
# kernel (padded batches) need no per-shape setup. A decoding step has one shape per cache length.
PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class StaticKVCache:
    """Keys and values of every layer, [layers, B, kv_heads, length, head_dim] each, written in place."""

    def __init__(self, language_model: nn.Module, batch: int, length: int) -> None:
        attn = language_model.layers[0].self_attn
        config = language_model.config
        shape = (len(language_model.layers), batch, config.num_key_value_heads, length, attn.head_dim)
        weight = attn.q_proj.weight
        self.keys = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.values = torch.zeros_like(self.keys)
        self.batch, self.length = batch, length


def _attention(layer: nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: StaticKVCache,
               index: int, slots: torch.Tensor, mask: torch.Tensor | None, kv_len: int) -> torch.Tensor:
    """Self-attention of x [B, S, H] whose keys/values go to cache positions ``slots`` [S]; it reads the
    first ``kv_len`` cache positions under ``mask`` [B, 1, S, kv_len] (True = attend), or causally when
    ``mask`` is None (a prompt without padding: S = kv_len)."""
    attn = layer.self_attn
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *rope)
    cache.keys[index].index_copy_(2, slots, k)
    cache.values[index].index_copy_(2, slots, v)
    keys, values = cache.keys[index, :, :, :kv_len], cache.values[index, :, :, :kv_len]
    with sdpa_kernel(PREFILL_BACKENDS) if x.shape[1] > 1 else nullcontext():
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling,
                                             is_causal=mask is None, enable_gqa=keys.shape[1] != q.shape[1])
    return attn.o_proj(out.transpose(1, 2).reshape(*x.shape[:-1], -1))


def forward_cached(language_model: nn.Module, embeds: torch.Tensor, positions: torch.Tensor, cache: StaticKVCache,
                   slots: torch.Tensor, mask: torch.Tensor | None, kv_len: int) -> torch.Tensor:
    """Final hidden states [B, S, H] of embeds [B, S, H] at rotary ``positions`` [B, S]; keys and values
    are written at cache ``slots`` [S] (the same for every row: the batch is left-padded); ``mask`` as in
    ``_attention``."""
    rope = language_model.rotary_emb(embeds, positions)
    x = embeds
    for index, layer in enumerate(language_model.layers):
        x = x + _attention(layer, layer.input_layernorm(x), rope, cache, index, slots, mask, kv_len)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return language_model.norm(x)


def prefill_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, S] padding mask (1 = token) -> [B, 1, S, S] causal attention over real tokens. A padding
    position attends to itself only, so no row is empty (an empty row gives NaN under SDPA)."""
    s = attention_mask.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=attention_mask.device).tril()
    eye = torch.eye(s, dtype=torch.bool, device=attention_mask.device)
    return ((causal & attention_mask[:, None, :].bool()) | eye)[:, None]


def step_mask(valid: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """Keys a new token at cache position ``slot`` [1] may read: valid [B, L] ones up to the slot."""
    upto = torch.arange(valid.shape[1], device=valid.device) <= slot
    return (valid & upto)[:, None, None, :]
