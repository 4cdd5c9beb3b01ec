"""The chunked LM-head cross-entropy equals the full-logits causal-LM loss: value, gradients and per-sample
losses; the Triton kernel of its softmax gradient (run by Triton's interpreter where Triton is installed)
equals the torch path."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from helpers import run_in_triton_interpreter

from Uni_MoE.model.lm_loss import _xent_grad_torch_, causal_lm_loss


def _problem(dtype: torch.dtype = torch.float64, weight_trains: bool = False):
    torch.manual_seed(0)
    hidden = torch.randn(3, 9, 16, dtype=dtype, requires_grad=True)
    weight = torch.randn(40, 16, dtype=dtype, requires_grad=weight_trains)
    labels = torch.randint(0, 40, (3, 9))
    labels[0, :4] = -100  # ignored (media) positions
    labels[2, -1] = -100
    labels[1, 1:] = -100  # a sample with no target
    return hidden, weight, labels


@pytest.mark.parametrize("chunk", [5, 7, 1000])
@pytest.mark.parametrize("weight_trains", [False, True])
def test_chunked_loss_matches_full_logits(chunk: int, weight_trains: bool) -> None:
    hidden, weight, labels = _problem(weight_trains=weight_trains)
    logits = hidden @ weight.t()
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 40), labels[:, 1:].reshape(-1), ignore_index=-100)
    expected_grads = torch.autograd.grad(expected, [hidden, weight] if weight_trains else [hidden])
    loss, _ = causal_lm_loss(hidden, weight, labels, chunk=chunk)
    grads = torch.autograd.grad(2.0 * loss, [hidden, weight] if weight_trains else [hidden])
    torch.testing.assert_close(loss, expected)
    for ours, ref in zip(grads, expected_grads):
        torch.testing.assert_close(ours, 2.0 * ref)


def test_per_sample_losses_and_the_trainers_divisor() -> None:
    """Each sample's mean over its own counted tokens (NaN without any); ``num_items_in_batch`` divides the
    sum, as transformers' loss does under gradient accumulation; ``shift_labels`` is taken as given."""
    hidden, weight, labels = _problem()
    logits = hidden.detach() @ weight.t()
    per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
    counted = (labels[:, 1:] != -100).sum(1)
    loss, samples = causal_lm_loss(hidden, weight, labels, chunk=4)
    torch.testing.assert_close(samples[[0, 2]], (per_token.sum(1) / counted)[[0, 2]])
    assert samples[1].isnan() and not samples.requires_grad
    summed, _ = causal_lm_loss(hidden, weight, labels, num_items_in_batch=50)
    torch.testing.assert_close(summed, per_token.sum() / 50)
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
    again, _ = causal_lm_loss(hidden, weight, None, shift_labels=shifted)
    torch.testing.assert_close(again, loss)


def test_torch_gradient_is_softmax_minus_one_hot() -> None:
    """By definition: d sum(loss) / d logits = softmax - one_hot on counted rows, 0 on ignored ones."""
    torch.manual_seed(1)
    logits = torch.randn(4, 7, dtype=torch.float64)
    targets = torch.tensor([3, -100, 0, 6])
    loss, grad = _xent_grad_torch_(logits.clone(), targets, torch.float64)
    expected = logits.softmax(-1) - F.one_hot(targets.clamp_min(0), 7)
    expected[1] = 0
    torch.testing.assert_close(grad, expected)
    torch.testing.assert_close(loss, -(logits.log_softmax(-1).gather(1, targets.clamp_min(0)[:, None])[:, 0]) *
                               (targets != -100))


_KERNEL_CHECK = """
import torch
from Uni_MoE.model.lm_loss import _xent_grad_torch_
from Uni_MoE.model.lm_loss import causal_lm_loss, _xent_grad_torch_
from Uni_MoE.model.lm_loss_kernel import padded_head, usable, xent_grad_
torch.manual_seed(0)
for rows, vocab, stride in [(5, 37, 37), (3, 4100, 4160), (1, 9000, 9000)]:
    logits = torch.randn(rows, stride) * 4
    targets = torch.randint(0, vocab, (rows,))
    targets[0] = -100
    assert usable(logits)
    ref_loss, ref_grad = _xent_grad_torch_(logits[:, :vocab].clone(), targets, torch.float32)
    ours = logits.clone()
    loss = xent_grad_(ours, targets, -100, vocab)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[:, :vocab], ref_grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(ours[:, vocab:], logits[:, vocab:])  # padding columns untouched
head = torch.randn(37, 8)
assert padded_head(head).shape == (64, 8) and torch.equal(padded_head(head)[:37], head)
hidden = torch.randn(2, 5, 8, requires_grad=True)
labels = torch.randint(0, 37, (2, 5))
for trains in (False, True):
    weight = head.clone().requires_grad_(trains)
    logits = hidden @ weight.t()
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 37), labels[:, 1:].reshape(-1))
    loss, _ = causal_lm_loss(hidden, weight, labels, chunk=3)
    torch.testing.assert_close(loss, ref)
    params = [hidden, weight] if trains else [hidden]
    for ours, exp in zip(torch.autograd.grad(loss, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(ours, exp, rtol=1e-5, atol=1e-6)
print("kernel matches")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_kernel_in_the_triton_interpreter_matches_the_torch_path() -> None:
    assert "kernel matches" in run_in_triton_interpreter(_KERNEL_CHECK, timeout=600)
