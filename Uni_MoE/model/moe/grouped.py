"""Grouped MoE experts: the whole layer in a fixed number of batched kernels, no loop over experts.

Token-slots (token, chosen expert) are sorted by expert once; the frozen base projections run as grouped
GEMMs over the sorted rows (``grouped_mm`` on CUDA bf16, a padded ``bmm`` elsewhere), and every expert's
LoRA runs at once as low-rank products. Results are combined with the routing weights per token by an
elementwise weighted sum over the token's k slots, so the layer needs no atomics and no host syncs.

LoRA B-sides use a block-masked dense GEMM: each slot's r-wide LoRA activation is placed in its expert's
block of an [S, E*r] matrix and multiplied by all experts' B stacked as [E*r, out], accumulated into the
base output by ``addmm``. For E*r up to a few hundred that costs fewer bytes than writing and adding an
out-wide delta, and it needs no grouping at all.

``expert_type="shared"`` uses the shared base's algebra: gate and up base projections run once per token,
each slot adds its LoRA delta, and the (linear) down projection runs once on sum_j w_j h_j, so the frozen
work is one dense MLP. LoRA dropout on the expert input draws one mask per token and projection, shared by
the token's k slots (the loop draws one per slot); the down LoRA's dropout acts per slot, as in the loop.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .experts import MoEExperts
from .layer import register_expert_implementation

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@dataclass
class SlotGrouping:
    """Token-slots sorted by expert. S = T*k slots; rows of sorted tensors follow ``order``."""

    order: torch.Tensor  # [S] flat slot id (t*k + j) of each sorted row
    token: torch.Tensor  # [S] token of each sorted row
    expert: torch.Tensor  # [S] expert of each sorted row (non-decreasing)
    counts: torch.Tensor  # [E] rows per expert
    offs: torch.Tensor  # [E] int32 end offset of each expert's rows


def group_slots(indices: torch.Tensor, num_experts: int) -> SlotGrouping:
    """Sort the [T, k] expert choices by expert (stable), with per-expert counts and end offsets."""
    flat = indices.reshape(-1)
    order = flat.argsort(stable=True)
    expert = flat[order]
    ends = torch.searchsorted(expert, torch.arange(num_experts, device=flat.device), right=True)  # no host sync
    counts = ends.diff(prepend=ends.new_zeros(1))
    return SlotGrouping(order, order // indices.shape[1], expert, counts, ends.to(torch.int32))


def _one_hot(index: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """F.one_hot without its host-synchronising range check."""
    return (index[..., None] == torch.arange(num_classes, device=index.device)).to(dtype)


class _MixSlots(torch.autograd.Function):
    """out[t] = sum_j w[t, j] * v[t, j] for v [T, k, D], w [T, k], elementwise: cuBLAS runs the
    equivalent batched k-wide GEMMs (and their K=1 backward) far below memory speed."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(v if w.requires_grad else None, w)
        out = v[:, 0] * w[:, :1]
        for j in range(1, v.shape[1]):  # over the k slots of a token, not over experts
            out.addcmul_(v[:, j], w[:, j : j + 1])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        v, w = ctx.saved_tensors
        grad_v = grad[:, None, :] * w[:, :, None] if ctx.needs_input_grad[0] else None
        grad_w = torch.bmm(v, grad[:, :, None]).squeeze(-1) if ctx.needs_input_grad[1] else None
        return grad_v, grad_w


@functools.lru_cache(maxsize=None)
def _grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this torch build runs ``grouped_mm`` for the device type and dtype (probed once)."""
    if _grouped_mm is None or (device_type == "cuda" and dtype != torch.bfloat16):
        return False
    try:
        a = torch.ones(4, 8, device=device_type, dtype=dtype)
        b = torch.ones(2, 8, 8, device=device_type, dtype=dtype)
        _grouped_mm(a, b, offs=torch.tensor([1, 4], device=device_type, dtype=torch.int32))
    except (RuntimeError, NotImplementedError):
        return False
    return True


def _aligned(t: torch.Tensor) -> bool:
    """grouped_mm needs 16-byte aligned strides and base pointers on CUDA."""
    step = 16 // t.element_size()
    return t.data_ptr() % 16 == 0 and all(s % step == 0 for s, n in zip(t.stride(), t.shape) if s != 1 and n > 1)


class _GroupedMM(torch.autograd.Function):
    """grouped_mm with an explicit backward: contiguous grads, no weight grad for frozen weights, and
    zero weight grads for empty groups (some grouped GEMM kernels leave those unwritten)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a if b.requires_grad else None, b, offs, counts)
        return _grouped_mm(a, b, offs=offs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        a, b, offs, counts = ctx.saved_tensors
        grad = grad.contiguous()
        grad_a = _grouped_mm(grad, b.transpose(-2, -1), offs=offs) if ctx.needs_input_grad[0] else None
        grad_b = None
        if ctx.needs_input_grad[1]:
            grad_b = _grouped_mm(a.t(), grad, offs=offs)  # [E, K, N]
            grad_b = torch.where(counts[:, None, None] > 0, grad_b, 0)
        return grad_a, grad_b, None, None


def _padded_mm(a: torch.Tensor, b: torch.Tensor, g: SlotGrouping) -> torch.Tensor:
    """Exact, loop-free segment matmul: scatter rows into [E, max_count, K], one bmm, gather back."""
    starts = g.offs.long() - g.counts  # [E]
    pos = torch.arange(a.shape[0], device=a.device) - starts[g.expert]  # [S] row within its expert
    padded = a.new_zeros(b.shape[0], int(g.counts.max()), a.shape[1]).index_put((g.expert, pos), a)
    return torch.bmm(padded, b)[g.expert, pos]


def segment_mm(a: torch.Tensor, b: torch.Tensor, g: SlotGrouping) -> torch.Tensor:
    """Rows of a [S, K] (sorted by expert) times their expert's b [E, K, N] -> [S, N]."""
    if a.shape[0] == 0:
        return a.new_zeros(0, b.shape[-1])
    if _grouped_mm_works(a.device.type, a.dtype) and b.dtype == a.dtype and (
        not a.is_cuda or (_aligned(a) and _aligned(b))
    ):
        return _GroupedMM.apply(a, b, g.offs, g.counts)
    return _padded_mm(a, b, g)


def _stack_b(lora_b: torch.Tensor) -> torch.Tensor:
    """LoRA B [E, out, r] -> [E*r, out]: all experts' B as one matrix for the block-masked GEMM."""
    return lora_b.permute(0, 2, 1).reshape(-1, lora_b.shape[1])


def _spread(z: torch.Tensor, expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Per-slot r-wide LoRA activations z [S, r] -> [S, E*r], placed in the slot's expert block."""
    mask = _one_hot(expert, num_experts, z.dtype)  # [S, E]
    return (mask[:, :, None] * z[:, None, :]).flatten(1)


def _lora_input_acts(
    x: torch.Tensor, slot_tokens: torch.Tensor, slot_experts: torch.Tensor, experts: MoEExperts
) -> list[torch.Tensor]:
    """Block-masked gate and up LoRA activations [S, E*r] each, from one dense x @ [A_1..A_E] per token."""
    e, r = experts.num_experts, experts.lora_r
    mask = _one_hot(slot_experts, e, x.dtype)[:, :, None]  # [S, E, 1]
    acts = []
    for lora_a in (experts.gate_lora_A, experts.up_lora_A):
        z = experts.lora_dropout(x) @ lora_a.reshape(e * r, -1).t()  # [T, E*r], every expert
        acts.append((z.view(-1, e, r)[slot_tokens] * mask).flatten(1))
    return acts


def _swiglu_slots(
    base_gate: torch.Tensor,
    base_up: torch.Tensor,
    x: torch.Tensor,
    slot_tokens: torch.Tensor,
    slot_experts: torch.Tensor,
    experts: MoEExperts,
) -> torch.Tensor:
    """Per-slot intermediate h = act(gate + dgate) * (up + dup) [S, I] from per-slot base outputs."""
    if experts.has_lora:
        s = experts.lora_scaling
        zg, zu = _lora_input_acts(x, slot_tokens, slot_experts, experts)
        base_gate = torch.addmm(base_gate, zg, _stack_b(experts.gate_lora_B), alpha=s)
        base_up = torch.addmm(base_up, zu, _stack_b(experts.up_lora_B), alpha=s)
    return experts.act_fn(base_gate) * base_up


def _frozen(p: torch.Tensor) -> torch.Tensor:
    """Detach parameters that take no gradient so autograd keeps nothing for them."""
    return p if p.requires_grad else p.detach()


def _distinct_experts(x: torch.Tensor, weights: torch.Tensor, g: SlotGrouping, experts: MoEExperts) -> torch.Tensor:
    """Each expert its own base: grouped GEMMs over the expert-sorted slots."""
    t, k = weights.shape
    xs = x[g.token]  # [S, H]
    gate = segment_mm(xs, _frozen(experts.gate_proj).transpose(1, 2), g)  # [S, I]
    up = segment_mm(xs, _frozen(experts.up_proj).transpose(1, 2), g)  # [S, I]
    h = _swiglu_slots(gate, up, x, g.token, g.expert, experts)  # [S, I]
    y = segment_mm(h, _frozen(experts.down_proj).transpose(1, 2), g)  # [S, H]
    if experts.has_lora:
        zd = segment_mm(experts.lora_dropout(h), experts.down_lora_A.transpose(1, 2), g)  # [S, r]
        y = torch.addmm(y, _spread(zd, g.expert, experts.num_experts), _stack_b(experts.down_lora_B),
                        alpha=experts.lora_scaling)
    inverse = torch.empty_like(g.order).scatter_(0, g.order, torch.arange(len(g.order), device=x.device))
    return _MixSlots.apply(y[inverse].view(t, k, -1), weights)  # slots back in token order, mixed


def _shared_experts(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: MoEExperts) -> torch.Tensor:
    """One shared base: base gate/up once per token, one down projection of sum_j w_j h_j, LoRA per slot."""
    t, k = weights.shape
    flat = indices.reshape(-1)  # [S], natural slot order
    slot_tokens = torch.arange(t, device=x.device).repeat_interleave(k)
    gate = (x @ _frozen(experts.gate_proj)[0].t()).unsqueeze(1).expand(-1, k, -1).flatten(0, 1)  # [S, I]
    up = (x @ _frozen(experts.up_proj)[0].t()).unsqueeze(1).expand(-1, k, -1).flatten(0, 1)  # [S, I]
    h = _swiglu_slots(gate, up, x, slot_tokens, flat, experts)  # [S, I]
    mixed = _MixSlots.apply(h.view(t, k, -1), weights)  # [T, I] = sum_j w_j h_j
    y = mixed @ _frozen(experts.down_proj)[0].t()  # [T, H]
    if experts.has_lora:
        e, r = experts.num_experts, experts.lora_r
        zd = experts.lora_dropout(h) @ experts.down_lora_A.reshape(e * r, -1).t()  # [S, E*r], all experts
        zd = zd.view(t, k, e, r) * _one_hot(indices, e, zd.dtype)[..., None]  # keep each slot's expert
        zd = _MixSlots.apply(zd.flatten(2), weights)  # [T, E*r] = sum_j w_j z_j
        y = torch.addmm(y, zd, _stack_b(experts.down_lora_B), alpha=experts.lora_scaling)
    return y


def experts_grouped(
    x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: MoEExperts
) -> torch.Tensor:
    """Mix the chosen experts' outputs, batched over experts.

    x [T, H]; weights [T, k] (x's dtype); indices [T, k] -> [T, H]. Same function as experts_reference.
    """
    if experts.expert_type == "shared":
        return _shared_experts(x, weights, indices, experts)
    return _distinct_experts(x, weights, group_slots(indices, experts.num_experts), experts)


register_expert_implementation("grouped", experts_grouped)
