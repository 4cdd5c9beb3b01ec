"""The fused SwiGLU pieces against autograd of their plain formulas, and the LoRA dropout mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from Uni_MoE.model.moe.swiglu import dropout_mask, row_dot, swiglu_backward, swiglu_forward


def test_forward_returns_dropped_and_mixed_activations() -> None:
    gate, up, d_gate, d_up, acc = (torch.randn(5, 7) for _ in range(5))
    keep, weight = torch.rand(5, 7) > 0.3, torch.rand(5)
    h, dropped, mixed = swiglu_forward(gate, up, d_gate, d_up, keep, 2.0, weight, acc)
    want = F.silu(gate + d_gate) * (up + d_up)
    torch.testing.assert_close(h, want)
    torch.testing.assert_close(dropped, want * keep * 2.0)
    torch.testing.assert_close(mixed, acc + weight[:, None] * want)
    assert swiglu_forward(gate, up, None, None, None, 1.0, None, None)[1:] == (None, None)


def test_backward_matches_autograd() -> None:
    gate, up, d_gate, d_up = (torch.randn(6, 9, dtype=torch.float64, requires_grad=True) for _ in range(4))
    grad_h, extra, probe, acc_g, acc_u = (torch.randn(6, 9, dtype=torch.float64) for _ in range(5))
    keep, scale = torch.rand(6, 9) > 0.5, 1.7
    row_scale = torch.rand(6, dtype=torch.float64)
    g, u = gate + d_gate, up + d_up
    h = F.silu(g) * u
    # the block's loss reaches h directly (grad_h) and through the dropped copy (extra), both row-scaled
    loss = (h * grad_h * row_scale[:, None]).sum() + (h * keep * scale * extra * row_scale[:, None]).sum()
    want_g, want_u = torch.autograd.grad(loss, (g, u))
    out = swiglu_backward(grad_h, gate.detach(), up.detach(), d_gate.detach(), d_up.detach(), extra, keep, scale,
                          row_scale, probe, acc_g, acc_u)
    grad_g, grad_u, dropped, dot, sum_g, sum_u = out
    torch.testing.assert_close(grad_g, want_g)
    torch.testing.assert_close(grad_u, want_u)
    torch.testing.assert_close(dropped, (h * keep * scale).detach())
    torch.testing.assert_close(dot, (h * probe).sum(-1).detach().float())
    torch.testing.assert_close(sum_g, acc_g + want_g)
    torch.testing.assert_close(sum_u, acc_u + want_u)


def test_row_dot_accumulates_in_float32() -> None:
    a, b = torch.randn(4, 300, dtype=torch.bfloat16), torch.randn(4, 300, dtype=torch.bfloat16)
    out = row_dot(a, b)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (a.float() * b.float()).sum(-1))


def test_dropout_mask_keeps_one_minus_p() -> None:
    torch.manual_seed(0)
    keep, scale = dropout_mask(torch.empty(400, 500), 0.2)
    assert keep.dtype == torch.bool and abs(keep.float().mean().item() - 0.8) < 0.01 and scale == 1.25
    assert dropout_mask(torch.empty(3, 3), 0.0) == (None, 1.0)
