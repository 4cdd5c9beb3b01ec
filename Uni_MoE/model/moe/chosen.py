"""The MoE experts at the smallest decoding sizes: only each token's chosen experts run, with no host
synchronisation and no data-dependent shapes, so a CUDA graph can capture the step.

Each (token, slot) pair multiplies its expert's weights, picked by an index read on the device
(``gemv_kernels.py`` on a GPU; elsewhere a gather of the chosen weight slices, a copy that is fine for
the small models that run there). A single sequence therefore reads k experts per layer instead of the
all-expert path's E (``decode.py``). Pairs that share an expert read its weights once per pair, and the
all-expert path's batched GEMMs stream faster, so ``implementations.py`` uses this path only while the
pairs are well below E (measured: one token, top-2 of 4 experts).
"""

from __future__ import annotations

import torch

from . import gemv_kernels
from .experts import MoEExperts


def _gathered(x: torch.Tensor, weight: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """x[p] weight[bases[p]]^T: x [P, in], weight [B, out, in] -> [P, out] (the gather copies the slices)."""
    return (x[:, None, :] @ weight.index_select(0, bases).transpose(1, 2))[:, 0]


def _lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, pairs: torch.Tensor,
                experts: MoEExperts) -> torch.Tensor:
    """Each pair's own expert's LoRA term s * (x A^T) B^T: x [P, in], A [E, r, in], B [E, out, r] -> [P, out]."""
    return experts.lora_scaling * _gathered(_gathered(experts.lora_dropout(x), a, pairs), b, pairs)


def experts_chosen(
    x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: MoEExperts
) -> torch.Tensor:
    """Mix the chosen experts' outputs, running only those (no data-dependent shapes).

    x [T, H]; weights [T, k] (x's dtype); indices [T, k] -> [T, H]. Same function as experts_reference.
    """
    tokens, k = indices.shape
    pairs = indices.reshape(-1)  # pair p is token p // k, slot p % k
    bases = pairs if experts.num_bases > 1 else torch.zeros_like(pairs)
    xs = x.repeat_interleave(k, dim=0)  # [P, H]
    deltas = None
    if experts.has_lora:
        deltas = (_lora_delta(xs, experts.gate_lora_A, experts.gate_lora_B, pairs, experts),
                  _lora_delta(xs, experts.up_lora_A, experts.up_lora_B, pairs, experts))
    gate, up, down = experts.gate_proj, experts.up_proj, experts.down_proj
    kernels = experts.hidden_act == "silu" and not torch.is_grad_enabled()  # the kernels have no backward
    if kernels and gemv_kernels.usable(x, gate, up, down):
        h = gemv_kernels.gathered_swiglu(xs, bases, gate, up, deltas)  # [P, I]
        y = gemv_kernels.gathered_matvec(h, bases, down)  # [P, H], float32
    else:
        g, u = _gathered(xs, gate, bases), _gathered(xs, up, bases)
        if deltas is not None:
            g, u = g + deltas[0], u + deltas[1]
        h = experts.act_fn(g) * u
        y = _gathered(h, down, bases)
    if experts.has_lora:
        y = y + _lora_delta(h, experts.down_lora_A, experts.down_lora_B, pairs, experts)
    mixed = (y.view(tokens, k, -1) * weights[..., None]).sum(dim=1)
    return mixed.to(x.dtype)
