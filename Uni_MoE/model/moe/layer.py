"""MoELayer: the mixture-of-experts MLP that replaces a LLaMA decoder layer's MLP."""

from __future__ import annotations

import torch
from torch import nn

from .experts import MoEExperts
from .implementations import resolve_expert_implementation
from .router import balance_loss, in_backward, route_tokens
from .router_logits import float32_logits


class MoELayer(nn.Module):
    """Router + experts. Input and output [B, S, H].

    After each forward the layer keeps ``aux_loss`` (scalar balance loss of this call) and
    ``routing`` ([B, S, k] chosen experts, detached) for the model to collect and for logging.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        hidden_act: str = "silu",
        expert_type: str = "mlp",
        lora_r: int = 0,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        router_jitter: float = 0.0,
        second_expert_sampling: bool = False,
        implementation: str = "auto",
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.router_jitter = router_jitter
        self.second_expert_sampling = second_expert_sampling
        self.implementation = implementation
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = MoEExperts(
            num_experts, hidden_size, intermediate_size, hidden_act, expert_type, lora_r, lora_alpha, lora_dropout
        )
        self.aux_loss: torch.Tensor | None = None
        self.routing: torch.Tensor | None = None

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 router logits [T, E], also under autocast (a low-precision router flips near-tied expert
        choices); multiplicative input jitter in training when configured."""
        if self.training and self.router_jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.router_jitter, 1.0 + self.router_jitter)
        return float32_logits(x, self.router.weight)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [T, H]
        logits = self.router_logits(x)
        weights, indices = route_tokens(
            logits, self.top_k, second_expert_sampling=self.second_expert_sampling and self.training
        )
        implementation = resolve_expert_implementation(self.implementation, x.shape[0], self.experts, self.top_k)
        out = implementation(x, weights.to(x.dtype), indices, self.experts)
        # after the experts: its small kernels are launched while the expert GEMMs run, not before them
        aux_loss = balance_loss(logits, indices, self.num_experts)  # computed alike when recomputed
        if not in_backward():
            self.aux_loss, self.routing = aux_loss, indices.detach().view(*shape[:-1], self.top_k)
        return out.view(shape)
