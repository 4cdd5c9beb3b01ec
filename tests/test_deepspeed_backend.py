"""The DeepSpeed-MoE backend against the local one: same outputs, gradients, aux loss and routing on the
same weights; checkpoints that move between the backends (and the original v2 names); expert parallelism
over two CPU processes (gloo). Run as a script, this file is the two-process worker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import torchrun

from Uni_MoE.eval.distributed import free_port
from Uni_MoE.model.moe import MoELayer
from Uni_MoE.model.moe.deepspeed_backend import init_deepspeed_comm
from Uni_MoE.model.uni_moe import UniMoEForCausalLM

deepspeed = pytest.importorskip("deepspeed") if __name__ != "__main__" else __import__("deepspeed")

LORA_NAMES = ("gate_lora_A", "gate_lora_B", "up_lora_A", "up_lora_B", "down_lora_A", "down_lora_B")
LAYER = dict(hidden_size=16, intermediate_size=32, num_experts=4, top_k=2, lora_r=4, lora_alpha=8)


@pytest.fixture(scope="module")
def dist_world():
    """A one-process gloo world for DeepSpeed, torn down after this module so other tests see none."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    init_deepspeed_comm(dist_backend="gloo")
    yield
    groups._get_expert_parallel_group_dict().clear()
    groups._get_expert_data_parallel_group_dict().clear()
    dist.destroy_process_group()
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _local_layer() -> MoELayer:
    layer = MoELayer(**LAYER, implementation="reference")
    for p in layer.experts.lora_parameters():  # non-zero LoRA so its path is exercised
        torch.nn.init.normal_(p, std=0.1)
    return layer


def _ds_layer(**overrides):
    from Uni_MoE.model.moe.deepspeed_backend import DeepSpeedMoELayer

    return DeepSpeedMoELayer(**{**LAYER, **overrides})


def _run(layer, x):
    x = x.clone().requires_grad_()
    out = layer(x)
    (out.square().sum() + layer.aux_loss).backward()
    return out, x.grad


def test_deepspeed_layer_matches_local_outputs_and_gradients(dist_world):
    local, ds = _local_layer(), _ds_layer()
    assert str(ds.load_state_dict(local.state_dict(), strict=True)) == "<All keys matched successfully>"
    x = torch.randn(2, 9, 16)
    out_l, gx_l = _run(local, x)
    out_d, gx_d = _run(ds, x)
    torch.testing.assert_close(out_d, out_l)
    torch.testing.assert_close(gx_d, gx_l)
    torch.testing.assert_close(ds.aux_loss, local.aux_loss)
    assert torch.equal(ds.routing, local.routing) and ds.routing.shape == (2, 9, 2)
    torch.testing.assert_close(ds.router.weight.grad, local.router.weight.grad)
    for b, expert in enumerate(ds.local_experts()):
        for name in LORA_NAMES:
            torch.testing.assert_close(getattr(expert, name).grad[0], getattr(local.experts, name).grad[b])


def test_local_experts_run_packed_in_one_implementation_call(dist_world, monkeypatch):
    """The frozen expert bases become slices of one tensor per projection (again after a dtype move), and the
    expert implementation sees all local experts stacked, once per forward."""
    from Uni_MoE.model.moe import EXPERT_IMPLEMENTATIONS
    from Uni_MoE.model.moe.reference import experts_reference

    calls = []

    def spy(x, weights, indices, experts):
        calls.append((x.shape[0], experts.num_experts, experts.gate_proj.shape))
        return experts_reference(x, weights, indices, experts)

    monkeypatch.setitem(EXPERT_IMPLEMENTATIONS, "spy_for_tests", spy)
    local, ds = _local_layer(), _ds_layer(implementation="spy_for_tests")
    ds.load_state_dict(local.state_dict(), strict=True)
    for p in ds.parameters():
        p.requires_grad_(p.shape[-1] == 4 or p.shape[-2] == 4)  # LoRA (r = 4) trains, bases are frozen
    x = torch.randn(2, 9, 16)
    torch.testing.assert_close(ds(x), local(x))
    assert calls == [(18, 4, (4, 32, 16))]
    for name in ("gate_proj", "up_proj", "down_proj"):
        params = [getattr(e, name) for e in ds.local_experts()]
        assert len({p.untyped_storage().data_ptr() for p in params}) == 1
        assert [p.storage_offset() for p in params] == [b * params[0].numel() for b in range(4)]
    ds.to(torch.float64)
    first = ds.local_experts()[0].up_proj
    assert first.dtype == torch.float64 and first.untyped_storage().nbytes() == 4 * first.numel() * 8
    torch.testing.assert_close(ds(x.double()), local.double()(x.double()))


def test_trainable_bases_get_their_gradients(dist_world):
    """Bases that train are concatenated with autograd instead of packed: each expert's own gradient."""
    local, ds = _local_layer(), _ds_layer()
    ds.load_state_dict(local.state_dict(), strict=True)
    x = torch.randn(3, 4, 16)
    _run(local, x)
    _run(ds, x)
    for b, expert in enumerate(ds.local_experts()):
        for name in ("gate_proj", "up_proj", "down_proj"):
            torch.testing.assert_close(getattr(expert, name).grad[0], getattr(local.experts, name).grad[b])


def test_second_expert_sampling_only_in_training(dist_world):
    ds = _ds_layer(second_expert_sampling=True).eval()
    x = torch.randn(1, 64, 16)
    first = ds(x)
    torch.testing.assert_close(ds(x), first)
    ds.train()
    ds(x)
    assert torch.equal(ds.routing[..., 0], x.reshape(-1, 16).matmul(ds.router.weight.T).argmax(-1).view(1, 64))


def test_state_dict_round_trips_between_backends(dist_world):
    local, ds = _local_layer(), _ds_layer()
    ds.load_state_dict(local.state_dict())
    with torch.no_grad():
        for p in ds.parameters():
            p.add_(0.01 * torch.randn_like(p))
    from Uni_MoE.model.moe.deepspeed_backend import local_layout_state_dict

    back = MoELayer(**LAYER, implementation="reference")
    back.load_state_dict(local_layout_state_dict(ds), strict=True)
    again = _ds_layer()
    again.load_state_dict(ds.state_dict(), strict=True)  # DeepSpeed's own layout
    assert "router.weight" not in ds.state_dict()
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(back(x), ds(x))
    torch.testing.assert_close(again(x), ds(x))


def test_original_v2_names_load(dist_world):
    local, ds = _local_layer(), _ds_layer()
    sd = local.state_dict()
    original = {"deepspeed_moe.gate.wg.weight": sd["router.weight"]}
    for b in range(LAYER["num_experts"]):
        for p in ("gate", "up", "down"):
            prefix = f"deepspeed_moe.experts.deepspeed_experts.{b}.{p}_proj"
            original[f"{prefix}.weight"] = sd[f"experts.{p}_proj"][b]
            original[f"{prefix}_lora_A.weight"] = sd[f"experts.{p}_lora_A"][b]
            original[f"{prefix}_lora_B.weight"] = sd[f"experts.{p}_lora_B"][b]
    ds.load_state_dict(original, strict=True)
    x = torch.randn(2, 6, 16)
    torch.testing.assert_close(ds(x), local(x))


def test_settings_the_backend_cannot_honour_are_errors(dist_world):
    with pytest.raises(ValueError, match="expert_type='shared'"):
        _ds_layer(expert_type="shared")
    with pytest.raises(ValueError, match="router_jitter=0.1: .* only 0 or 0.01"):
        _ds_layer(router_jitter=0.1)
    with pytest.raises(ValueError, match="num_experts=4 is not divisible by ep_size=3"):
        _ds_layer(ep_size=3)
    assert _ds_layer(router_jitter=0.01).moe.deepspeed_moe.gate.noisy_gate_policy == "Jitter"


def test_wrong_expert_count_names_the_key(dist_world):
    sd = MoELayer(**{**LAYER, "num_experts": 2}).state_dict()
    with pytest.raises(ValueError, match="experts.gate_proj.*2 experts"):
        _ds_layer().load_state_dict(sd)


def test_param_groups_mark_expert_parameters(dist_world):
    from Uni_MoE.train.moe_optimizer import moe_param_groups

    ds = _ds_layer()
    groups = moe_param_groups([{"params": list(ds.parameters()), "weight_decay": 0.0}])
    moe = [g for g in groups if g.get("moe")]
    assert len(moe) == 1 and moe[0]["name"] == "ep_size_1" and moe[0]["weight_decay"] == 0.0
    expert_params = {id(p) for e in ds.local_experts() for p in e.parameters()}
    assert {id(p) for p in moe[0]["params"]} == expert_params
    dense = [p for g in groups if not g.get("moe") for p in g["params"]]
    assert [id(p) for p in dense] == [id(ds.router.weight)]
    plain = moe_param_groups(list(ds.parameters()))  # a bare parameter list is one group
    assert sum(len(g["params"]) for g in plain if g.get("moe")) == len(expert_params)


def _model_pair(make_config):
    config = make_config(expert_lora_r=4, expert_lora_alpha=8)
    local = UniMoEForCausalLM(config).eval()
    with torch.no_grad():
        for layer in local.moe_mlps():
            for p in layer.experts.lora_parameters():
                p.normal_(0.0, 0.1)
    ds_config = make_config(expert_lora_r=4, expert_lora_alpha=8, moe_backend="deepspeed")
    return local, UniMoEForCausalLM(ds_config).eval()


def _live_tensors(shape: tuple[int, ...]) -> int:
    import gc

    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and tuple(o.shape) == shape)


@pytest.mark.parametrize("backend", ["local", "deepspeed"])
def test_checkpointed_step_leaves_no_activations_alive(dist_world, make_config, backend):
    """After a checkpointed training step no [B, S, H] activation survives: the layers keep their balance
    losses as values, and a recomputing forward does not replace them with graphs of the recomputed layer."""
    config = make_config(expert_lora_r=4, expert_lora_alpha=8, moe_backend=backend)
    model = UniMoEForCausalLM(config).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(3, 290, (2, 13))
    hidden = (2, 13, config.text_config.hidden_size)
    before = _live_tensors(hidden)
    for _ in range(2):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    del out
    assert _live_tensors(hidden) == before
    aux = [m.aux_loss for m in model.moe_mlps()]
    assert all(a is not None and a.grad_fn is None and torch.isfinite(a) for a in aux)


@pytest.mark.parametrize("backend", ["local", "deepspeed"])
def test_moe_recompute_reaches_every_expert_block_and_keeps_the_gradients(dist_world, make_config, backend):
    """``moe_recompute_enable`` reaches the experts of either backend (the DeepSpeed layer's packed view
    too): each MoE layer keeps two I-wide activations fewer for backward, and the loss and every gradient
    are unchanged."""
    config = make_config(expert_lora_r=4, expert_lora_alpha=8, moe_backend=backend)
    model = UniMoEForCausalLM(config).train()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.dim() == 3:  # LoRA B starts at zero: make every LoRA path count
                p.normal_(0.0, 0.1)
    ids = torch.randint(3, 290, (2, 13))
    width = config.text_config.intermediate_size

    def step() -> tuple[dict[str, torch.Tensor], int]:
        model.zero_grad(set_to_none=True)
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        wide = sum(t.is_floating_point() and t.dim() == 2 and t.shape[1] == width for t in kept)
        return {"loss": loss.detach(), **{n: p.grad for n, p in model.named_parameters() if p.grad is not None}}, wide

    keeping, wide_keeping = step()
    model.moe_recompute_enable()
    recomputing, wide_recomputing = step()
    assert wide_recomputing == wide_keeping - 2 * len(model.moe_mlps())
    assert recomputing.keys() == keeping.keys() and len(keeping) > 1
    for name, value in keeping.items():
        torch.testing.assert_close(recomputing[name], value, rtol=0, atol=0, msg=name)


def test_model_checkpoints_load_in_either_backend(dist_world, make_config, tmp_path):
    from Uni_MoE.checkpoint.loader import load_checkpoint
    from Uni_MoE.checkpoint.v2_experts import from_pretrained_expert_parallel
    from Uni_MoE.model.moe.deepspeed_backend import local_layout_state_dict

    local, ds = _model_pair(make_config)
    ds.load_state_dict(local.state_dict(), strict=True)
    ids = torch.randint(0, 200, (2, 12))
    out_l, out_d = local(ids), ds(ids)
    torch.testing.assert_close(out_d.logits, out_l.logits)
    torch.testing.assert_close(out_d.aux_loss, out_l.aux_loss)
    assert len(ds.collect_routing()) == len(local.collect_routing())

    ds.save_pretrained(tmp_path / "from_ds", state_dict=local_layout_state_dict(ds))
    reloaded = UniMoEForCausalLM.from_pretrained(tmp_path / "from_ds", moe_backend="local").eval()
    torch.testing.assert_close(reloaded(ids).logits, out_d.logits)

    local.save_pretrained(tmp_path / "from_local")
    ep_model = from_pretrained_expert_parallel(tmp_path / "from_local", ep_size=1)
    torch.testing.assert_close(ep_model(ids).logits, out_l.logits)
    # the loader with the deepspeed backend splits the saved experts too, instead of leaving them random
    ep_model = load_checkpoint(tmp_path / "from_local", moe_backend="deepspeed").eval()
    assert ep_model.config.moe_backend == "deepspeed"
    torch.testing.assert_close(ep_model(ids).logits, out_l.logits)
    with pytest.raises(ValueError, match="load_checkpoint.*ep_size"):  # loading by name would leave them random
        UniMoEForCausalLM.from_pretrained(tmp_path / "from_local", moe_backend="deepspeed")


def test_deepspeed_layout_save_pretrained_round_trips(dist_world, make_config, tmp_path):
    """save_pretrained of the model's own (DeepSpeed) layout, with packed expert bases, reloads equal."""
    local, ds = _model_pair(make_config)
    ds.load_state_dict(local.state_dict(), strict=True)
    ids = torch.randint(0, 200, (2, 12))
    expected = ds(ids).logits  # packs the bases
    ds.save_pretrained(tmp_path)
    from Uni_MoE.checkpoint.loader import load_checkpoint

    again = load_checkpoint(tmp_path, moe_backend="deepspeed").eval()
    torch.testing.assert_close(again(ids).logits, expected)


def test_dense_checkpoint_upcycles_into_deepspeed_experts(dist_world, make_config, tmp_path):
    """transformers' from_pretrained builds a DeepSpeed-MoE model over a dense base (stage 3's start)."""
    dense = UniMoEForCausalLM(make_config(moe_layers="none"))
    dense.save_pretrained(tmp_path)
    model = UniMoEForCausalLM.from_pretrained(tmp_path, moe_backend="deepspeed", moe_layers="all", num_experts=8,
                                              expert_lora_r=4)
    assert len(model.moe_mlps()) == 4 and len(model.moe_mlps()[3].local_experts()) == 8
    name = "model.language_model.layers.2.self_attn.q_proj.weight"
    torch.testing.assert_close(model.get_parameter(name), dense.get_parameter(name))
    from Uni_MoE.train.moe_optimizer import mark_expert_parameters, with_moe_param_groups

    experts = [p for layer in model.moe_mlps() for p in layer.local_experts().parameters()]
    assert mark_expert_parameters(model) == len(experts) == 4 * 8 * 9  # flags lost when loading replaced them
    optimizer = with_moe_param_groups(torch.optim.SGD)([{"params": list(model.parameters())}], lr=0.1)
    moe_groups = [g for g in optimizer.param_groups if g.get("moe")]
    assert {id(p) for g in moe_groups for p in g["params"]} == {id(p) for p in experts}


def test_v2_expert_files_fill_deepspeed_experts(dist_world, make_config, tmp_path):
    from helpers import write_experts_dir

    from Uni_MoE.checkpoint.v2_experts import V2_EXPERT_FILES, V2_MLP_KEY, load_v2_expert_bases

    model = UniMoEForCausalLM(make_config(num_experts=8, expert_lora_r=4, moe_backend="deepspeed"))
    files = write_experts_dir(tmp_path, model.config)
    assert load_v2_expert_bases(model, tmp_path) == list(range(8))
    layer = model.moe_mlps()[1]
    expected = files[V2_EXPERT_FILES[5]][V2_MLP_KEY.format(layer=1, proj="down_proj")]
    assert torch.equal(layer.local_expert(5).down_proj[0], expected)


@pytest.mark.slow
def test_expert_parallel_over_two_processes(tmp_path):
    """ep_size=2 on two gloo ranks: each holds half the experts, outputs and input gradients equal the
    local backend's, and local_layout_state_dict gathers the full stacked experts."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OUT_DIR": str(tmp_path)}
    cmd = [*torchrun(2), __file__]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in (0, 1):
        assert (Path(tmp_path) / f"ok{rank}").read_text() == "ok"


@pytest.mark.slow
def test_expert_parallel_over_four_processes(tmp_path):
    """ep_size=4 on four gloo ranks (rows for three other ranks per piece, one rank without tokens): outputs
    and gradients equal the local backend's."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OUT_DIR": str(tmp_path), "EP_WORKER": "ep4"}
    cmd = [*torchrun(4), __file__]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in range(4):
        assert (Path(tmp_path) / f"ok{rank}").read_text() == "ok"


def _compare_with_local(local: MoELayer, ds, x: torch.Tensor, rank: int, names: tuple[str, ...]) -> None:
    """Fresh gradients; outputs and input gradients equal the local layer's on this rank's tokens, and each
    expert's gradients (``names``) equal the local ones summed over the ranks that fed it."""
    for layer in (local, ds):
        layer.zero_grad(set_to_none=True)
    out_l, gx_l = _run(local, x)
    out_d, gx_d = _run(ds, x)
    torch.testing.assert_close(out_d, out_l)
    torch.testing.assert_close(gx_d, gx_l)
    _assert_expert_grads_summed(local, ds, rank, names)


def _assert_expert_grads_summed(local: MoELayer, ds, rank: int, names: tuple[str, ...]) -> None:
    import torch.distributed as dist

    per_rank = ds.num_local_experts
    for name in names:
        param = getattr(local.experts, name)
        summed = torch.zeros_like(param) if param.grad is None else param.grad.clone()
        dist.all_reduce(summed)
        for b, expert in enumerate(ds.local_experts()):
            torch.testing.assert_close(getattr(expert, name).grad[0], summed[per_rank * rank + b])


def _ep4_worker() -> None:
    """Each rank: 8 experts over 4 ranks against the local layer on its own tokens (rank 3 has none)."""
    import torch.distributed as dist

    from Uni_MoE.model.moe.deepspeed_backend import DeepSpeedMoELayer

    init_deepspeed_comm(dist_backend="gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    local = MoELayer(**{**LAYER, "num_experts": 8}, implementation="reference")
    for p in local.experts.lora_parameters():
        torch.nn.init.normal_(p, std=0.1)
    ds = DeepSpeedMoELayer(**{**LAYER, "num_experts": 8}, ep_size=4)
    ds.load_state_dict(local.state_dict(), strict=True)
    torch.manual_seed(1 + rank)
    x = torch.randn(1, (5, 9, 2, 0)[rank], 16)
    _compare_with_local(local, ds, x, rank, LORA_NAMES)
    (Path(os.environ["OUT_DIR"]) / f"ok{rank}").write_text("ok")
    dist.barrier()


def _ep2_worker() -> None:
    """Each rank: build local (all experts, same seed) and ep_size=2 layers, load, compare, save back."""
    import torch.distributed as dist

    from Uni_MoE.model.moe.deepspeed_backend import DeepSpeedMoELayer, local_layout_state_dict

    init_deepspeed_comm(dist_backend="gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    local = _local_layer()
    ds = DeepSpeedMoELayer(**LAYER, ep_size=2)
    ds.load_state_dict(local.state_dict(), strict=True)
    assert ds.num_local_experts == 2 and ds.local_expert(2 * rank) is ds.local_experts()[0]
    torch.testing.assert_close(ds.local_experts()[1].up_proj[0], local.experts.up_proj[2 * rank + 1])
    torch.manual_seed(1 + rank)  # different tokens per rank
    x = torch.randn(2, 7, 16)
    _compare_with_local(local, ds, x, rank, LORA_NAMES)  # an expert's gradient sums both ranks' tokens
    torch.testing.assert_close(ds.router.weight.grad, local.router.weight.grad)  # through the routing weights
    _ep2_checkpointed(ds, x)
    _ep2_recompute(ds, x)
    _ep2_uneven(rank, local, ds)
    _ep2_padded_inbox(rank, local, ds)
    _ep2_no_rows_for_one_rank(rank)
    own = ds.state_dict()  # DeepSpeed's layout: this rank's two experts only
    assert "router.weight" not in own and "moe.deepspeed_moe.experts.deepspeed_experts.1.up_proj" in own
    assert not any(".deepspeed_experts.2." in k for k in own)
    gathered = local_layout_state_dict(ds)
    assert gathered.keys() == local.state_dict().keys()
    for key, value in local.state_dict().items():
        torch.testing.assert_close(gathered[key], value)
    _ep2_v2_experts(rank, Path(os.environ["OUT_DIR"]))
    (Path(os.environ["OUT_DIR"]) / f"ok{rank}").write_text("ok")
    dist.barrier()


def _ep2_recompute(ds, x: torch.Tensor) -> None:
    """``recompute_projections``: the experts keep no inbox (it is received again in backward, once) and
    outputs and gradients are bit-identical to keeping it; under checkpointing the layer keeps nothing anyway
    and receives nothing again."""
    import weakref
    from unittest.mock import patch

    from torch.utils.checkpoint import checkpoint

    from Uni_MoE.model.moe import ep_merged

    dispatch_rows = ep_merged.dispatch_rows
    made: list = []

    def recording(*args):
        inbox = dispatch_rows(*args)
        made.append(weakref.ref(inbox))
        return inbox

    def run(recompute: bool, checkpointed: bool = False) -> tuple[list[torch.Tensor], bool, int]:
        for expert in ds.local_experts():
            expert.recompute_projections = recompute
        ds.zero_grad(set_to_none=True)
        made.clear()
        xg = x.clone().requires_grad_()
        with patch.object(ep_merged, "dispatch_rows", recording):
            out = checkpoint(ds, xg, use_reentrant=False) if checkpointed else ds(xg)
            kept = made[0]() is not None  # the forward's inbox, alive only if saved for backward
            out.square().sum().backward()
        experts = ds.local_experts()[1]
        grads = [out.detach(), xg.grad, ds.router.weight.grad] + [getattr(experts, n).grad for n in LORA_NAMES]
        return grads, kept, len(made)

    plain, kept, exchanges = run(False)
    assert kept and exchanges == 1
    recomputed, kept, exchanges = run(True)
    assert not kept and exchanges == 2  # the forward's, and the backward's again
    for i, (got, want) in enumerate(zip(recomputed, plain)):
        assert torch.equal(got, want), f"tensor {i}"
    checkpointed, kept, exchanges = run(True, checkpointed=True)
    assert not kept and exchanges == 2  # the forward's and the checkpoint's recompute, no refetch
    for i, (got, want) in enumerate(zip(checkpointed, plain)):
        torch.testing.assert_close(got, want, msg=lambda m: f"checkpointed, tensor {i}: {m}")
    for expert in ds.local_experts():
        expert.recompute_projections = False


def _ep2_checkpointed(ds, x: torch.Tensor) -> None:
    """Under activation checkpointing (either kind) the layer recomputes its exchange in the backward and
    gives the same outputs and gradients as without; the recompute reuses its forward's count exchange."""
    from unittest.mock import patch

    from torch.utils.checkpoint import checkpoint

    from Uni_MoE.model.moe import ep_dispatch

    exchange_counts = ep_dispatch._exchange_counts

    def grads(reentrant: bool | None) -> list[torch.Tensor]:
        ds.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        out = ds(xg) if reentrant is None else checkpoint(ds, xg, use_reentrant=reentrant)
        out.square().sum().backward()  # a reentrant checkpoint gives the aux loss, a side output, no gradient
        experts = ds.local_experts()[1]
        return [out.detach(), xg.grad, ds.router.weight.grad] + [getattr(experts, n).grad for n in LORA_NAMES]

    plain = grads(None)
    for reentrant in (False, True):
        for i, (got, want) in enumerate(zip(grads(reentrant), plain)):
            torch.testing.assert_close(got, want, msg=lambda m: f"reentrant={reentrant}, tensor {i}: {m}")
    exchanges = []  # one recompute, which reuses the forward's count exchange (no second host sync)
    counting = lambda *args: exchanges.append(1) or exchange_counts(*args)  # noqa: E731
    with patch.object(ep_dispatch, "_exchange_counts", counting):
        for reentrant in (False, True):
            grads(reentrant)
    assert len(exchanges) == 2
    xg = x.clone().requires_grad_()  # a recompute that routes differently from its forward is stopped
    out = checkpoint(ds, xg, use_reentrant=False)
    ds._memo.counts = ds._memo.counts + 1
    with pytest.raises(RuntimeError, match="routed differently"):
        out.square().sum().backward()


def _ep2_uneven(rank: int, local: MoELayer, ds) -> None:
    """Rank 1 sends no token at all and the bases train: rank 0's outputs, the rows each rank's experts ran,
    and every expert's base and LoRA gradients (rank 0's tokens only) still match the local backend."""
    import torch.distributed as dist

    for layer in (local, ds):
        layer.zero_grad(set_to_none=True)
    x = torch.randn(1, 11 if rank == 0 else 0, 16)
    out_l, out_d = local(x), ds(x)
    torch.testing.assert_close(out_d, out_l)
    if out_l.requires_grad:  # the local layer on no token computes nothing
        out_l.square().sum().backward()
    out_d.square().sum().backward()  # every rank: the backward exchanges rows too
    if rank == 0:
        torch.testing.assert_close(ds.router.weight.grad, local.router.weight.grad)
    routes = [None, None]
    dist.all_gather_object(routes, ds.routing)
    assert ds.expert_rows == sum(int((r // 2 == rank).sum()) for r in routes) > 0  # the slots sent to this rank
    _assert_expert_grads_summed(local, ds, rank, ("gate_proj", "down_proj", "up_lora_A", "down_lora_B"))


def _ep2_padded_inbox(rank: int, local: MoELayer, ds) -> None:
    """With the experts' inbox padded to a multiple of 8 rows (128 at real sizes), outputs and all
    gradients still equal the local layer's: the zero padding rows add nothing either way."""
    from unittest.mock import patch

    from Uni_MoE.model.moe import ep_dispatch, ep_merged

    inboxes = []

    def padded(rows: int) -> int:
        inboxes.append((rows, ep_merged.padded_rows(rows, 8)))
        return inboxes[-1][1]

    torch.manual_seed(5 + rank)
    x = torch.randn(1, 13 + 4 * rank, 16)
    with patch.object(ep_dispatch, "padded_rows", padded):
        _compare_with_local(local, ds, x, rank, LORA_NAMES)
    assert inboxes and all(p % 8 == 0 and rows <= p < rows + 8 for rows, p in inboxes)
    assert any(p > rows for rows, p in inboxes)


def _ep2_no_rows_for_one_rank(rank: int) -> None:
    """Every token routes to rank 0's experts, so rank 1's experts run no row (the reference loop returns a
    tensor without history then); the backward still completes on both ranks, with rank 0's gradients."""
    from Uni_MoE.model.moe.deepspeed_backend import DeepSpeedMoELayer

    ds = DeepSpeedMoELayer(**LAYER, ep_size=2, implementation="reference")
    with torch.no_grad():
        ds.router.weight.copy_(torch.tensor([1.0, 0.5, -1.0, -1.0])[:, None].expand(4, 16))
    x = torch.rand(1, 6, 16).requires_grad_()  # positive features: experts 0 and 1 win for every token
    out = ds(x)
    assert ds.expert_rows == (24 if rank == 0 else 0)
    out.square().sum().backward()
    grads = [e.up_lora_B.grad for e in ds.local_experts()]
    assert all(g is not None for g in grads) and (rank == 0 or all(not g.any() for g in grads))
    assert x.grad is not None and x.grad.abs().sum() > 0


def _ep2_v2_experts(rank: int, out: Path) -> None:
    """Each rank of an ep_size=2 model reads only the Experts files of the experts it holds."""
    import torch.distributed as dist
    from conftest import small_config
    from helpers import write_experts_dir

    from Uni_MoE.checkpoint.v2_experts import V2_EXPERT_FILES, V2_MLP_KEY, load_v2_expert_bases

    model = UniMoEForCausalLM(small_config(num_experts=8, expert_lora_r=4, moe_backend="deepspeed", ep_size=2))
    files = write_experts_dir(out / f"experts{rank}", model.config)
    for stem in ("mlp_audiocap", "mlp_basev") if rank == 1 else ("mlp_base4",):  # not this rank's experts
        (out / f"experts{rank}" / f"{stem}.bin").unlink()
    assert load_v2_expert_bases(model, out / f"experts{rank}") == list(range(4 * rank, 4 * rank + 4))
    expert = 4 * rank + 3
    expected = files[V2_EXPERT_FILES[expert]][V2_MLP_KEY.format(layer=0, proj="up_proj")]
    assert torch.equal(model.moe_mlps()[0].local_experts()[3].up_proj[0], expected)
    dist.barrier()


if __name__ == "__main__":
    _ep4_worker() if os.environ.get("EP_WORKER") == "ep4" else _ep2_worker()
