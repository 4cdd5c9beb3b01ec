"""Top-k routing of tokens to experts and the GShard load-balancing loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .lora_blocks import one_hot


def route_tokens(
    logits: torch.Tensor,
    top_k: int,
    second_expert_sampling: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``top_k`` experts per token and their mixing weights.

    logits: [T, E] fp32 router logits. Returns (weights [T, k] fp32 summing to 1, indices [T, k]).
    The weights are the softmax over the chosen logits, which equals the full softmax renormalised
    over the chosen experts (v1 and v2 agree on this). With ``second_expert_sampling`` (v2's
    training-time rule) the 2nd expert is the argmax of Gumbel-noised logits, excluding the 1st.
    """
    if second_expert_sampling and top_k == 2:
        first = logits.argmax(dim=-1, keepdim=True)
        gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp_min(1e-20)).clamp_min(1e-20))
        noisy = (logits + gumbel).scatter(-1, first, float("-inf"))
        indices = torch.cat([first, noisy.argmax(dim=-1, keepdim=True)], dim=-1)
    else:
        indices = logits.topk(top_k, dim=-1).indices
    weights = F.softmax(logits.gather(-1, indices), dim=-1)
    return weights, indices


def balance_loss(logits: torch.Tensor, indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """GShard balance loss: E * sum_e(mean gate prob_e * fraction of tokens whose top-1 is e).

    Written as DeepSpeed-MoE does, ``mean(me * ce) * E * E``; it is 1 for a perfectly uniform router.
    """
    probs = F.softmax(logits, dim=-1)  # [T, E]
    me = probs.mean(dim=0)
    ce = one_hot(indices[:, 0], num_experts, probs.dtype).mean(dim=0)  # no host sync, unlike F.one_hot
    return (me * ce).mean() * num_experts * num_experts


def in_backward() -> bool:
    """True while autograd's engine runs this code: a checkpointed layer recomputing its forward in the
    backward. The MoE layers keep no output of such a forward (its balance loss's graph would hold the
    recomputed activations until the next step), and expert parallelism reuses the forward's counts."""
    return torch._C._current_graph_task_id() != -1
