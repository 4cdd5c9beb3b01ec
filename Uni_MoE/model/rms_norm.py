"""LLaMA's RMSNorm through torch's fused kernel on CUDA.

transformers' ``LlamaRMSNorm`` runs six elementwise passes over the hidden states in float32 forward
and more backward (upcast, square, mean, scale, downcast, weight). ``torch.nn.functional.rms_norm``
is one fused kernel each way on CUDA, with float32 statistics. Only the rounding differs: the fused
kernel rounds once after the weight, transformers rounds before and after it. Elsewhere (CPU, mixed
dtypes of input and weight) transformers' own forward runs, so CPU results are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from .retype import retype_modules


class FusedRMSNorm(LlamaRMSNorm):
    """``LlamaRMSNorm`` with the same parameter and state-dict key, fused on CUDA."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.is_cuda and hidden_states.dtype == self.weight.dtype:
            return F.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)
        return super().forward(hidden_states)


def fuse_rms_norms(module: nn.Module) -> int:
    """Turn every ``LlamaRMSNorm`` inside ``module`` into a ``FusedRMSNorm`` in place (same parameters,
    hooks and keys); returns how many."""
    return retype_modules(module, LlamaRMSNorm, FusedRMSNorm)
