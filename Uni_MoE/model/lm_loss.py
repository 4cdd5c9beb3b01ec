"""Causal-LM loss from hidden states, without the [tokens, vocab] float32 logits of the whole batch.

The LM head and the cross-entropy run over chunks of rows: each chunk's logits are made in float32,
turned into the loss and, in the same pass, into the gradients of the hidden states (and of the head's
weight when it trains), then dropped. Backward only scales the stored gradients. Same value as
transformers' causal-LM loss: labels shifted by one, ``-100`` ignored, mean over counted tokens.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        acc = torch.promote_types(hidden.dtype, torch.float32)  # float32 for bf16 models
        grad_w = torch.zeros_like(weight, dtype=acc) if ctx.needs_input_grad[1] else None
        total = hidden.new_zeros((), dtype=acc)
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start : start + chunk], labels[start : start + chunk]
            valid = y != IGNORE_INDEX
            target = y.clamp_min(0)[:, None]
            logits = (h @ weight.t()).to(acc)  # [c, V], this chunk only
            lse = logits.logsumexp(-1)
            total += ((lse - logits.gather(1, target)[:, 0]) * valid).sum()
            probs = logits.sub_(lse[:, None]).exp_()  # d loss_sum / d logits = softmax - one_hot
            probs.scatter_add_(1, target, -valid[:, None].to(acc)).mul_(valid[:, None])
            d_logits = probs.to(hidden.dtype)
            if grad_h is not None:
                torch.mm(d_logits, weight, out=grad_h[start : start + chunk])
            if grad_w is not None:
                grad_w.addmm_(d_logits.t().to(acc), h.to(acc))
        count = (labels != IGNORE_INDEX).sum().clamp_min(1)
        ctx.save_for_backward(grad_h, grad_w, count)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w, count = ctx.saved_tensors
        scale = grad_loss / count
        return (None if grad_h is None else grad_h * scale.to(grad_h.dtype),
                None if grad_w is None else (grad_w * scale).to(ctx.weight_dtype), None, None)


def causal_lm_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = 4096
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``hidden`` [B, S, H] through the head ``weight`` [V, H] against
    ``labels`` [B, S] (position t predicts label t+1; -100 is ignored), ``chunk`` rows at a time."""
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return _ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, shifted.reshape(-1), chunk)
