"""Batched MoE experts: the whole expert block as one autograd function per expert kind, no expert loop.

``expert_type="mlp"`` (distinct frozen bases, v1/v2) runs grouped GEMMs over expert-sorted slots
(``distinct.py``); ``"shared"`` (LoRA experts on one frozen MLP) computes one dense MLP plus low-rank
terms (``shared.py``). The gate/up LoRA-A products of all experts are one dense GEMM per token outside
the fused block, so LoRA dropout on the expert input and the A gradients are plain autograd; dropout on
the down LoRA's input is drawn inside. Without input dropout the blocks take the A factors instead: the
shared block computes the same product itself and adds its input gradient into its own; distinct experts
with E * r of at least ``OWN_LORA_A_MIN_WIDTH`` compute each slot's own k products from the slot rows they
gather anyway (the dense GEMM computes E a token, mostly discarded). The input dropout mask is drawn once per
token and shared by the token's k slots (the reference loop draws one per slot); without dropout both compute
the same function.
Activations other than SiLU run the reference loop. With ``recompute_projections`` the blocks keep no gate/up
activations for backward and compute them again there. Under autocast the block computes in autocast's
dtype, with explicit (differentiable) casts of its inputs and parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from .distinct import DistinctExperts, LoRASettings
from .experts import MoEExperts
from .reference import experts_reference
from .segments import group_slots
from .shared import SharedBaseExperts

SILU = ("silu", "swish")
# From this E * r on, a token's own k experts' LoRA-A products over the slot rows (k H-wide rows read, 2 r k
# columns) cost less than all E experts' over the token row (one row read, 2 r E columns): at bfloat16 rates of
# about 700 TFLOP/s and 4.8 TB/s on an H200 the dense GEMM turns compute-bound near E * r = 150.
OWN_LORA_A_MIN_WIDTH = 256


def _frozen(p: torch.Tensor | None) -> torch.Tensor | None:
    """Detach parameters that take no gradient so the fused block computes nothing for them."""
    return p if p is None or p.requires_grad else p.detach()


def _all_lora_a(experts: MoEExperts, dtype: torch.dtype) -> torch.Tensor:
    """Gate and up LoRA-A factors of every expert as one [2*E*r, H] matrix (gate block first)."""
    return torch.cat([experts.gate_lora_A.flatten(0, 1), experts.up_lora_A.flatten(0, 1)]).to(dtype)


def _lora_input_acts(x: torch.Tensor, experts: MoEExperts, dtype: torch.dtype) -> torch.Tensor:
    """Gate and up LoRA-A activations of every expert, [T, 2*E*r] (gate block first), input dropout applied."""
    return experts.lora_dropout(x) @ _all_lora_a(experts, dtype).t()


def _dropout_p(experts: MoEExperts) -> float:
    """The LoRA dropout probability in effect (0 in eval mode or without dropout)."""
    dropout = experts.lora_dropout
    return dropout.p if isinstance(dropout, nn.Dropout) and experts.training else 0.0


def _lora_settings(experts: MoEExperts) -> LoRASettings:
    return LoRASettings(experts.lora_scaling, _dropout_p(experts))


def own_lora_a_pays(experts: MoEExperts) -> bool:
    """Whether the distinct block computes the gate/up LoRA-A products of each slot's own expert itself."""
    return (experts.expert_type != "shared" and experts.has_lora and _dropout_p(experts) == 0.0
            and experts.num_experts * experts.lora_r >= OWN_LORA_A_MIN_WIDTH)


def _lora_inputs(x: torch.Tensor, experts: MoEExperts,
                 dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(za, lora_a): the LoRA-A activations computed here, or the factors the block takes in their place."""
    if not experts.has_lora:
        return None, None
    if experts.expert_type == "shared" and _dropout_p(experts) == 0.0:
        return None, _all_lora_a(experts, dtype)
    if own_lora_a_pays(experts):
        return None, torch.cat([experts.gate_lora_A, experts.up_lora_A], 1).to(dtype)  # [E, 2r, H]
    return _lora_input_acts(x, experts, dtype), None


def experts_grouped(
    x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: MoEExperts
) -> torch.Tensor:
    """Mix the chosen experts' outputs, batched over experts.

    x [T, H]; weights [T, k] (x's dtype); indices [T, k] -> [T, H]. Same function as experts_reference.
    """
    if experts.hidden_act not in SILU:
        return experts_reference(x, weights, indices, experts)
    device = x.device.type
    if torch.is_autocast_enabled(device):  # the fused blocks run in one dtype: autocast's, cast explicitly
        with torch.autocast(device, enabled=False):
            return _fused(x, weights, indices, experts, torch.get_autocast_dtype(device))
    return _fused(x, weights, indices, experts, x.dtype)


def _fused(
    x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: MoEExperts, dtype: torch.dtype
) -> torch.Tensor:
    """The fused block of the experts' kind with every tensor in ``dtype`` (casts are differentiable)."""
    def cast(p: torch.Tensor | None) -> torch.Tensor | None:
        return None if p is None else _frozen(p).to(dtype)

    x, weights = x.to(dtype), weights.to(dtype)
    lora = [cast(getattr(experts, name, None)) for name in ("gate_lora_B", "up_lora_B", "down_lora_A", "down_lora_B")]
    bases = [cast(p) for p in experts.base_parameters()]
    recompute = experts.recompute_projections
    za, lora_a = _lora_inputs(x, experts, dtype)
    if experts.expert_type == "shared":
        return SharedBaseExperts.apply(x, weights, indices, za, lora_a, *(b[0] for b in bases), *lora,
                                       _lora_settings(experts), recompute)
    grouping = group_slots(indices, experts.num_experts)
    return DistinctExperts.apply(x, weights, za, lora_a, *bases, *lora, grouping, _lora_settings(experts), recompute)

