"""The chunked LM-head cross-entropy equals the full-logits causal-LM loss, value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from Uni_MoE.model.lm_loss import causal_lm_loss


@pytest.mark.parametrize("chunk", [5, 7, 1000])
@pytest.mark.parametrize("weight_trains", [False, True])
def test_chunked_loss_matches_full_logits(chunk: int, weight_trains: bool) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(3, 9, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 16, dtype=torch.float64, requires_grad=weight_trains)
    labels = torch.randint(0, 40, (3, 9))
    labels[0, :4] = -100  # ignored (media) positions
    labels[2, -1] = -100
    logits = hidden @ weight.t()
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 40), labels[:, 1:].reshape(-1), ignore_index=-100)
    expected_grads = torch.autograd.grad(expected, [hidden, weight] if weight_trains else [hidden])
    loss = causal_lm_loss(hidden, weight, labels, chunk=chunk)
    grads = torch.autograd.grad(2.0 * loss, [hidden, weight] if weight_trains else [hidden])
    torch.testing.assert_close(loss, expected)
    for ours, ref in zip(grads, expected_grads):
        torch.testing.assert_close(ours, 2.0 * ref)
