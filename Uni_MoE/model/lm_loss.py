"""Causal-LM loss from hidden states, without the [tokens, vocab] float32 logits of the whole batch.

The LM head and the cross-entropy run over chunks of rows: each chunk's logits are made, turned into the
per-token losses and, in the same pass, into the gradients of the hidden states (and of the head's weight
when it trains), then dropped. Backward only scales the stored gradients. Same value as transformers'
causal-LM loss: labels shifted by one, ``-100`` ignored, the sum over counted tokens divided by their
number (or by ``num_items_in_batch`` when the trainer gives it, as under gradient accumulation). The
per-token losses come out too, detached, so per-sample statistics need no second pass over the logits.
On CUDA the softmax gradient of a chunk is one Triton kernel (``lm_loss_kernel``).
"""

from __future__ import annotations

import torch

from .lm_loss_kernel import padded_head, usable, xent_grad_

IGNORE_INDEX = -100


def _xent_grad_torch_(logits: torch.Tensor, targets: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's result with torch ops: (per-row loss in ``acc``, d loss_sum / d logits in logits' dtype)."""
    valid = targets != IGNORE_INDEX
    target = targets.clamp_min(0)[:, None]
    wide = logits.to(acc)
    lse = wide.logsumexp(-1)
    loss = (lse - wide.gather(1, target)[:, 0]) * valid
    probs = wide.sub_(lse[:, None]).exp_()
    probs.scatter_add_(1, target, -valid[:, None].to(acc)).mul_(valid[:, None])
    return loss, probs.to(logits.dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, divisor: torch.Tensor,
                chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        acc = torch.promote_types(hidden.dtype, torch.float32)  # float32 for bf16 models
        grad_w = torch.zeros_like(weight, dtype=acc) if ctx.needs_input_grad[1] else None
        token_loss = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        vocab = weight.shape[0]
        kernel = usable(hidden)
        head = padded_head(weight) if kernel else weight
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start : start + chunk], targets[start : start + chunk]
            logits = h @ head.t()  # [c, V (padded)], this chunk only
            if kernel:
                token_loss[start : start + chunk] = xent_grad_(logits, y, IGNORE_INDEX, vocab)
                d_logits = logits  # the padding columns stay 0 and meet zero head rows
            else:
                token_loss[start : start + chunk], d_logits = _xent_grad_torch_(logits, y, acc)
            if grad_h is not None:
                torch.mm(d_logits, head, out=grad_h[start : start + chunk])
            if grad_w is not None:
                grad_w.addmm_(d_logits[:, :vocab].t().to(acc), h.to(acc))
        ctx.save_for_backward(grad_h, grad_w, divisor)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(token_loss)
        return token_loss.sum() / divisor, token_loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_tokens: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w, divisor = ctx.saved_tensors
        scale = grad_loss / divisor
        return (None if grad_h is None else grad_h * scale.to(grad_h.dtype),
                None if grad_w is None else (grad_w * scale).to(ctx.weight_dtype), None, None, None)


def causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None,
    chunk: int = 4096,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy of ``hidden`` [B, S, H] through the head ``weight`` [V, H], ``chunk`` rows at a
    time, against ``labels`` [B, S] (position t predicts label t+1; -100 is ignored) or the already shifted
    ``shift_labels``. Returns (the loss, each sample's mean loss [B] over its counted tokens, detached, NaN
    for a sample without any)."""
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    targets = shift_labels.reshape(-1).to(hidden.device)
    counted = (shift_labels != IGNORE_INDEX).sum(dim=-1).to(hidden.device)
    if num_items_in_batch is None:
        divisor = counted.sum().clamp_min(1)
    else:
        divisor = torch.as_tensor(num_items_in_batch, device=hidden.device)
    loss, token_loss = _ChunkedLinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets, divisor, chunk)
    return loss, token_loss.view(shift_labels.shape).sum(dim=-1) / counted
