"""The Triton expert kernels: their tile schedules, and (where Triton is installed) the kernels run by
Triton's CPU interpreter against the reference loop."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import interpreter_env, run_in_triton_interpreter

from Uni_MoE.model.moe.shared_kernels import combo_grouping
from Uni_MoE.model.moe.swiglu_lora_kernels import expert_tile_ranges, tile_schedule

ROOT = Path(__file__).resolve().parents[1]


def test_tile_schedule_never_straddles_experts_and_covers_every_row() -> None:
    counts = torch.tensor([3, 0, 5])  # expert 1 empty; expert 2 needs two tiles of 4
    offs = counts.cumsum(0).to(torch.int32)
    sched = tile_schedule(counts, offs, num_rows=8, block_m=4)
    assert sched.tolist() == [[0, 2, 2, 2, 2], [0, 3, 7, 0, 0], [3, 8, 8, 0, 0]]


def test_expert_tile_ranges_follow_the_tile_schedule() -> None:
    counts = torch.tensor([3, 0, 5])
    assert expert_tile_ranges(counts, block_m=4).tolist() == [[0, 1, 1], [1, 1, 3]]  # tiles 0 | none | 1, 2


def test_combo_grouping_gives_each_tile_one_expert_per_slot() -> None:
    """Tokens sorted by (expert of slot 0, expert of slot 1) together; tiles never mix combinations."""
    indices = torch.tensor([[2, 0], [1, 2], [2, 0], [0, 1], [1, 2], [2, 0]])
    grouping, sched = combo_grouping(indices, num_experts=3)
    combos = indices[:, 0] + 3 * indices[:, 1]
    assert combos[grouping.order].tolist() == sorted(combos.tolist())
    assert grouping.order.tolist() == [0, 2, 5, 3, 1, 4]  # stable: equal combinations keep token order
    tiles = [(c, a, b) for c, a, b in sched.t().tolist() if a < b]
    assert [(c, b - a) for c, a, b in tiles] == [(2, 3), (3, 1), (7, 2)]  # c = e0 + 3 e1: (2,0), (0,1), (1,2)
    for c, a, b in tiles:
        assert set(combos[grouping.order[a:b]].tolist()) == {c}


INTERPRETER = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


@pytest.mark.slow
@INTERPRETER
def test_shared_kernels_in_the_interpreter_pass_the_grouped_tests() -> None:
    """The float32 CPU tests of the shared-base block (top-1/top-2, empty and uneven experts, trainable
    bases, checkpointing, no tokens), and those of recomputed projections for both kinds (the distinct
    block's backward kernel then writes its gradients over gate and up), with the Triton kernels run by the
    interpreter."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
                             "(shared and lora_a_outside) or recompute_projections",
                             str(ROOT / "tests" / "test_moe_grouped.py")], capture_output=True, text=True,
                            env=interpreter_env(), timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout


@pytest.mark.slow
@INTERPRETER
def test_kernels_in_the_triton_interpreter_match_the_loop() -> None:
    env = interpreter_env()
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "check_moe_kernels.py"), "--small",
                             "--device", "cpu"], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout


@INTERPRETER
def test_check_each_config_checks_every_kernel_of_both_kinds() -> None:
    """``--each-config`` pins each kernel's configs in turn (one under the interpreter) and checks a layer each."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "check_moe_kernels.py"), "--small",
                             "--device", "cpu", "--each-config", "--experts", "4", "--ranks", "8"],
                            capture_output=True, text=True, env=interpreter_env(), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("shared forward", "shared backward", "shared weight gradients", "distinct forward",
                 "distinct backward", "rank gradients"):
        assert f"{name}, config 0:" in result.stdout
    assert result.stdout.count("E=4 r= 8: bf16 rel err") == 6 and "all checks passed" in result.stdout


_LOGITS_CHECK = """
import torch
from Uni_MoE.model.moe.router_logits import logits_f32
torch.manual_seed(0)
x, w = torch.randn(70, 200), torch.randn(6, 200)  # partial row, column and expert blocks
exact = x.double() @ w.double().t()
out = logits_f32(x, w)
assert out.dtype == torch.float32 and out.shape == (70, 6)
torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)
print("ok")
"""


@INTERPRETER
def test_router_logits_kernel_in_the_interpreter_matches_float64() -> None:
    assert run_in_triton_interpreter(_LOGITS_CHECK, timeout=300).strip() == "ok"


_GROUPING_CHECK = """
import torch
from Uni_MoE.model.moe import group_kernels
from Uni_MoE.model.moe.segments import group_slots
torch.manual_seed(0)
for tokens, k, experts in ((700, 2, 4), (700, 2, 40), (37, 1, 16), (5, 2, 8)):
    indices = torch.randint(0, experts, (tokens, k))
    indices[indices == 1] = 2  # an empty expert
    fast = group_kernels.group(indices, experts)
    group_kernels._ENABLED[0] = False
    ref = group_slots(indices, experts)
    group_kernels._ENABLED[0] = True
    for name, got in zip(("order", "inverse", "token", "expert", "counts", "offs"), fast):
        want = getattr(ref, name)
        assert got.dtype == want.dtype and torch.equal(got, want), (tokens, k, experts, name)
print("ok")
"""


@INTERPRETER
def test_grouping_kernels_in_the_interpreter_equal_the_stable_sort() -> None:
    """Several blocks of slots (cross-block offsets), an empty expert, top-1 and top-2."""
    assert run_in_triton_interpreter(_GROUPING_CHECK, timeout=600).strip() == "ok"


_SWAP_CHECK = """
import torch
from Uni_MoE.model.moe.factor_layout import kernel_factors, swap_last_two
from Uni_MoE.model.moe.lora_blocks import stack_b
torch.manual_seed(0)
for shape in [(3, 70, 5), (2, 130, 129), (64, 64), (4, 1, 3), (2, 3, 65, 2)]:  # partial tiles, >1 tile each way
    t = torch.randn(*shape)
    out = swap_last_two(t)
    assert out.is_contiguous() and torch.equal(out, t.transpose(-1, -2)), shape
b = torch.randn(3, 70, 5)  # LoRA-B [E, out, r]
assert torch.equal(stack_b(b), b.permute(0, 2, 1).reshape(-1, 70))
a = torch.randn(3, 70, 5).transpose(1, 2)  # a non-contiguous LoRA-A [E, r, I]
bg, bu, da = kernel_factors(b, b + 1, a)
assert torch.equal(bg, b.transpose(1, 2)) and torch.equal(bu, (b + 1).transpose(1, 2))
assert da.is_contiguous() and torch.equal(da, a)
print("ok")
"""


@INTERPRETER
def test_transposed_factor_copies_in_the_interpreter_equal_torchs() -> None:
    """The tiled transpose behind the kernels' LoRA-B layout and ``stack_b``: tiles cut at every edge, batches."""
    assert run_in_triton_interpreter(_SWAP_CHECK, timeout=300).strip() == "ok"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_128_row_tiles_only_where_a_row_of_r_wide_blocks_fits_256_bytes() -> None:
    """float32 at r = 128 found no config of the 128-row backward within an H200's shared memory."""
    from Uni_MoE.model.moe.swiglu_lora_kernels import block_m

    assert [block_m(r, torch.bfloat16) for r in (0, 8, 32, 64, 128, 256)] == [64, 64, 64, 128, 128, 64]
    assert [block_m(r, torch.float32) for r in (8, 64, 100, 128)] == [64, 128, 64, 64]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_autotuning_configs_cap_registers_only_where_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    from Uni_MoE.model.moe import swiglu_lora_kernels as kernels

    monkeypatch.delenv("UNI_MOE_AUTOTUNE", raising=False)
    tuned = kernels.configs(((32, 8, 3), (64, 4, 1, 32)), capped=((16, 4, 2),))
    assert [(c.kwargs, c.num_warps, c.num_stages, c.maxnreg) for c in tuned] == [
        ({"BLOCK_N": 32}, 8, 3, None), ({"BLOCK_N": 64, "BLOCK_M": 32}, 4, 1, None),
        ({"BLOCK_N": 16}, 4, 2, kernels.CAPPED_REGS)]
    monkeypatch.setenv("UNI_MOE_AUTOTUNE", "0")
    single = kernels.configs(((32, 8, 3),), single=(64, 4, 1), capped=((16, 4, 2),))
    assert [(c.kwargs, c.maxnreg) for c in single] == [({"BLOCK_N": 64}, None)]


def test_config_pruning_keeps_capped_registers_off_large_r_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    from Uni_MoE.model.moe import swiglu_lora_kernels as kernels

    monkeypatch.delenv("UNI_MOE_AUTOTUNE", raising=False)
    tuned = kernels.configs(((32, 8, 3), (64, 4, 1)), capped=((16, 4, 1), (16, 4, 2)))
    bf16, fp32 = ({"gate_ptr": torch.empty(1, dtype=dtype)} for dtype in (torch.bfloat16, torch.float32))

    def kept(configs: list, args: dict, rows: int, block_r: int) -> list[tuple]:
        return [(c.kwargs["BLOCK_N"], c.num_stages, c.maxnreg)
                for c in kernels._prune(configs, args, BLOCK_M=rows, BLOCK_R=block_r)]

    capped = kernels.CAPPED_REGS
    assert kept(tuned, bf16, 128, 64) == [(32, 3, None), (64, 1, None), (16, 1, capped), (16, 2, capped)]
    assert kept(tuned, bf16, 128, 128) == [(32, 3, None), (64, 1, None)]  # r = 128 at 128 rows
    assert kept(tuned, fp32, 64, 16) == [(64, 1, None), (16, 1, capped)]
    assert kept(tuned, fp32, 128, 128) == [(64, 1, None)]
    assert kept(tuned[2:3], bf16, 128, 128) == [(16, 1, capped)]  # a pinned config stays


_WIDE_CHECK = """
import torch
from Uni_MoE.model.moe import MoELayer, shared_kernels
torch.manual_seed(0)
layer = MoELayer(32, 96, 4, 2, expert_type="shared", lora_r=8, lora_alpha=16)
with torch.no_grad():
    for p in layer.experts.lora_parameters():
        p.normal_(0.0, 0.05)
x = torch.randn(70, 32)
results, calls = [], []
for wide in (False, True):
    shared_kernels._wide = lambda *sizes, wide=wide: calls.append(wide) or wide
    layer.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    layer(xi).sum().backward()
    results.append([xi.grad] + [p.grad for p in layer.experts.lora_parameters()])
for narrow, wide in zip(*results):
    assert narrow is not None and torch.equal(narrow, wide)
assert calls == [False, False, True, True]  # the backward and weight-gradient kernels ran, each way
print("same")
"""


@INTERPRETER
def test_shared_kernels_give_the_same_gradients_with_64_bit_row_offsets() -> None:
    assert run_in_triton_interpreter(_WIDE_CHECK, timeout=600).strip() == "same"


_SLOT_ROWS_CHECK = """
import torch
from Uni_MoE.model.moe import MoELayer, shared, shared_kernels
ran = []
grouped = shared._grouped_weight_grads
shared._grouped_weight_grads = lambda *args: ran.append(1) or grouped(*args)
for top_k, dropout in ((2, 0.0), (2, 0.3), (1, 0.0)):
    torch.manual_seed(0)
    layer = MoELayer(32, 96, 4, top_k, expert_type="shared", lora_r=8, lora_alpha=16, lora_dropout=dropout)
    with torch.no_grad():
        for p in layer.experts.lora_parameters():
            p.normal_(0.0, 0.05)
        layer.router.weight[3] = -10.0  # with positive inputs expert 3 gets no slot
    x = torch.randn(70, 32).abs()
    results = []
    # the fused weight-gradient kernel, then the stored slot rows with 32-bit and with 64-bit offsets
    for min_rank, wide in ((9, False), (8, False), (8, True)):
        shared_kernels.SLOT_ROWS_MIN_RANK = min_rank
        shared_kernels._wide = lambda *sizes, wide=wide: wide
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(1)  # the same dropout masks
        layer(xi).sum().backward()
        results.append([xi.grad, layer.router.weight.grad] + [p.grad for p in layer.experts.lora_parameters()])
    for i, (fused, rows, wide_rows) in enumerate(zip(*results)):
        assert torch.allclose(fused, rows, rtol=1e-5, atol=1e-6), (i, (fused - rows).abs().max())
        assert torch.equal(rows, wide_rows), i
        assert i == 1 or fused.abs().max() > 0, i  # with top-1 the routing weights are all 1: no router gradient
    assert results[0][-3][3].abs().max() == 0  # the empty expert's gradient is zero either way
assert len(ran) == 6
print("same")
"""


@INTERPRETER
def test_shared_weight_gradients_from_stored_slot_rows_equal_the_fused_kernel() -> None:
    """From SLOT_ROWS_MIN_RANK the backward kernel stores each slot's rows for grouped weight-gradient GEMMs:
    every gradient equals the fused kernel's (top-2 and top-1, with down dropout, an expert without slots), and
    is the same with 64-bit row offsets."""
    assert run_in_triton_interpreter(_SLOT_ROWS_CHECK, timeout=600).strip() == "same"


_WIDE_TILES_CHECK = """
import sys
import torch
sys.path.insert(0, "benchmarks")
from check_moe_kernels import make_layer, rel, run
from Uni_MoE.model.moe import swiglu_lora_kernels as kernels
for rank, dropout in ((8, 0.1), (64, 0.0)):
    layer = make_layer(32, 200, 4, rank, "mlp", dropout).train()
    x = torch.rand(300, 32)  # about 150 slots an expert: full and partial 128-row tiles, one expert empty
    got = {}
    for wide_from in (rank, rank + 1):  # 128-row tiles, then 64-row ones
        kernels.WIDE_MIN_RANK = wide_from
        got[kernels.block_m(rank, torch.float32)] = run(layer, x, "grouped", seed=1)
    loop = run(layer, x, "reference", seed=1) if dropout == 0 else got[64]
    assert set(got[128]) == set(loop) and len(loop) > 5, sorted(loop)
    worst = max(rel(got[128][k], loop[k]) for k in loop)
    assert worst < 1e-5, (rank, worst)
print("ok")
"""


@INTERPRETER
def test_distinct_kernels_with_128_row_tiles_match_64_row_tiles_and_the_loop() -> None:
    """From WIDE_MIN_RANK the distinct kernels take 128-row tiles: with them (forced at r = 8 too, where the
    backward kernel also sums the LoRA weight gradients per tile, and under dropout) every output and gradient
    equals the 64-row tiles' and, without dropout, the reference loop's."""
    assert run_in_triton_interpreter(_WIDE_TILES_CHECK, timeout=600).strip() == "ok"


_RANK_GRAD_CHECK = """
import torch
from Uni_MoE.model.moe.rank_grad_kernels import rank_grad, usable
from Uni_MoE.model.moe.segments import group_slots
torch.manual_seed(0)
for tokens, experts, rank, cols in ((70, 5, 12, 150), (33, 3, 64, 40), (9, 4, 5, 16)):
    indices = torch.stack([torch.randperm(experts)[:2] for _ in range(tokens)])
    indices[indices == 1] = 0  # expert 1 gets no rows
    g = group_slots(indices, experts)
    z, d = torch.randn(2 * tokens, rank), torch.randn(2 * tokens, cols)
    assert usable(z, d)
    for scale, transpose in ((1.0, False), (0.5, True)):
        out = rank_grad(z, d, g, scale, transpose)
        for e in range(experts):
            rows = g.order.new_tensor((g.expert == e).nonzero().flatten())
            want = scale * z[rows].double().t() @ d[rows].double()  # [r, N]
            got = out[e].t() if transpose else out[e]
            assert got.shape == (rank, cols), (got.shape, rank, cols)
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        assert out[1].abs().max() == 0
    x = torch.randn(tokens, cols)  # gathered: sorted row i reads x[g.token[i]]
    out = rank_grad(z, x, g, rows=g.token)
    for e in range(experts):
        rows = g.order.new_tensor((g.expert == e).nonzero().flatten())
        want = z[rows].double().t() @ x[g.token[rows]].double()
        torch.testing.assert_close(out[e].double(), want, rtol=1e-5, atol=1e-5)
    assert out[1].abs().max() == 0
print("ok")
"""


@INTERPRETER
def test_rank_grad_kernel_in_the_interpreter_matches_per_expert_float64_products() -> None:
    """Per expert z^T d over its sorted rows, in both output layouts and scaled: partial row steps, partial
    column blocks, ranks below the 16-wide tile and at 64, an expert without rows, and the wide rows gathered by
    token."""
    assert run_in_triton_interpreter(_RANK_GRAD_CHECK, timeout=600).strip() == "ok"
