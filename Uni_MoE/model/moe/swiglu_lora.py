"""The SwiGLU of the distinct-expert block with its r-wide LoRA terms, on sorted slot rows: two backends.

``SwiGLULoRA`` runs the Triton kernels of swiglu_lora_kernels.py where they are available (CUDA), and
otherwise PyTorch: block-masked ``addmm_`` of the LoRA-B products into the base outputs, the fused
SwiGLU of swiglu.py and grouped r-wide products. Both compute the same function; the kernels keep
gate/up before the LoRA deltas and recompute them from r-wide factors, the PyTorch path adds the
deltas in place.
"""

from __future__ import annotations

import torch

from . import swiglu_lora_kernels as kernels
from .factor_layout import kernel_factors
from .lora_blocks import spread, stack_b
from .segments import SlotGrouping, segment_mm
from .swiglu import swiglu_backward, swiglu_forward

Maybe = torch.Tensor | None


def _rank(lora: tuple | None) -> int:
    """The LoRA rank of ``lora`` (zg first), 0 without LoRA."""
    return 0 if lora is None else lora[0].shape[1]


class SwiGLULoRA:
    """h = silu(gate + s zg Bg_e^T) * (up + s zu Bu_e^T) per sorted row (expert e), zd = dropout(h) Ad_e^T,
    and the gradients back to gate, up, zg, zu. ``lora`` = (zg, zu [S, r], Bg, Bu [E, I, r], Ad [E, r, I])
    or None."""

    def __init__(self, gate: torch.Tensor, g: SlotGrouping, scale: float) -> None:
        self.g, self.scale = g, scale
        self.fused = kernels.available(gate)
        self.rows, self.dtype = gate.shape[0], gate.dtype
        self._scheds: dict[int, torch.Tensor] = {}  # tile schedules by rows a tile, made on first use
        self._weights: tuple | None = None  # the LoRA weights in the kernels' layout, made on first use

    def _sched(self, rank: int) -> torch.Tensor:
        """The kernels' tile schedule at the tile height of this LoRA rank (``kernels.block_m``)."""
        block_m = kernels.block_m(rank, self.dtype)
        if block_m not in self._scheds:
            self._scheds[block_m] = kernels.tile_schedule(self.g.counts, self.g.offs, self.rows, block_m)
        return self._scheds[block_m]

    def _kernel_lora(self, lora: tuple | None) -> tuple | None:
        """``lora`` with its weights in the kernels' layout (``kernel_factors``), made once for forward and
        backward of one block call (they see the same weights)."""
        if lora is None:
            return None
        if self._weights is None:
            self._weights = kernel_factors(*lora[2:])
        return (*lora[:2], *self._weights)

    def forward(
        self, gate: torch.Tensor, up: torch.Tensor, lora: tuple | None, keep: Maybe, keep_scale: float
    ) -> tuple[torch.Tensor, Maybe, torch.Tensor, torch.Tensor]:
        """(h, zd or None, gate and up to keep for backward)."""
        if self.fused:
            h, zd = kernels.swiglu_lora_forward(gate, up, self._kernel_lora(lora), keep, keep_scale, self.scale,
                                                self._sched(_rank(lora)))
            return h, zd, gate, up
        zd = None
        gate, up = self.kept(gate, up, lora)
        h, h_dropped, _ = swiglu_forward(gate, up, None, None, keep, keep_scale, None, None)
        if lora is not None:
            zd = segment_mm(h if keep is None else h_dropped, lora[4].transpose(1, 2), self.g)
        return h, zd, gate, up

    def kept(self, gate: torch.Tensor, up: torch.Tensor, lora: tuple | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The base projections gate, up [S, I] -> what ``forward`` keeps for backward: the same tensors for the
        kernels; with the LoRA deltas added in place on the PyTorch path."""
        if not self.fused and lora is not None:
            zg, zu, gate_b, up_b, _ = lora
            num_experts = gate_b.shape[0]
            gate.addmm_(spread(zg, self.g.expert, num_experts), stack_b(gate_b), alpha=self.scale)
            up.addmm_(spread(zu, self.g.expert, num_experts), stack_b(up_b), alpha=self.scale)
        return gate, up

    def activation(self, gate: torch.Tensor, up: torch.Tensor, lora: tuple | None) -> torch.Tensor:
        """h without dropout from the kept gate and up (for a trainable down base under dropout)."""
        if self.fused:
            return kernels.swiglu_lora_forward(gate, up, self._kernel_lora(lora), None, 1.0, self.scale,
                                               self._sched(_rank(lora)))[0]
        return swiglu_forward(gate, up, None, None, None, 1.0, None, None)[0]

    def backward(
        self, dh: torch.Tensor, dzd: Maybe, gate: torch.Tensor, up: torch.Tensor, lora: tuple | None,
        keep: Maybe, keep_scale: float, need_h: bool, in_place: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, Maybe, Maybe, Maybe, tuple | None]:
        """(d_gate, d_up, dropout(h) when ``need_h`` or LoRA without the weight gradients, d zg, d zu, the LoRA
        weight gradients (s d Bg, s d Bu, d Ad) when the kernel computes them). dzd [S, r] comes scaled.
        ``in_place``: the kernels may write d_gate, d_up over gate, up (which the caller then no longer reads)."""
        if self.fused:
            rank = _rank(lora)
            wgrad = kernels.fuses_weight_grads(rank)
            ranges = kernels.expert_tile_ranges(self.g.counts, kernels.block_m(rank, self.dtype)) if wgrad else None
            need_h = need_h or (lora is not None and not wgrad)
            return kernels.swiglu_lora_backward(dh, gate, up, self._kernel_lora(lora), dzd, keep, keep_scale,
                                                self.scale, self._sched(rank), need_h, ranges, in_place)
        extra = None
        if lora is not None:
            down_a = lora[4]
            dz_all = spread(dzd, self.g.expert, down_a.shape[0])
            if keep is None:
                dh.addmm_(dz_all, down_a.reshape(-1, down_a.shape[-1]))
            else:
                extra = dz_all @ down_a.reshape(-1, down_a.shape[-1])
        d_gate, d_up, h_dropped, *_ = swiglu_backward(
            dh, gate, up, None, None, extra, keep, keep_scale, None, None, None, None
        )
        dzg = dzu = None
        if lora is not None:
            dzg = segment_mm(d_gate, lora[2], self.g) * self.scale
            dzu = segment_mm(d_up, lora[3], self.g) * self.scale
        return d_gate, d_up, h_dropped, dzg, dzu, None
