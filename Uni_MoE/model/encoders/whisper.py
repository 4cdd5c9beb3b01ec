"""Whisper's encoder with its hidden states stored token-major from the start.

transformers' ``WhisperEncoder`` turns the second convolution's [B, d, frames] output into [B, frames, d]
by ``permute``, a view, so every layer after it inherits the transposed strides: each residual add and
layer norm runs as a strided kernel and every projection first copies its input (at 8 x 1500 frames of
Whisper-small, about a third of the encoder's GPU time). ``store_states_token_major`` makes the
convolution's output [B, d, frames] with token-major memory (one copy of one tensor), so the permute
yields a contiguous tensor and the encoder runs as if written for it. The values are the same up to the
rounding of GEMMs that now see a different input layout.
"""

from __future__ import annotations

import torch
from torch import nn


def _token_major(_module: nn.Module, _inputs: tuple, out: torch.Tensor) -> torch.Tensor:
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def store_states_token_major(encoder: nn.Module) -> None:
    """Give ``encoder.conv2`` (a Whisper encoder's last convolution) token-major output memory."""
    encoder.conv2.register_forward_hook(_token_major)
