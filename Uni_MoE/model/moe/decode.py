"""The MoE experts at decoding sizes without host synchronisation: every expert runs on every token and a
dense [T, E] combine matrix, zero off each token's chosen experts, mixes their outputs.

Decoding sends one token per sequence through the layer, so the time is reading expert weights, not
multiplying. The grouped and reference paths sort tokens by expert and size their work on the host
(``.tolist()``, ``nonzero``), which stalls the GPU every layer and rules out CUDA-graph capture; here every
shape depends only on T, so a decoding step can be captured. It reads all E experts instead of the chosen
ones: equal at a batch of a few sequences (they touch every expert anyway), at most E/k times more bytes
for a single sequence, and its FLOPs grow E/k-fold, so it serves only small T (see ``layer.py``).
"""

from __future__ import annotations

import torch

from .experts import MoEExperts


def _lora(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, experts: MoEExperts) -> torch.Tensor:
    """Every expert's LoRA product: x [T, in] or [E, T, in], A [E, r, in], B [E, out, r] -> [E, T, out]."""
    return experts.lora_scaling * ((experts.lora_dropout(x) @ a.transpose(1, 2)) @ b.transpose(1, 2))


def experts_all_dense(
    x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: MoEExperts
) -> torch.Tensor:
    """Mix the chosen experts' outputs, computing all experts for all tokens (no data-dependent shapes).

    x [T, H]; weights [T, k] (x's dtype); indices [T, k] -> [T, H]. Same function as experts_reference.
    """
    combine = torch.zeros(x.shape[0], experts.num_experts, dtype=x.dtype, device=x.device)
    combine.scatter_add_(1, indices, weights)  # [T, E]
    gate = x @ experts.gate_proj.transpose(1, 2)  # [bases, T, I]; one base broadcasts over the experts
    up = x @ experts.up_proj.transpose(1, 2)
    if experts.has_lora:
        gate = gate + _lora(x, experts.gate_lora_A, experts.gate_lora_B, experts)
        up = up + _lora(x, experts.up_lora_A, experts.up_lora_B, experts)
    h = experts.act_fn(gate) * up  # [E, T, I]
    out = h @ experts.down_proj.transpose(1, 2)  # [E, T, H]
    if experts.has_lora:
        out = out + _lora(h, experts.down_lora_A, experts.down_lora_B, experts)
    out = out.expand(experts.num_experts, -1, -1)  # shared experts without LoRA are one MLP
    return torch.einsum("eth,te->th", out, combine)

