"""Expert parallelism at real width: the DeepSpeed-MoE backend (ep_size 1 and 2) against the local backend.

    deepspeed --num_gpus 2 benchmarks/expert_parallel.py --out DIR    # local, ep_size 1, ep_size 2
    deepspeed --num_gpus 1 benchmarks/expert_parallel.py --out DIR    # local, ep_size 1
    python benchmarks/expert_parallel.py --smoke --out DIR            # tiny CPU run (gloo; or 2 ranks, torchrun)

Model: a LLaMA-7B-wide decoder (hidden 4096, intermediate 11008, 32 heads) of ``--layers`` layers, every MLP
a v2 MoE (8 LoRA-integrated experts, top-2, balance loss 0.01), random init, no encoders. Every rank builds
the same weights from one seed and each configuration loads them. Two passes, each over the configurations:

- exact (float32, TF32 off, shorter sequences, SGD): the backends compute the same function, so everything
  must agree to float32 rounding: greedy tokens (a differing token only at a float32 near-tie of the local
  model's logits, gap <= ``--exact_tie_tolerance``), the reduced gradients of the first step, the loss of
  every step and the held-out logits after training. This is where ``pass`` is decided for correctness.
- speed (bfloat16): the timed run. Here rounding differences flip near-tied routes in a random network, so
  only the loss curves are compared (relative ``loss_rtol``); logits, routing and greedy are reported.

Per configuration: 1. greedy generation of the same prompts on every rank (fixed length, so expert-parallel
ranks stay in step); 2. ``--train_steps`` AdamW steps on routers and expert LoRA, a different batch on every
rank, gradients reduced as data parallelism does (experts: summed over the ranks that fed them, / world
size), then the logits of a held-out batch; 3. (speed pass) ms per training step and tokens/s (all ranks),
decode tokens/s, and the peak memory of every device from after the model is built (generation and training);
with ``--memory`` (GPUs), one more step split into resident, saved-for-backward (attention, MoE, rest) and
peak memory, with its host synchronisations (``step_memory.py``). ``--checkpointing`` runs every
configuration with activation checkpointing of the decoder layers, as the training launchers do;
``--moe_recompute`` recomputes only the experts' gate/up projections in backward (``--moe_recompute``
of training).
``--native_deepspeed`` adds DeepSpeed-MoE's own layer forward at ep_size 1 to the speed pass, the baseline
our dispatch replaced. Each configuration freezes its objects out of the garbage collector before training,
as the trainer does, and reports the collector's pauses in the timed steps.

Writes DIR/expert_parallel.md and DIR/expert_parallel.json (after every configuration, so a failure
keeps what was measured). Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import statistics
import sys
import time
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from Uni_MoE.train.gc_freeze import freeze_host_objects

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import device_name  # noqa: E402
from step_memory import StepMemory, measure_step  # noqa: E402

TRAINABLE = re.compile(r"(router\.weight|gate\.wg\.weight|_lora_[AB])$")
DS_EXPERT = re.compile(r"(.*)\.moe\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(\w+)$")
DS_GATE = ".moe.deepspeed_moe.gate.wg.weight"
STACKED_EXPERT = re.compile(r".*\.experts\.\w+$")
NATIVE = "deepspeed-native"  # DeepSpeed-MoE's own layer forward (--native_deepspeed)


@dataclass
class Shape:
    """Model width, batch and run lengths of one benchmark size."""

    hidden: int
    intermediate: int
    heads: int
    vocab: int
    batch: int
    seq: int
    prompt: int
    new_tokens: int
    dtype: str
    loss_rtol: float
    logits_rtol: float | None  # None: loss curves only (bf16, where near-tied routes flip)


SPEED = Shape(4096, 11008, 32, 32004, 4, 1024, 32, 32, "bfloat16", 2e-2, None)
EXACT = Shape(4096, 11008, 32, 32004, 4, 512, 32, 16, "float32", 1e-5, 1e-4)
SMOKE_SPEED = Shape(64, 128, 4, 256, 2, 16, 6, 4, "float32", 1e-4, None)
SMOKE_EXACT = Shape(64, 128, 4, 256, 2, 16, 6, 4, "float32", 1e-5, 1e-5)


@dataclass
class Result:
    """What one configuration measured and how it compared with the local backend."""

    name: str
    mode: str
    backend: str
    ep_size: int
    experts_per_device: int
    losses: list[float] = field(default_factory=list)
    loss_max_rel_diff: float | None = None
    grad_rel_err: float | None = None
    logits_rel_err: float | None = None
    routing_agreement: float | None = None
    greedy_equal: bool | None = None
    greedy_note: str = ""
    step_ms: float = 0.0  # mean over the timed steps (the throughput)
    step_ms_each: list[float] = field(default_factory=list)  # each timed step, rank 0
    gc_ms: float = 0.0  # the host's garbage-collection pauses over the timed steps, rank 0
    gc_runs: list[int] = field(default_factory=list)  # collections of generations 0, 1, 2 in the timed steps
    train_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    weights_gb: list[float] = field(default_factory=list)
    peak_gb: list[float] = field(default_factory=list)
    timed_peak_gb: list[float] = field(default_factory=list)  # the timed steps only: warm-up's autotuning excluded
    build_peak_gb: list[float] = field(default_factory=list)
    expert_rows: list[int] = field(default_factory=list)
    memory: list[StepMemory] = field(default_factory=list)  # one per rank, with --memory
    passed: bool = True


def log(msg: str) -> None:
    """Rank-0 progress line, flushed at once."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for expert_parallel.md and expert_parallel.json")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, gloo (for tests)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers, all MoE (default 4; smoke 2)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top_k", type=int, default=2)
    p.add_argument("--lora_r", type=int, default=8)
    p.add_argument("--train_steps", type=int, default=3, help="compared optimizer steps")
    p.add_argument("--timed_steps", type=int, default=5, help="timed training steps (after 2 warm-up steps)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (speed pass)")
    p.add_argument("--exact_lr", type=float, default=0.1,
                   help="SGD learning rate of the exact pass (AdamW's sign-like first step would turn the "
                   "rounding of near-zero gradients into lr-sized differences)")
    p.add_argument("--tie_tolerance", type=float, default=0.25,
                   help="speed pass: largest local-model logit gap at which a differing greedy token is a near-tie")
    p.add_argument("--exact_tie_tolerance", type=float, default=1e-4,
                   help="exact pass: the same, in float32")
    p.add_argument("--profile", action="store_true",
                   help="also profile one timed step per configuration: DIR/profile_<config>_rank<r>.txt and .json.gz")
    p.add_argument("--memory", action="store_true",
                   help="speed pass on GPUs: one more step's memory breakdown and host synchronisations")
    p.add_argument("--checkpointing", action="store_true",
                   help="activation checkpointing of every decoder layer (non-reentrant), in every configuration")
    p.add_argument("--moe_recompute", action="store_true",
                   help="experts keep no gate/up activations and recompute them in backward "
                        "(moe_recompute_enable), in every configuration but DeepSpeed-MoE's own layer")
    p.add_argument("--native_deepspeed", action="store_true",
                   help="in the speed pass, also time DeepSpeed-MoE's own layer forward at ep_size 1 (its "
                        "one-hot einsum dispatch and experts one by one): the baseline our dispatch replaced")
    p.add_argument("--skip_exact", action="store_true", help="run only the timed bf16 pass")
    p.add_argument("--skip_speed", action="store_true", help="run only the float32 comparison")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args = p.parse_args(argv)
    args.layers = args.layers or (2 if args.smoke else 4)
    return args


def init_world(smoke: bool) -> tuple[int, int, torch.device]:
    """Join (or, run as a plain script, create) the process group; returns rank, world size, device."""
    import torch.distributed as dist

    from Uni_MoE.eval.distributed import free_port
    from Uni_MoE.model.moe.deepspeed_backend import init_deepspeed_comm

    if "RANK" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")

    use_cuda = torch.cuda.is_available() and not smoke
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    init_deepspeed_comm(dist_backend="nccl" if use_cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def make_config(shape: Shape, args: argparse.Namespace, backend: str, ep_size: int):
    """A text-only v2-style config: every layer MoE with LoRA-integrated experts, deterministic routing."""
    from Uni_MoE.config import UniMoEConfig

    v = shape.vocab
    text = dict(model_type="llama", vocab_size=v, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                num_hidden_layers=args.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
                max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                tie_word_embeddings=False)
    return UniMoEConfig(
        text_config=text, num_experts=args.experts, num_experts_per_tok=args.top_k, moe_layers="all",
        expert_lora_r=args.lora_r, expert_lora_alpha=2 * args.lora_r, aux_balance_loss_coef=0.01,
        moe_backend=backend, ep_size=ep_size, capacity_factor=1.5, image_token_index=v - 4,
        video_token_index=v - 3, audio_token_index=v - 2, speech_token_index=v - 1,
    )


def reference_state(shape: Shape, args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    """Seeded local-backend weights (LoRA B non-zero so every LoRA path counts), kept on the CPU."""
    from Uni_MoE.model.uni_moe import UniMoEForCausalLM

    torch.manual_seed(args.seed)
    with torch.device(device):
        model = UniMoEForCausalLM(make_config(shape, args, "local", 1))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if re.search(r"_lora_B$", name):
                p.normal_(0.0, 0.02)
    model.to(getattr(torch, shape.dtype))
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    del model
    return state


def build(shape: Shape, args: argparse.Namespace, backend: str, ep_size: int, state: dict, device: torch.device):
    """The configuration's model on ``device`` with ``state`` loaded strictly (DeepSpeed layers keep their
    experts), routers and expert LoRA trainable, everything else frozen. ``deepspeed-native``: the DeepSpeed
    backend's model with DeepSpeed-MoE's own layer forward (:func:`native_moe_forward`)."""
    from Uni_MoE.model.uni_moe import UniMoEForCausalLM

    native = backend == NATIVE
    with torch.device(device):
        model = UniMoEForCausalLM(make_config(shape, args, "deepspeed" if native else backend, ep_size))
    model.to(getattr(torch, shape.dtype))
    model.load_state_dict(state, strict=True)
    for name, p in model.named_parameters():
        p.requires_grad_(bool(TRAINABLE.search(name)))
    if native:
        for layer in model.moe_mlps():
            layer.forward = types.MethodType(native_moe_forward, layer)
    if args.checkpointing:
        enable_checkpointing(model)
    if args.moe_recompute and not native:
        model.moe_recompute_enable()
    return model


def native_moe_forward(layer, hidden_states: torch.Tensor) -> torch.Tensor:
    """DeepSpeed-MoE's own forward of a DeepSpeedMoELayer, the baseline our dispatch replaced: its top-k gate
    (float32, capacity from the largest expert load since ``drop_tokens=False``), one-hot einsum dispatch
    into [experts, capacity, H] buffers, all-to-all of the whole buffers, the local experts one by one and
    the einsum combine. Keeps the layer's ``aux_loss`` (DeepSpeed's l_aux) and its top-k ``routing``."""
    from Uni_MoE.model.moe.router import in_backward

    out, l_aux, _ = layer.moe(hidden_states)
    if not in_backward():
        layer.aux_loss = l_aux
        with torch.no_grad():
            logits = layer.router_logits(hidden_states.reshape(-1, hidden_states.shape[-1]))
            layer.routing = logits.topk(layer.top_k, dim=-1).indices.view(*hidden_states.shape[:-1], layer.top_k)
    return out


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing of the decoder layers, as the training launchers ask for it
    (``activation_checkpointing_enable``, or its older name in transformers releases without it)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def tokens(shape: Shape, rows: int, length: int, seed: int, device: torch.device) -> torch.Tensor:
    """Random ids outside the special and placeholder tokens, reproducible by seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, shape.vocab - 4, (rows, length), generator=g).to(device)


def reduce_gradients(model: torch.nn.Module, world: int) -> None:
    """Data-parallel mean of every gradient. An expert's gradient already holds every token its EP group
    sent it, so it is summed only over its expert-data-parallel group; all are then divided by ``world``.
    One flat all-reduce per group and dtype, as DeepSpeed's bucketed reduction does (one call per
    parameter would make the per-expert parameters of ep_size 1 launch-bound)."""
    import torch.distributed as dist
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.utils import groups

    buckets: dict[tuple[Any, torch.dtype], list[torch.Tensor]] = {}
    for p in model.parameters():
        if p.grad is not None:
            group = groups._get_expert_data_parallel_group(p.group_name) if is_moe_param(p) else None
            buckets.setdefault((group, p.grad.dtype), []).append(p.grad)
    for (group, _), grads in buckets.items():
        if dist.get_world_size(group) > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=group)
            parts = flat.split([g.numel() for g in grads])
            torch._foreach_copy_(grads, [part.view_as(g) for g, part in zip(grads, parts)])
        torch._foreach_div_(grads, world)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_mark(device: torch.device) -> torch.cuda.Event | float:
    """A point between two training steps: a recorded CUDA event, or the host clock on the CPU."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def mark_ms(start: torch.cuda.Event | float, end: torch.cuda.Event | float) -> float:
    """ms between two ``step_mark``s (after a sync)."""
    return start.elapsed_time(end) if isinstance(start, torch.cuda.Event) else 1e3 * (end - start)


def gradients(model: torch.nn.Module) -> dict[tuple[str, int], torch.Tensor]:
    """This rank's gradients on the CPU, keyed as the local backend names them: (name, expert), expert -1
    for a parameter that is not per expert."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        grad = p.grad.detach().float().cpu()
        if (match := DS_EXPERT.fullmatch(name)) is not None:
            layer = model.get_submodule(match.group(1))
            out[(f"{match.group(1)}.experts.{match.group(3)}", layer.ep_rank * layer.num_local_experts
                 + int(match.group(2)))] = grad[0]
        elif name.endswith(DS_GATE):
            out[(name[: -len(DS_GATE)] + ".router.weight", -1)] = grad
        elif STACKED_EXPERT.fullmatch(name):
            out.update({(name, e): grad[e] for e in range(grad.shape[0])})
        else:
            out[(name, -1)] = grad
    return out


def gradient_rel_err(grads: dict, reference: dict, device: torch.device) -> float:
    """||grads - reference|| / ||reference|| over every rank's gradients (collective; the sums travel on
    ``device``, as NCCL reduces only GPU tensors)."""
    import torch.distributed as dist

    sums = torch.zeros(2, dtype=torch.float64)
    for key, grad in grads.items():
        sums[0] += (grad - reference[key]).double().square().sum()
        sums[1] += reference[key].double().square().sum()
    sums = sums.to(device)
    dist.all_reduce(sums)
    return float((sums[0] / sums[1]).sqrt())


def train_step(model, optimizer, batch: torch.Tensor, world: int, grads: dict | None = None) -> torch.Tensor:
    """One step on this rank's batch; returns the loss averaged over ranks (detached). ``grads`` receives
    the reduced gradients (:func:`gradients`) when given."""
    import torch.distributed as dist

    optimizer.zero_grad(set_to_none=True)
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    reduce_gradients(model, world)
    if grads is not None:
        grads.update(gradients(model))
    optimizer.step()
    mean = loss.detach().float().clone()
    dist.all_reduce(mean)
    return mean / world


def greedy(model, prompts: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Fixed-length greedy decode: (new token ids [B, n], per-step logits [B, n, V] on CPU, seconds)."""
    sync(prompts.device)
    start = time.perf_counter()
    out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True)
    sync(prompts.device)
    seconds = time.perf_counter() - start
    scores = torch.stack([s.float().cpu() for s in out.scores], dim=1)
    return out.sequences[:, prompts.shape[1]:].cpu(), scores, seconds


def compare_greedy(ids: torch.Tensor, ref_ids: torch.Tensor, ref_scores: torch.Tensor, tol: float) -> tuple[bool, str]:
    """Equal, or the first difference of each row is a near-tie of the reference's own logits."""
    notes = []
    for row in range(ids.shape[0]):
        differ = (ids[row] != ref_ids[row]).nonzero()
        if len(differ) == 0:
            continue
        step = int(differ[0])
        logits = ref_scores[row, step]
        gap = float(logits[ref_ids[row, step]] - logits[ids[row, step]])
        if gap > tol:
            return False, f"row {row} differs at token {step}: local logit gap {gap:.3f} > {tol}"
        notes.append(f"row {row}: near-tie at token {step} (gap {gap:.3f})")
    return True, "; ".join(notes) or "identical"


def memory_gb(device: torch.device, peak: bool) -> float:
    if device.type != "cuda":
        return float("nan")
    return (torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)) / 2**30


def all_ranks(value: float) -> list[float]:
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def run_config(name: str, mode: str, backend: str, ep_size: int, shape: Shape, args: argparse.Namespace,
               state: dict, device: torch.device, rank: int, world: int, reference: dict | None) -> tuple[Result, dict]:
    """Build, generate, train (and in the speed pass time) one configuration; ``reference`` holds the local
    run's outputs of the same pass."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    log(f"[{mode}] {name}: building ({args.layers} layers, {args.experts} experts, ep_size {ep_size}, {shape.dtype})")
    model = build(shape, args, backend, ep_size, state, device)
    res = Result(name, mode, backend, ep_size, args.experts // ep_size, weights_gb=all_ranks(memory_gb(device, False)))
    res.build_peak_gb = all_ranks(memory_gb(device, True))
    if device.type == "cuda":  # peak of generation and training, not of building in float32 before the cast
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)

    model.eval()
    prompts = tokens(shape, shape.batch, shape.prompt, args.seed + 1, device)
    log(f"[{mode}] {name}: greedy generation, {shape.batch} x {shape.new_tokens} tokens")
    greedy(model, prompts, 2)  # warm-up
    ids, scores, seconds = greedy(model, prompts, shape.new_tokens)
    res.decode_tokens_per_s = world * ids.numel() / seconds
    outputs = {"ids": ids, "scores": scores}
    tie = args.exact_tie_tolerance if mode == "exact" else args.tie_tolerance
    if reference is not None:
        res.greedy_equal, res.greedy_note = compare_greedy(ids, reference["ids"], reference["scores"], tie)

    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if mode == "exact":
        optimizer = torch.optim.SGD(trainable, lr=args.exact_lr)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    freeze_host_objects()  # as the trainer does when training begins (Uni_MoE/train/gc_freeze.py)
    grads: dict = {}
    for step in range(args.train_steps):
        batch = tokens(shape, shape.batch, shape.seq, args.seed + 1000 * (rank + 1) + step, device)
        res.losses.append(float(train_step(model, optimizer, batch, world, grads if step == 0 else None)))
        log(f"[{mode}] {name}: step {step + 1}/{args.train_steps} loss {res.losses[-1]:.6f}")
    model.eval()
    with torch.no_grad():
        held_out = tokens(shape, shape.batch, shape.seq, args.seed + 2, device)
        logits = model(input_ids=held_out).logits.float().cpu()
    routing = torch.stack([r.cpu() for r in model.collect_routing()])
    outputs.update(logits=logits, routing=routing, grads=grads)
    if reference is not None:
        res.grad_rel_err = gradient_rel_err(grads, reference["grads"], device)
        res.loss_max_rel_diff = max(abs(a - b) / abs(b) for a, b in zip(res.losses, reference["losses"]))
        res.logits_rel_err = float((logits - reference["logits"]).norm() / reference["logits"].norm())
        res.routing_agreement = float((routing.sort(-1).values == reference["routing"].sort(-1).values).float().mean())
        res.passed = res.loss_max_rel_diff <= shape.loss_rtol
        if shape.logits_rtol is not None:
            res.passed = bool(res.passed and res.greedy_equal and res.logits_rel_err <= shape.logits_rtol
                              and res.grad_rel_err <= shape.logits_rtol)
    outputs["losses"] = res.losses

    earlier_peak = 0.0
    if mode == "speed":
        earlier_peak = time_training(model, optimizer, shape, args, res, device, rank, world)
    res.peak_gb = all_ranks(max(memory_gb(device, True), earlier_peak))
    if mode == "speed" and args.memory and device.type == "cuda":  # after the peak: it resets the peak stats
        res.memory = memory_step(model, optimizer, tokens(shape, shape.batch, shape.seq, args.seed + 3 + rank, device))
    log(f"[{mode}] {name}: {res.step_ms:.1f} ms/step (each: {spread(res.step_ms_each)}; garbage collection "
        f"{res.gc_ms:.1f} ms in {res.gc_runs} runs), {res.train_tokens_per_s:.0f} tokens/s, passed={res.passed}")
    del model, optimizer, trainable
    gc.unfreeze()
    gc.collect()
    return res, outputs


class GcPauses:
    """The garbage collector's pauses while in use (``gc.callbacks``): a host pause between two host syncs is
    wall time in a step whose GPU waits on the host."""

    def __init__(self) -> None:
        self.ms, self.runs, self._start = 0.0, [0, 0, 0], 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.ms += 1e3 * (time.perf_counter() - self._start)
            self.runs[info["generation"]] += 1

    def __enter__(self) -> "GcPauses":
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)


def time_training(model, optimizer, shape: Shape, args: argparse.Namespace, res: Result, device: torch.device,
                  rank: int, world: int) -> float:
    """ms per step and tokens/s (all ranks) over ``--timed_steps`` steps after two warm-up steps, and each step's
    time: CUDA events between the steps (no sync between them), so a slow step shows apart from a slow run; the
    peak memory of the timed steps. Returns the peak before them (GiB, this rank)."""
    model.train()
    log(f"{res.name}: timing {args.timed_steps} training steps of {shape.batch} x {shape.seq} tokens per rank")
    batch = tokens(shape, shape.batch, shape.seq, args.seed + 3 + rank, device)
    for _ in range(2):
        train_step(model, optimizer, batch, world)
    sync(device)
    earlier_peak = memory_gb(device, True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    marks = [step_mark(device)]
    with GcPauses() as pauses:
        for _ in range(args.timed_steps):
            train_step(model, optimizer, batch, world)
            marks.append(step_mark(device))
        sync(device)
    res.gc_ms, res.gc_runs = pauses.ms, pauses.runs
    res.timed_peak_gb = all_ranks(memory_gb(device, True))
    res.step_ms_each = [mark_ms(a, b) for a, b in zip(marks, marks[1:])]
    res.step_ms = mark_ms(marks[0], marks[-1]) / args.timed_steps
    res.train_tokens_per_s = world * batch.numel() / (res.step_ms / 1e3)
    if args.profile:
        name = res.name.replace(" ", "_")
        profile_step(model, optimizer, batch, world, Path(args.out) / f"profile_{name}_rank{rank}.txt")
    res.expert_rows = all_ranks(sum(getattr(layer, "expert_rows", 0) for layer in model.moe_mlps()))
    return earlier_peak


def memory_step(model, optimizer, batch: torch.Tensor) -> list[StepMemory]:
    """Every rank's :func:`measure_step` of one training step on ``batch``, split into attention and MoE."""
    kinds = {"attention": [m for n, m in model.named_modules() if n.endswith("self_attn")],
             "moe": list(model.moe_mlps())}
    model.train()
    optimizer.zero_grad(set_to_none=True)
    memory = measure_step(lambda: model(input_ids=batch, labels=batch).loss, kinds, batch.device)
    optimizer.zero_grad(set_to_none=True)
    return all_ranks(memory)


def profile_step(model, optimizer, batch: torch.Tensor, world: int, path: Path) -> None:
    """One training step under torch.profiler: its busiest operators by device time and by self CPU time,
    as tables in ``path`` (on a GPU with its idle gaps by the host operation that ended them), and its
    timeline as a gzipped Chrome trace beside it."""
    from torch.profiler import ProfilerActivity, profile

    from Uni_MoE.train.gpu_gaps import gap_table
    from Uni_MoE.train.profiling import operator_tables

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if batch.is_cuda else [])
    with profile(activities=activities) as prof:
        train_step(model, optimizer, batch, world)
        sync(batch.device)
    path.parent.mkdir(parents=True, exist_ok=True)
    trace = path.with_suffix(".json.gz")
    prof.export_chrome_trace(str(trace))  # torch gzips by the suffix
    gaps = f"\n\n{gap_table(trace, rows=30)}" if batch.is_cuda else ""
    path.write_text(operator_tables(prof, 30) + gaps)


def environment(shapes: dict[str, Shape], args: argparse.Namespace, world: int, device: torch.device) -> dict[str, Any]:
    import deepspeed
    import transformers

    return dict(date=f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}", device=device_name(device),
                world_size=world, torch=torch.__version__, deepspeed=deepspeed.__version__,
                transformers=transformers.__version__, layers=args.layers, experts=args.experts, top_k=args.top_k,
                lora_r=args.lora_r, shapes={mode: asdict(s) for mode, s in shapes.items()},
                train_steps=args.train_steps, timed_steps=args.timed_steps, tie_tolerance=args.tie_tolerance,
                exact_tie_tolerance=args.exact_tie_tolerance, exact_lr=args.exact_lr, checkpointing=args.checkpointing,
                moe_recompute=args.moe_recompute, command=" ".join(sys.argv))


def num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def gb(xs: list[float], digits: int = 1) -> str:
    return " / ".join(f"{x:.{digits}f}" for x in xs)


def markdown(env: dict[str, Any], results: list[Result]) -> str:
    lines = [
        "# Expert parallelism: DeepSpeed-MoE backend vs local backend",
        "",
        f"{env['date']}; {env['world_size']} x {env['device']}; torch {env['torch']}, deepspeed "
        f"{env['deepspeed']}, transformers {env['transformers']}. Command: `{env['command']}`.",
        f"Model: {env['layers']} layers (all MoE), {env['experts']} experts top-{env['top_k']}, expert LoRA "
        f"r {env['lora_r']}, random init. Activation checkpointing of the decoder layers: "
        f"{'on (non-reentrant), in every configuration' if env['checkpointing'] else 'off'}. Expert gate/up "
        f"recomputed in backward: {'on, in every configuration but DeepSpeed-MoE' if env['moe_recompute'] else 'off'}.",
    ]
    exact = [r for r in results if r.mode == "exact"]
    if exact:
        s = env["shapes"]["exact"]
        lines += [
            "", f"## Exact comparison ({s['dtype']}, TF32 off)", "",
            f"Hidden {s['hidden']}, intermediate {s['intermediate']}; training {s['batch']} x {s['seq']} tokens per "
            f"rank and step; greedy: {s['batch']} prompts of {s['prompt']} tokens, {s['new_tokens']} new tokens. "
            f"SGD (lr {env['exact_lr']:g}). Pass: loss rel diff <= {s['loss_rtol']:g}; first-step gradients "
            f"(all ranks, reduced) and held-out logits after training, rel err <= {s['logits_rtol']:g}; greedy "
            f"equal (or a near-tie of gap <= {env['exact_tie_tolerance']:g}).", "",
            "| config | ep_size | experts/GPU | max loss rel diff | grad rel err | logits rel err | routing agree | "
            "greedy | pass |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in exact:
            lines.append(f"| {r.name} | {r.ep_size} | {r.experts_per_device} | {num(r.loss_max_rel_diff, '.2e')} | "
                         f"{num(r.grad_rel_err, '.2e')} | {num(r.logits_rel_err, '.2e')} | "
                         f"{num(r.routing_agreement, '.4f')} | "
                         f"{'-' if r.greedy_equal is None else r.greedy_note} | {'yes' if r.passed else 'NO'} |")
    speed = [r for r in results if r.mode == "speed"]
    if speed:
        s = env["shapes"]["speed"]
        lines += [
            "", f"## Speed ({s['dtype']})", "",
            f"Hidden {s['hidden']}, intermediate {s['intermediate']}; training {s['batch']} x {s['seq']} tokens per "
            f"rank and step; decode: {s['batch']} prompts of {s['prompt']} tokens, {s['new_tokens']} new tokens "
            f"(prefill included), tokens/s summed over ranks. Pass: every step's loss within {s['loss_rtol']:g} "
            "(relative) of the local run's; logits, routing and greedy tokens are shown, not judged (rounding flips "
            f"near-tied routes; greedy near-tie gap {env['tie_tolerance']:g}). Peak GB/GPU: generation and training, "
            "from after building; timed peak: the timed steps only (no generation, no first-step autotuning); "
            "build peak: from before building (the float32 construction, cast to bf16 after). "
            "Expert rows/GPU: token-slots each rank's experts ran in the last timed step (all layers). ms/step: the "
            "mean over the timed steps; each step: median (min-max) of the steps, timed by CUDA events on rank 0; GC: "
            "rank 0's garbage-collection pauses over the timed steps (collections of generations 0/1/2).", "",
            "| config | ep_size | experts/GPU | ms/step | each step ms | GC ms (runs) | train tokens/s | "
            "decode tokens/s | weights GB/GPU | peak GB/GPU | timed peak GB/GPU | build peak GB/GPU | "
            "expert rows/GPU | max loss rel diff | grad rel err | logits rel err | routing agree | greedy | pass |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in speed:
            rows = " / ".join(str(n) for n in r.expert_rows) if r.backend == "deepspeed" else "-"
            lines.append(
                f"| {r.name} | {r.ep_size} | {r.experts_per_device} | {r.step_ms:.1f} | {spread(r.step_ms_each)} | "
                f"{r.gc_ms:.1f} ({'/'.join(map(str, r.gc_runs))}) | {r.train_tokens_per_s:.0f} | "
                f"{r.decode_tokens_per_s:.1f} | {gb(r.weights_gb)} | {gb(r.peak_gb)} | {gb(r.timed_peak_gb)} | "
                f"{gb(r.build_peak_gb)} | "
                f"{rows} | "
                f"{num(r.loss_max_rel_diff, '.2e')} | {num(r.grad_rel_err, '.2e')} | {num(r.logits_rel_err, '.2e')} | "
                f"{num(r.routing_agreement, '.4f')} | {'-' if r.greedy_equal is None else r.greedy_note} | "
                f"{'yes' if r.passed else 'NO'} |")
        lines += [""] + speedups(speed) + memory_table(speed)
    lines += ["", "Per-rank memory columns list ranks in order."]
    return "\n".join(lines) + "\n"


def spread(values: list[float]) -> str:
    """"median (min-max)" of per-step times, or "-" without any."""
    if not values:
        return "-"
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def memory_table(results: list[Result]) -> list[str]:
    """The ``--memory`` step of each configuration, GiB per rank (ranks in order)."""
    rows = [r for r in results if r.memory]
    if not rows:
        return []
    lines = ["", "Memory of one training step (`--memory`), GiB per rank: resident before the forward; saved = "
             "allocated after the forward above resident (what the backward keeps), and the part of it left "
             "behind by the attention and MoE modules' forwards; forward / backward peak above resident; host "
             "syncs = synchronising CUDA calls in forward and backward.", "",
             "| config | resident | saved | saved: attention | saved: MoE | saved: rest | forward peak | "
             "backward peak | host syncs |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def col(get) -> str:
            return gb([get(m) for m in r.memory], 2)
        rest = col(lambda m: m.saved_gb - sum(m.saved_by_kind_gb.values()))
        lines.append(f"| {r.name} | {col(lambda m: m.resident_gb)} | {col(lambda m: m.saved_gb)} | "
                     f"{col(lambda m: m.saved_by_kind_gb['attention'])} | {col(lambda m: m.saved_by_kind_gb['moe'])} | "
                     f"{rest} | {col(lambda m: m.forward_peak_gb)} | {col(lambda m: m.backward_peak_gb)} | "
                     f"{' / '.join(str(m.host_syncs) for m in r.memory)} |")
    return lines


def speedups(results: list[Result]) -> list[str]:
    """One line per expert-parallel configuration: its throughput and peak memory against ep_size 1 and local."""
    by_name = {(r.backend, r.ep_size): r for r in results}
    lines = []
    for r in results:
        if r.backend != "deepspeed" or r.ep_size == 1:
            continue
        for base_key in (("deepspeed", 1), ("local", 1), (NATIVE, 1)):
            base = by_name.get(base_key)
            if base is None:
                continue
            memory = [max(mine) / max(theirs) for mine, theirs in ((r.peak_gb, base.peak_gb),
                                                                   (r.timed_peak_gb, base.timed_peak_gb))
                      if mine and theirs and all(x == x for x in mine + theirs)]
            lines.append(f"{r.name} / {base.name}: training {r.train_tokens_per_s / base.train_tokens_per_s:.2f}x "
                         f"tokens/s, decode {r.decode_tokens_per_s / base.decode_tokens_per_s:.2f}x tokens/s"
                         + (f", peak memory {memory[0]:.2f}x" if memory else "")
                         + (f" (timed steps {memory[1]:.2f}x)" if len(memory) > 1 else "")
                         + (" (largest rank)." if memory else "."))
    return lines


def write(out: Path, env: dict[str, Any], results: list[Result]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "expert_parallel.json").write_text(json.dumps({**env, "results": [asdict(r) for r in results]}, indent=2))
    (out / "expert_parallel.md").write_text(markdown(env, results))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    rank, world, device = init_world(args.smoke)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 means float32
    shapes = {"exact": SMOKE_EXACT if args.smoke else EXACT, "speed": SMOKE_SPEED if args.smoke else SPEED}
    shapes = {mode: s for mode, s in shapes.items() if not getattr(args, f"skip_{mode}")}
    if args.experts % world:
        raise ValueError(f"--experts {args.experts} is not divisible by the world size {world}")
    env = environment(shapes, args, world, device)
    configs = [("local", "local", 1), ("deepspeed ep1", "deepspeed", 1)]
    if world > 1:
        configs.append((f"deepspeed ep{world}", "deepspeed", world))
    results: list[Result] = []
    for mode, shape in shapes.items():
        log(f"[{mode}] {world} rank(s) on {env['device']}; building the reference weights ({shape.dtype})")
        state = reference_state(shape, args, device)
        reference = None
        native = [("deepspeed-moe native ep1", NATIVE, 1)] if mode == "speed" and args.native_deepspeed else []
        for name, backend, ep_size in configs + native:
            result, outputs = run_config(name, mode, backend, ep_size, shape, args, state, device, rank, world,
                                         reference)
            reference = reference or outputs
            results.append(result)
            if rank == 0:
                write(Path(args.out), env, results)
        del state
        gc.collect()
    if rank == 0:
        print(markdown(env, results), flush=True)
    failed = [f"{r.mode} {r.name}" for r in results if not r.passed]
    if failed:
        log(f"FAILED checks: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
