"""All experts' LoRA factors as one matrix, and rows that select one expert's block of it.

An r-wide LoRA activation of a row routed to expert e, placed in block e of an [n, E*r] matrix
("spread"), times all experts' factors stacked as [E*r, out] is exactly that expert's LoRA product.
For E*r up to a few hundred this dense, block-masked GEMM costs less than grouping the rows and it can
accumulate straight into a base output (``addmm_``) without an out-wide temporary.
"""

from __future__ import annotations

import torch

from .factor_layout import swap_last_two
from .segments import SlotGrouping


def one_hot(index: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """F.one_hot without its host-synchronising range check; any dtype."""
    return (index[..., None] == torch.arange(num_classes, device=index.device)).to(dtype)


def stack_b(lora_b: torch.Tensor) -> torch.Tensor:
    """LoRA B [E, out, r] -> [E*r, out], row e*r + i is expert e's column i."""
    return swap_last_two(lora_b).view(-1, lora_b.shape[1])


def unstack_b(stacked: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Inverse of ``stack_b``: [E*r, out] -> [E, out, r]."""
    return stacked.view(num_experts, -1, stacked.shape[1]).permute(0, 2, 1)


def spread(z: torch.Tensor, expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Per-row r-wide activations z [n, r] -> [n, E*r], placed in the row's expert block, zeros elsewhere."""
    return (one_hot(expert, num_experts, z.dtype)[:, :, None] * z[:, None, :]).flatten(1)


def _blocks(z_all: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[n, E*r] -> [n, E, r] (explicit sizes, so n = 0 works)."""
    return z_all.view(z_all.shape[0], num_experts, z_all.shape[1] // num_experts)


def keep_block(z_all: torch.Tensor, expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[n, E*r] activations of every expert -> [n, E*r] with only each row's own expert block kept."""
    mask = one_hot(expert, num_experts, z_all.dtype)[:, :, None]
    return (_blocks(z_all, num_experts) * mask).flatten(1)


def mix_slots(zd: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Per-slot r-wide down LoRA-A outputs zd [T, k, r] -> sum_j w_j zd_j in the slot's expert block, [T, E*r]
    (one scatter of the weighted slots into zeros)."""
    t, k, r = zd.shape
    mix = zd.new_zeros(t, num_experts, r)
    mix.scatter_add_(1, indices[:, :, None].expand(t, k, r), zd * weights[:, :, None])
    return mix.view(t, num_experts * r)


def own_blocks(z_all: torch.Tensor, indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, E*r] r-wide terms of every expert -> [T, k, r], each slot's own expert block."""
    blocks = _blocks(z_all, num_experts)
    return blocks.gather(1, indices[:, :, None].expand(*indices.shape, blocks.shape[2]))


def own_lora_inputs(za: torch.Tensor, g: SlotGrouping, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate and up LoRA-A activations of every expert [T, 2*E*r] -> each sorted slot's own [S, r] pair."""
    own = za.view(za.shape[0], 2, num_experts, za.shape[1] // (2 * num_experts))[g.token, :, g.expert]  # [S, 2, r]
    return own[:, 0].contiguous(), own[:, 1].contiguous()


def za_blocks(dz: torch.Tensor, indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Per-slot gate/up LoRA input gradients dz [T, k, 2, r] -> [T, 2*E*r] in the layout of the LoRA-A
    activations of every expert (each slot's pair in its expert's blocks, zeros elsewhere)."""
    t, k, _, r = dz.shape
    out = dz.new_zeros(t, 2, num_experts, r)
    out.scatter_add_(2, indices[:, None, :, None].expand(t, 2, k, r), dz.permute(0, 2, 1, 3))
    return out.view(t, 2 * num_experts * r)


def slot_pairs(dzg: torch.Tensor, dzu: torch.Tensor, g: SlotGrouping, k: int) -> torch.Tensor:
    """Gate and up LoRA input gradients of the sorted slots [S, r] each -> [T, k, 2, r] in token order."""
    return torch.stack([dzg, dzu], 1)[g.inverse].view(-1, k, 2, dzg.shape[1])
