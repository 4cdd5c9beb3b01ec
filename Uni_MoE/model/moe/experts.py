"""Expert weights of one MoE layer, stored stacked so batched kernels need no copies.

Each expert is a SwiGLU MLP ``down(act(gate(x)) * up(x))`` with an optional LoRA on gate, up and
down (the down LoRA reads the intermediate activation, as the original's LoRA-integrated MLP does).
``expert_type="mlp"`` gives every expert its own frozen base (v1, v2); ``"shared"`` gives all experts
one base and lets them differ only by their LoRA.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.activations import ACT2FN

PROJECTIONS = ("gate", "up", "down")


class MoEExperts(nn.Module):
    """Stacked expert parameters.

    Base weights (nn.Linear layout, out x in):  gate_proj, up_proj [B, I, H]; down_proj [B, H, I],
    with B = num_experts for ``mlp`` experts and B = 1 for ``shared``.
    LoRA (when r > 0): {p}_lora_A [E, r, in], {p}_lora_B [E, out, r] for p in gate, up, down.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str = "silu",
        expert_type: str = "mlp",
        lora_r: int = 0,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.expert_type = expert_type
        self.hidden_act = hidden_act
        self.num_bases = num_experts if expert_type == "mlp" else 1
        self.act_fn = ACT2FN[hidden_act]
        self.lora_r = lora_r
        self.lora_scaling = lora_alpha / lora_r if lora_r > 0 else 0.0
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        # training memory: the batched blocks keep no gate/up activations and recompute them in backward
        self.recompute_projections = False
        b, e, h, i = self.num_bases, num_experts, hidden_size, intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(b, i, h))
        self.up_proj = nn.Parameter(torch.empty(b, i, h))
        self.down_proj = nn.Parameter(torch.empty(b, h, i))
        if lora_r > 0:
            r = lora_r
            self.gate_lora_A = nn.Parameter(torch.empty(e, r, h))
            self.gate_lora_B = nn.Parameter(torch.empty(e, i, r))
            self.up_lora_A = nn.Parameter(torch.empty(e, r, h))
            self.up_lora_B = nn.Parameter(torch.empty(e, i, r))
            self.down_lora_A = nn.Parameter(torch.empty(e, r, i))
            self.down_lora_B = nn.Parameter(torch.empty(e, h, r))
        self.reset_parameters()

    @property
    def has_lora(self) -> bool:
        return self.lora_r > 0

    def base_index(self, expert: int) -> int:
        """Which stacked base MLP expert ``expert`` uses."""
        return expert if self.expert_type == "mlp" else 0

    def lora_parameters(self) -> list[nn.Parameter]:
        if not self.has_lora:
            return []
        return [getattr(self, f"{p}_lora_{ab}") for p in PROJECTIONS for ab in ("A", "B")]

    def base_parameters(self) -> list[nn.Parameter]:
        return [self.gate_proj, self.up_proj, self.down_proj]

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """Base weights ~ N(0, std); LoRA A as nn.Linear's kaiming init, LoRA B zero (a no-op delta)."""
        for p in self.base_parameters():
            p.normal_(0.0, std)
        for name in PROJECTIONS if self.has_lora else ():
            nn.init.kaiming_uniform_(getattr(self, f"{name}_lora_A"), a=math.sqrt(5))
            getattr(self, f"{name}_lora_B").zero_()

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """One expert on its tokens x [n, H] -> [n, H]; the clear, unbatched definition."""
        b = self.base_index(expert)
        gate = x @ self.gate_proj[b].T
        up = x @ self.up_proj[b].T
        if self.has_lora:
            s = self.lora_scaling
            gate = gate + s * (self.lora_dropout(x) @ self.gate_lora_A[expert].T) @ self.gate_lora_B[expert].T
            up = up + s * (self.lora_dropout(x) @ self.up_lora_A[expert].T) @ self.up_lora_B[expert].T
        h = self.act_fn(gate) * up
        out = h @ self.down_proj[b].T
        if self.has_lora:
            s = self.lora_scaling
            out = out + s * (self.lora_dropout(h) @ self.down_lora_A[expert].T) @ self.down_lora_B[expert].T
        return out

    @torch.no_grad()
    def load_dense_mlps(self, mlps: list[dict[str, torch.Tensor]]) -> None:
        """Initialise base weights from dense MLP state dicts (``gate_proj.weight`` ...), one per base."""
        if len(mlps) != self.num_bases:
            raise ValueError(f"expected {self.num_bases} MLP state dicts for the expert bases, got {len(mlps)}")
        for b, sd in enumerate(mlps):
            for name in ("gate_proj", "up_proj", "down_proj"):
                key = f"{name}.weight"
                if key not in sd:
                    raise KeyError(f"MLP state dict {b} has no '{key}' (keys: {sorted(sd)})")
                getattr(self, name)[b].copy_(sd[key])
