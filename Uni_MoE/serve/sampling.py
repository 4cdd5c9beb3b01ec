"""Choosing the next token from logits on the device: suppressed tokens, a minimum length, temperature and
nucleus (top-p) sampling, or greedy argmax, in the order transformers' generate applies them."""

from __future__ import annotations

import torch


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits outside the smallest set whose probability reaches ``top_p`` set to -inf (one token kept)."""
    ordered, order = logits.sort(dim=-1)
    tail = ordered.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
    tail[..., -1] = False
    return logits.masked_fill(tail.scatter(-1, order, tail), float("-inf"))


def choose_tokens(
    logits: torch.Tensor,
    suppress: torch.Tensor,
    *,
    block_eos: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """Next tokens [B] from logits [B, V] (float): never a ``suppress`` id, nor ``block_eos`` when given;
    greedy at temperature 0, else sampled from the tempered, top-p filtered distribution."""
    logits = logits.index_fill(-1, suppress, float("-inf"))
    if block_eos is not None:
        logits[:, block_eos] = float("-inf")
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1).squeeze(-1)
