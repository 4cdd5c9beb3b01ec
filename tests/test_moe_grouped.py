"""The grouped MoE experts compute the reference loop's function: outputs and all gradients."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from Uni_MoE.model.moe import MoELayer, experts_reference, resolve_expert_implementation
from Uni_MoE.model.moe import grouped, segments
from Uni_MoE.model.moe.grouped import experts_grouped

H, I, T = 32, 48, 40
ROOT = Path(__file__).resolve().parents[1]


def make_layer(num_experts: int, top_k: int, expert_type: str, lora_r: int, seed: int = 0) -> MoELayer:
    """A float32 stage-3-style layer with non-zero LoRA B, frozen bases and a skewed router:
    expert 0 is never chosen and expert 1 takes most first choices (inputs are positive)."""
    torch.manual_seed(seed)
    layer = MoELayer(H, I, num_experts, top_k, expert_type=expert_type, lora_r=lora_r, lora_alpha=16)
    with torch.no_grad():
        layer.experts.reset_parameters(std=0.1)
        for p in layer.experts.lora_parameters():
            p.normal_(0.0, 0.1)
        layer.router.weight.normal_(0.0, 0.1)
        layer.router.weight[0] = -1.0
        layer.router.weight[1] += 0.05
    for p in layer.experts.base_parameters():
        p.requires_grad_(False)
    return layer


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item() + 1e-12)


def run_layer(layer: MoELayer, x: torch.Tensor, implementation: str) -> dict[str, torch.Tensor]:
    """Output and the gradients of x, router and LoRA under a loss that weights every output element."""
    layer.implementation = implementation
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = layer(x)
    probe = torch.linspace(-1.0, 1.0, y.numel()).view_as(y)
    ((y * probe).sum() + 0.01 * layer.aux_loss).backward()
    grads = {name: p.grad for name, p in layer.named_parameters() if p.requires_grad}
    return {"y": y.detach(), "dx": x.grad, **grads}


@pytest.mark.parametrize("expert_type", ["mlp", "shared"])
@pytest.mark.parametrize("num_experts", [4, 8])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("lora_r", [0, 4])
def test_layer_matches_reference(expert_type: str, num_experts: int, top_k: int, lora_r: int) -> None:
    layer = make_layer(num_experts, top_k, expert_type, lora_r)
    x = torch.rand(2, T // 2, H)
    ref = run_layer(layer, x, "reference")
    ours = run_layer(layer, x, "grouped")
    counts = torch.bincount(layer.routing.flatten(), minlength=num_experts)
    assert counts[0] == 0 and counts[1] == counts.max()  # an empty expert and an uneven load
    assert set(ours) == set(ref) and "router.weight" in ours
    if lora_r:
        assert {"experts.gate_lora_A", "experts.down_lora_B"} <= set(ours)
    for name in ref:
        assert_close(ours[name], ref[name])


@pytest.mark.parametrize("expert_type", ["mlp", "shared"])
@pytest.mark.parametrize("use_grouped_mm", [True, False])
def test_function_matches_reference_with_weight_grads(
    expert_type: str, use_grouped_mm: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Direct call with trainable bases too, through grouped_mm and through the padded-bmm fallback."""
    if not use_grouped_mm:
        monkeypatch.setattr(segments, "_grouped_mm_works", lambda device_type, dtype: False)
    layer = make_layer(8, 2, expert_type, lora_r=4, seed=1)
    experts = layer.experts
    for p in experts.base_parameters():
        p.requires_grad_(True)
    x = torch.randn(T, H)
    indices = torch.stack([torch.randint(1, 8, (T,)), torch.full((T,), 3)], dim=1)
    indices[:, 1] = torch.where(indices[:, 0] == 3, 5, 3)  # distinct choices, expert 0 unused, 3 overloaded
    weights = torch.rand(T, 2)
    results = []
    for fn in (experts_reference, experts_grouped):
        experts.zero_grad(set_to_none=True)
        xi, wi = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        y = fn(xi, wi, indices, experts)
        y.pow(2).sum().backward()
        results.append([y, xi.grad, wi.grad, *(p.grad for p in experts.parameters())])
    for ours, ref in zip(results[1], results[0]):
        assert_close(ours, ref)


def test_auto_uses_grouped() -> None:
    assert resolve_expert_implementation("auto") is experts_grouped
    layer = MoELayer(H, I, 4, 2)
    assert resolve_expert_implementation(layer.implementation) is experts_grouped


def test_benchmark_smoke() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "moe_layer.py"), "--device", "cpu", "--small", "--reps", "2"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert "| shared (1×dense) | 4 | 8 | 64 |" in result.stdout
