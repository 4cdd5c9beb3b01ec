"""DeepSpeedMoELayer: the v2 backend, whose experts DeepSpeed-MoE places and shards over ``ep_size`` ranks.

DeepSpeed-MoE is the engine: it builds the expert-parallel process groups, owns the module tree (gate,
``deepspeed_experts.<local>``), flags expert parameters for its optimizer groups, ZeRO and checkpoints.
The forward is ours: the local router and balance loss on DeepSpeed's gate weight, then the dropless
all-to-all of only the routed rows (``ep_dispatch``) with this rank's experts run by the configured
expert implementation in one call (``stacked_experts``). It computes the local MoELayer's function for
any routing (no capacity, no dropped token) and reads and writes the same checkpoint layout. Its own
``state_dict()`` is DeepSpeed's (``moe.deepspeed_moe...``, this rank's experts only), which DeepSpeed's
checkpoints and transformers' loading by parameter name expect; :func:`local_layout_state_dict` gives
the local backend's layout (``router.weight``, stacked ``experts.*``), gathering the experts over the
expert-parallel ranks, for ``save_pretrained(state_dict=...)``. Loading takes either layout (keeping
this rank's experts) and the original v2 names (``deepspeed_moe.gate.wg.weight``,
``deepspeed_moe.experts.deepspeed_experts.<local>.<proj>...``). ``torch.distributed`` must be
initialised (:func:`init_deepspeed_comm`, or ``deepspeed.init_distributed()``) on every rank before the layer is
built, since building creates the expert-parallel process groups.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .ep_dispatch import CountsMemo, expert_parallel_mix
from .experts import PROJECTIONS, MoEExperts
from .implementations import resolve_expert_implementation
from .router import balance_loss, in_backward, route_tokens
from .router_logits import float32_logits
from .stacked_experts import StackedExperts

BASE_NAMES = tuple(f"{p}_proj" for p in PROJECTIONS)
LORA_NAMES = tuple(f"{p}_lora_{ab}" for p in PROJECTIONS for ab in ("A", "B"))
GATE_KEY = "moe.deepspeed_moe.gate.wg.weight"
EXPERT_KEY = "moe.deepspeed_moe.experts.deepspeed_experts.{}.{}"
ORIGINAL_GATE_KEY = "deepspeed_moe.gate.wg.weight"
ORIGINAL_EXPERT_KEY = re.compile(
    r"deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.((?:gate|up|down)_proj(?:_lora_[AB])?)\.weight"
)
DEEPSPEED_JITTER = 1e-2  # the fixed epsilon of DeepSpeed's "Jitter" noisy gate policy
MIN_CAPACITY = 4  # DeepSpeed's default; unused without token dropping


class LoRAExpert(MoEExperts):
    """One LoRA-integrated SwiGLU expert (the original's LlamaMLPLoRA), for DeepSpeed to copy per local
    expert. Parameters keep MoEExperts' layout with a leading expert dimension of 1."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu", lora_r: int = 0,
                 lora_alpha: int = 16, lora_dropout: float = 0.0) -> None:
        super().__init__(1, hidden_size, intermediate_size, hidden_act, "mlp", lora_r, lora_alpha, lora_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expert_forward(0, x)


@functools.cache
def deepspeed_moe_class() -> type:
    """``deepspeed.moe.layer.MoE`` whose process groups may be set more than once: the layer sets them
    when built (so it runs without a DeepSpeed engine) and ``deepspeed.initialize`` sets them again."""
    from deepspeed.moe.layer import MoE

    class ReentrantMoE(MoE):
        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            done = getattr(self, "_groups_set_with", None)
            if done is None:
                super().set_deepspeed_parallelism(use_data_before_expert_parallel_)
                self._groups_set_with = use_data_before_expert_parallel_
            elif done != use_data_before_expert_parallel_:
                raise ValueError("the MoE layers were built with use_data_before_expert_parallel_="
                                 f"{done}; the DeepSpeed config asks for {use_data_before_expert_parallel_}")

    return ReentrantMoE


def skip_cpu_shared_memory_op() -> None:
    """Keep DeepSpeed's CPU accelerator from compiling its shared-memory all-reduce op when torch.distributed
    starts through DeepSpeed.

    That op (``deepspeed_shm_comm``) serves only DeepSpeed-Inference's tensor-parallel all-reduce, which
    nothing here calls (DeepSpeed-MoE exchanges tokens by all-to-all; gloo does the rest). DeepSpeed builds it
    with ninja under ``~/.cache/torch_extensions`` at the first start of every environment, a minute or more
    on a small CPU machine, and a start killed while building leaves the build's lock file behind, on which
    every later start waits without end. A no-op on GPU accelerators, which have no such op.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return
    builder = accelerator.create_op_builder("ShareMemCommBuilder")
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)  # what DeepSpeed checks before building
    if builder is not None and compatible is not None:
        compatible[builder.NAME] = False


def init_deepspeed_comm(dist_backend: str | None = None) -> None:
    """``deepspeed.init_distributed`` (torch.distributed, and deepspeed.comm, whose groups DeepSpeed-MoE
    creates), without the CPU op above; a no-op where both are already up."""
    import deepspeed

    skip_cpu_shared_memory_op()
    deepspeed.init_distributed(dist_backend=dist_backend)


def noisy_gate_policy(router_jitter: float) -> str | None:
    """DeepSpeed's gate noise for our ``router_jitter``: none, or its fixed 1e-2 multiplicative jitter."""
    if router_jitter == 0:
        return None
    if router_jitter == DEEPSPEED_JITTER:
        return "Jitter"
    raise ValueError(f"router_jitter={router_jitter}: the deepspeed backend supports only 0 or {DEEPSPEED_JITTER}")


class DeepSpeedMoELayer(nn.Module):
    """``deepspeed.moe.layer.MoE`` with LoRA-integrated experts. Input and output [B, S, H].

    Like MoELayer it keeps ``aux_loss`` (the GShard loss DeepSpeed calls l_aux) and ``routing`` ([B, S, k]
    chosen experts, detached) after each forward, and ``expert_rows``: the token-slots this rank's experts
    ran (its load). The 2nd expert is sampled only in training.
    ``implementation`` names the expert implementation that runs this rank's experts (as MoELayer's).
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        ep_size: int = 1,
        capacity_factor: float = 1.5,
        router_jitter: float = 0.0,
        second_expert_sampling: bool = False,
        expert_type: str = "mlp",
        implementation: str = "auto",
        **expert_options: Any,
    ) -> None:
        """``expert_options`` (hidden_act, lora_r, lora_alpha, lora_dropout) configure every LoRAExpert."""
        super().__init__()
        if expert_type != "mlp":
            raise ValueError(f"expert_type={expert_type!r}: the deepspeed backend gives every expert its own MLP")
        if not dist.is_initialized():
            raise RuntimeError("moe_backend='deepspeed' needs torch.distributed initialised before the model is "
                               "built (init_deepspeed_comm() or deepspeed.init_distributed())")
        if num_experts % ep_size:
            raise ValueError(f"num_experts={num_experts} is not divisible by ep_size={ep_size}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.second_expert_sampling = second_expert_sampling
        self.router_jitter = router_jitter
        self.implementation = implementation
        expert = LoRAExpert(hidden_size, intermediate_size, **expert_options)
        self.expert_names = BASE_NAMES + (LORA_NAMES if expert.has_lora else ())
        moe_cls = deepspeed_moe_class()
        init_deepspeed_comm()
        self.moe = moe_cls(hidden_size, expert=expert, num_experts=num_experts, ep_size=ep_size, k=top_k,
                           capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor,
                           min_capacity=MIN_CAPACITY, use_residual=False,
                           noisy_gate_policy=noisy_gate_policy(router_jitter), drop_tokens=False,
                           top2_2nd_expert_sampling=second_expert_sampling)
        self.moe.set_deepspeed_parallelism()
        self.ep_size = ep_size
        self.ep_group = self.moe.deepspeed_moe.ep_group
        self.ep_rank = dist.get_rank(group=self.ep_group) if ep_size > 1 else 0
        self.num_local_experts = num_experts // ep_size
        self.local_layout_on_save = False
        self.aux_loss: torch.Tensor | None = None
        self.routing: torch.Tensor | None = None
        self.expert_rows = 0  # token-slots this rank's experts ran in the last forward
        self._memo = CountsMemo()  # the last training forward's count exchange, for a checkpoint's recompute
        self._stacked = StackedExperts(self.local_experts())
        self.register_state_dict_post_hook(_save_local_layout)
        self.register_load_state_dict_pre_hook(_load_local_layout)

    @property
    def router(self) -> nn.Linear:
        """DeepSpeed's gate projection [E, H], the counterpart of MoELayer.router."""
        return self.moe.deepspeed_moe.gate.wg

    def local_experts(self) -> nn.ModuleList:
        """This rank's LoRAExperts, local index b being global expert ep_rank * num_local + b."""
        return self.moe.deepspeed_moe.experts.deepspeed_experts

    def local_expert(self, expert: int) -> LoRAExpert | None:
        """Global expert ``expert`` if this rank holds it (local b on EP rank r is r * num_local + b)."""
        b = expert - self.ep_rank * self.num_local_experts
        return self.local_experts()[b] if 0 <= b < self.num_local_experts else None

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """Router ~ N(0, std) and every local expert re-initialised (bases N(0, std), LoRA B zero)."""
        self.router.weight.normal_(0.0, std)
        for expert in self.local_experts():
            expert.reset_parameters(std)

    def load_dense_mlps(self, mlps: list[dict[str, torch.Tensor]]) -> None:
        """Expert bases from dense MLP state dicts, one per global expert; this rank loads its own."""
        if len(mlps) != self.num_experts:
            raise ValueError(f"expected {self.num_experts} MLP state dicts (one per expert), got {len(mlps)}")
        for e, sd in enumerate(mlps):
            expert = self.local_expert(e)
            if expert is not None:
                expert.load_dense_mlps([sd])

    def _apply(self, fn: Any, recurse: bool = True) -> DeepSpeedMoELayer:
        """A dtype or device move gives every parameter new storage: pack the experts' bases again."""
        super()._apply(fn, recurse)
        self._stacked.pack(self.local_experts())
        return self

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits [T, E] of DeepSpeed's gate weight; in training, its multiplicative input jitter."""
        if self.training and self.router_jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.router_jitter, 1.0 + self.router_jitter)
        return float32_logits(x, self.router.weight)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits = self.router_logits(x)
        weights, indices = route_tokens(
            logits, self.top_k, second_expert_sampling=self.second_expert_sampling and self.training
        )
        experts = self._stacked.view(self.local_experts(), self.training)
        implementation = resolve_expert_implementation(self.implementation, x.shape[0])
        memo = self._memo if self.training else None
        out, self.expert_rows = expert_parallel_mix(x, weights.to(x.dtype), indices, experts, implementation,
                                                    self.ep_size, self.ep_group, memo)
        aux_loss = balance_loss(logits, indices, self.num_experts)  # computed alike when recomputed
        if not in_backward():
            self.aux_loss, self.routing = aux_loss, indices.detach().view(*shape[:-1], self.top_k)
        return out.view(shape)

    def gather_experts(self, local: torch.Tensor) -> torch.Tensor:
        """[num_local, ...] from every EP rank -> [num_experts, ...] in global order (collective)."""
        if self.ep_size == 1:
            return local
        if local.is_meta:
            return local.new_empty((self.num_experts, *local.shape[1:]))
        parts = [torch.empty_like(local) for _ in range(self.ep_size)]
        dist.all_gather(parts, local.contiguous(), group=self.ep_group)
        return torch.cat(parts)


def _save_local_layout(layer: DeepSpeedMoELayer, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """When asked: rename the gate to ``router.weight`` and stack (and gather) the experts as ``experts.<name>``."""
    if not layer.local_layout_on_save:
        return
    state[prefix + "router.weight"] = state.pop(prefix + GATE_KEY)
    for name in layer.expert_names:
        local = torch.cat([state.pop(prefix + EXPERT_KEY.format(b, name)).detach()
                           for b in range(layer.num_local_experts)])
        state[prefix + "experts." + name] = layer.gather_experts(local)


def _load_local_layout(layer: DeepSpeedMoELayer, state: dict[str, Any], prefix: str, *args: Any) -> None:
    """Turn local-layout and original-v2 names into this layer's own, keeping this rank's experts.
    Names already in the layer's own form win over converted ones."""
    for key in (prefix + "router.weight", prefix + ORIGINAL_GATE_KEY):
        if key in state:
            state.setdefault(prefix + GATE_KEY, state.pop(key))
    first = layer.ep_rank * layer.num_local_experts
    for name in layer.expert_names:
        key = prefix + "experts." + name
        if key not in state:
            continue
        stacked = state.pop(key)
        if stacked.shape[0] != layer.num_experts:
            raise ValueError(f"{key}: shape {tuple(stacked.shape)} holds {stacked.shape[0]} experts; "
                             f"the layer has {layer.num_experts}")
        for b in range(layer.num_local_experts):
            state.setdefault(prefix + EXPERT_KEY.format(b, name), stacked[first + b : first + b + 1])
    for key in [k for k in state if k.startswith(prefix)]:
        match = ORIGINAL_EXPERT_KEY.fullmatch(key[len(prefix):])
        if match:
            name = match.group(2).replace("_proj_lora", "_lora")
            state.setdefault(prefix + EXPERT_KEY.format(match.group(1), name), state.pop(key).unsqueeze(0))


def local_layout_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every DeepSpeedMoELayer in the local backend's layout, its experts
    gathered over the expert-parallel ranks: what ``save_pretrained(state_dict=...)`` should write, for
    the local backend and :func:`Uni_MoE.checkpoint.v2_experts.from_pretrained_expert_parallel` to load.
    Under expert parallelism a collective: call it on every rank, then save on one."""
    layers = [m for m in model.modules() if isinstance(m, DeepSpeedMoELayer)]
    for layer in layers:
        layer.local_layout_on_save = True
    try:
        return model.state_dict()
    finally:
        for layer in layers:
            layer.local_layout_on_save = False
