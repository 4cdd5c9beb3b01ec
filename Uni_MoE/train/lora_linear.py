"""PEFT's LoRA linear layer with the low-rank update added inside one GEMM.

PEFT computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``: the [tokens, out] LoRA product is
written, scaled in a second pass and added in a third, and the backward scales the output gradient in a
fourth. ``FusedLoraLinear`` computes ``addmm(base(x), lora_A(dropout(x)), lora_B.weight^T, alpha=scaling)``:
the r-wide product is accumulated onto the base output in the GEMM's epilogue, and the scaling falls on
r-wide tensors only. The sum is rounded once instead of three times. Anything beyond one plain adapter in
training or evaluation (several or disabled adapters, merged weights, variants such as DoRA, a LoRA bias,
autocast, mixed dtypes, ZeRO-3-partitioned weights, extra arguments) runs PEFT's forward. Parameters, keys
and saving are PEFT's.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from ..model.retype import retype_modules


class FusedLoraLinear(LoraLinear):
    """``peft.tuners.lora.Linear`` whose single plain adapter adds its update in the LoRA-B GEMM."""

    def _plain_adapter(self, x: torch.Tensor) -> str | None:
        if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        if name not in self.lora_A or name in self.lora_variant or self.lora_B[name].bias is not None:
            return None
        if hasattr(self.lora_B[name].weight, "ds_id"):  # a ZeRO-3 partition: gathered only by calling lora_B
            return None
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear) or torch.is_autocast_enabled(x.device.type):
            return None
        dtypes = {x.dtype, base.weight.dtype, self.lora_A[name].weight.dtype, self.lora_B[name].weight.dtype}
        return name if len(dtypes) == 1 else None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = None if args or kwargs else self._plain_adapter(x)
        if name is None:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        low = self.lora_A[name](self.lora_dropout[name](x))
        out = torch.addmm(result.reshape(-1, result.shape[-1]), low.reshape(-1, low.shape[-1]),
                          self.lora_B[name].weight.t(), alpha=self.scaling[name])
        return out.view(result.shape)


def fuse_lora(module: nn.Module) -> int:
    """Turn every PEFT LoRA ``Linear`` inside ``module`` into a ``FusedLoraLinear`` in place (same
    parameters, hooks and keys); returns how many."""
    return retype_modules(module, LoraLinear, FusedLoraLinear)
