"""SwiGLU elementwise forward and backward, each one fused kernel on CUDA (torch.compile), eager elsewhere.

The expert blocks keep only the pre-activation gate and up tensors and recompute the activation in
backward, so its I-wide intermediate is never stored. Optional LoRA deltas are added inside the same
pass, which saves writing ``gate + delta`` as a separate tensor.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Callable

import torch

_COMPILE = os.environ.get("UNI_MOE_COMPILE", "1") != "0"


def _fused_on_cuda(fn: Callable) -> Callable:
    """``fn`` compiled into one kernel for CUDA tensors; eager on other devices or if compiling fails."""
    compiled: list[Callable] = []

    @functools.wraps(fn)
    def call(*args: torch.Tensor | None) -> object:
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


def _with_delta(base: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    return base if delta is None else base + delta


@_fused_on_cuda
def swiglu_forward(
    gate: torch.Tensor, up: torch.Tensor, d_gate: torch.Tensor | None, d_up: torch.Tensor | None
) -> torch.Tensor:
    """h = silu(gate + d_gate) * (up + d_up), deltas optional."""
    return torch.nn.functional.silu(_with_delta(gate, d_gate)) * _with_delta(up, d_up)


@_fused_on_cuda
def swiglu_backward(
    grad_h: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    d_gate: torch.Tensor | None,
    d_up: torch.Tensor | None,
    grad_extra: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    probe: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of h = silu(g) * u with g = gate + d_gate, u = up + d_up.

    The incoming gradient is (grad_h + grad_extra) * row_scale[:, None] (both optional).
    Returns (grad of g, grad of u, h recomputed, per-row <h, probe> in fp32 or None).
    """
    g = _with_delta(gate, d_gate)
    u = _with_delta(up, d_up)
    grad = _with_delta(grad_h, grad_extra)
    if row_scale is not None:
        grad = grad * row_scale[:, None]
    sig = torch.sigmoid(g.float())
    silu = g * sig
    h = (silu * u).to(gate.dtype)
    dot = None if probe is None else (h.float() * probe.float()).sum(-1)
    grad_g = (grad * u * (sig * (1.0 + g * (1.0 - sig)))).to(gate.dtype)
    grad_u = (grad * silu).to(gate.dtype)
    return grad_g, grad_u, h, dot
