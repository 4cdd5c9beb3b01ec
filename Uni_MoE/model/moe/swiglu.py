"""SwiGLU elementwise forward and backward, each one fused kernel on CUDA (torch.compile), eager elsewhere.

The expert blocks keep only the pre-activation gate and up tensors and recompute the activation in
backward, so the I-wide intermediate is never stored. Optional pieces ride along in the same pass
instead of costing extra passes over [rows, I]: LoRA deltas added to gate/up, the LoRA dropout mask
(bool, with its 1/(1-p) scale) on the down LoRA's input, the routing weight of each row, a running sum
over a token's slots, and a per-row dot product for the routing-weight gradient.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Callable

import torch

_COMPILE = os.environ.get("UNI_MOE_COMPILE", "1") != "0"

Tensor = torch.Tensor
Maybe = torch.Tensor | None


def _fused_on_cuda(fn: Callable) -> Callable:
    """``fn`` compiled into fused kernels for CUDA tensors; eager on other devices or if compiling fails."""
    compiled: list[Callable] = []

    @functools.wraps(fn)
    def call(*args: object) -> object:
        global _COMPILE
        if _COMPILE and args[0].is_cuda:
            if not compiled:
                compiled.append(torch.compile(fn, dynamic=True))
            try:
                return compiled[0](*args)
            except Exception as err:  # an inductor/triton failure must not stop training: run eager
                warnings.warn(f"{fn.__name__}: torch.compile failed ({err!r}); using eager kernels")
                _COMPILE = False
        return fn(*args)

    return call


def _plus(base: Tensor, delta: Maybe) -> Tensor:
    return base if delta is None else base + delta


def _dropped(h: Tensor, keep: Maybe, keep_scale: float) -> Tensor:
    return h if keep is None else h * keep * keep_scale


@_fused_on_cuda
def swiglu_forward(
    gate: Tensor, up: Tensor, d_gate: Maybe, d_up: Maybe, keep: Maybe, keep_scale: float, weight: Maybe, acc: Maybe
) -> tuple[Tensor, Maybe, Maybe]:
    """h = silu(gate + d_gate) * (up + d_up), deltas optional.

    Returns (h, h times the dropout mask ``keep`` [bool] and ``keep_scale`` or None without a mask,
    ``acc + weight[:, None] * h`` or None without ``weight``; ``acc`` may be None).
    """
    h = torch.nn.functional.silu(_plus(gate, d_gate)) * _plus(up, d_up)
    mixed = None if weight is None else _plus(h * weight[:, None], acc)
    return h, None if keep is None else _dropped(h, keep, keep_scale), mixed


@_fused_on_cuda
def swiglu_backward(
    grad_h: Tensor,
    gate: Tensor,
    up: Tensor,
    d_gate: Maybe,
    d_up: Maybe,
    grad_extra: Maybe,
    keep: Maybe,
    keep_scale: float,
    row_scale: Maybe,
    probe: Maybe,
    acc_gate: Maybe,
    acc_up: Maybe,
) -> tuple[Tensor, Tensor, Tensor, Maybe, Maybe, Maybe]:
    """Gradients of h = silu(g) * u with g = gate + d_gate, u = up + d_up.

    The incoming gradient is (grad_h + grad_extra * keep * keep_scale) * row_scale[:, None], each part
    optional. Returns (grad of g, grad of u, h with the dropout mask applied, per-row <h, probe> in fp32,
    acc_gate + grad of g, acc_up + grad of u); the last three are None when their inputs are.
    """
    g = _plus(gate, d_gate)
    u = _plus(up, d_up)
    grad = grad_h if grad_extra is None else grad_h + _dropped(grad_extra, keep, keep_scale)
    if row_scale is not None:
        grad = grad * row_scale[:, None]
    sig = torch.sigmoid(g.float())
    silu = g * sig
    h = (silu * u).to(gate.dtype)
    dot = None if probe is None else (h.float() * probe.float()).sum(-1)
    grad_g = (grad * u * (sig * (1.0 + g * (1.0 - sig)))).to(gate.dtype)
    grad_u = (grad * silu).to(gate.dtype)
    sum_g = None if acc_gate is None else acc_gate + grad_g
    sum_u = None if acc_up is None else acc_up + grad_u
    return grad_g, grad_u, _dropped(h, keep, keep_scale), dot, sum_g, sum_u


@_fused_on_cuda
def row_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-row dot product of a and b [n, D] -> [n], accumulated in fp32."""
    return (a.float() * b.float()).sum(-1)


def dropout_mask(like: Tensor, p: float) -> tuple[Maybe, float]:
    """A bool keep-mask shaped like ``like`` and its inverted-dropout scale 1/(1-p); (None, 1) when p is 0."""
    if p <= 0:
        return None, 1.0
    return torch.empty(like.shape, device=like.device, dtype=torch.bool).bernoulli_(1.0 - p), 1.0 / (1.0 - p)
