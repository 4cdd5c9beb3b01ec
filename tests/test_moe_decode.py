"""The sync-free decode paths (all experts, chosen experts) compute the reference loop's function with no
data-dependent shapes, and ``auto`` picks between them by the token count."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
from helpers import interpreter_env

from Uni_MoE.model.moe import MoELayer, experts_reference, resolve_expert_implementation
from Uni_MoE.model.moe.chosen import experts_chosen
from Uni_MoE.model.moe.decode import experts_all_dense
from Uni_MoE.model.moe.grouped import experts_grouped

H, I = 24, 40


def make_layer(num_experts: int, top_k: int, expert_type: str, lora_r: int) -> MoELayer:
    """A float32 layer with non-zero LoRA B (a fresh LoRA is a no-op) and a router that never picks expert 0."""
    torch.manual_seed(0)
    layer = MoELayer(H, I, num_experts, top_k, expert_type=expert_type, lora_r=lora_r).eval()
    with torch.no_grad():
        layer.experts.reset_parameters(std=0.1)
        for p in layer.experts.lora_parameters():
            p.normal_(0.0, 0.1)
        layer.router.weight[0] = -1.0
    return layer


@pytest.mark.parametrize("expert_type", ["mlp", "shared"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("lora_r", [0, 4])
@pytest.mark.parametrize("tokens", [1, 7])
def test_all_dense_matches_reference(expert_type: str, top_k: int, lora_r: int, tokens: int) -> None:
    layer = make_layer(4, top_k, expert_type, lora_r)
    x = torch.rand(tokens, H)
    with torch.no_grad():
        layer(x[None])
        indices = layer.routing.view(tokens, top_k)
        assert not (indices == 0).any()  # an expert without tokens still gets zero weight
        weights = torch.softmax(torch.randn(tokens, top_k), dim=-1)
        expected = experts_reference(x, weights, indices, layer.experts)
        torch.testing.assert_close(experts_all_dense(x, weights, indices, layer.experts), expected)


def test_layer_picks_it_for_decoding_steps() -> None:
    layer = make_layer(4, 2, "mlp", 4)
    x = torch.rand(1, 3, H)
    with torch.no_grad():
        auto = layer(x)
        layer.implementation = "reference"
        torch.testing.assert_close(auto, layer(x))


def test_shapes_depend_only_on_the_token_count() -> None:
    """On the meta device (shapes, no values) the decode path runs; the reference loop, which sizes its work
    from the routing values (what forces a host sync on a GPU), cannot."""
    layer = make_layer(4, 2, "mlp", 4).to("meta")
    x = torch.empty(5, H, device="meta")
    weights = torch.empty(5, 2, device="meta")
    indices = torch.empty(5, 2, dtype=torch.long, device="meta")
    assert experts_all_dense(x, weights, indices, layer.experts).shape == (5, H)
    with pytest.raises((NotImplementedError, RuntimeError)):
        experts_reference(x, weights, indices, layer.experts)


@pytest.mark.parametrize("expert_type", ["mlp", "shared"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("lora_r", [0, 4])
@pytest.mark.parametrize("tokens", [1, 3])
def test_chosen_matches_reference(expert_type: str, top_k: int, lora_r: int, tokens: int) -> None:
    layer = make_layer(4, top_k, expert_type, lora_r)
    x = torch.rand(tokens, H)
    indices = torch.tensor([[2, 1], [3, 2], [1, 3]])[:tokens, :top_k]  # expert 0 unused, expert 2 shared
    weights = torch.softmax(torch.randn(tokens, top_k), dim=-1)
    with torch.no_grad():
        expected = experts_reference(x, weights, indices, layer.experts)
        torch.testing.assert_close(experts_chosen(x, weights, indices, layer.experts), expected)


def test_chosen_shapes_depend_only_on_the_token_count() -> None:
    layer = make_layer(4, 2, "mlp", 4).to("meta")
    x = torch.empty(2, H, device="meta")
    weights = torch.empty(2, 2, device="meta")
    indices = torch.empty(2, 2, dtype=torch.long, device="meta")
    with torch.no_grad():
        assert experts_chosen(x, weights, indices, layer.experts).shape == (2, H)


def test_auto_takes_the_chosen_path_while_pairs_are_few() -> None:
    """Without gradient: chosen experts while tokens x k <= 3/4 of the distinct expert MLPs, all experts
    beyond that and for experts sharing one base MLP."""
    mlp, shared = make_layer(4, 2, "mlp", 4).experts, make_layer(4, 2, "shared", 4).experts
    eight = make_layer(8, 2, "mlp", 0).experts
    with torch.no_grad():
        assert resolve_expert_implementation("auto", 1, mlp, 2) is experts_chosen
        assert resolve_expert_implementation("auto", 2, mlp, 2) is experts_all_dense
        assert resolve_expert_implementation("auto", 3, eight, 2) is experts_chosen
        assert resolve_expert_implementation("auto", 4, eight, 2) is experts_all_dense
        assert resolve_expert_implementation("auto", 1, shared, 2) is experts_all_dense
    assert resolve_expert_implementation("auto", 1, mlp, 2) is experts_grouped  # training keeps grouped


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_chosen_kernels_in_the_triton_interpreter_match_the_reference() -> None:
    """The GPU kernels (run by Triton's CPU interpreter, float32) give the reference loop's output, with
    row and column counts that are not multiples of their blocks."""
    code = """
import torch
from Uni_MoE.model.moe import MoELayer, experts_reference, gemv_kernels
from Uni_MoE.model.moe.chosen import experts_chosen
launched = []
launch = gemv_kernels._launch
gemv_kernels._launch = lambda *args: launched.append(1) or launch(*args)
torch.manual_seed(0)
for lora_r in (0, 4):
    layer = MoELayer(40, 203, 4, 2, lora_r=lora_r).eval()
    with torch.no_grad():
        for p in layer.experts.lora_parameters():
            p.normal_(0.0, 0.1)
        x, indices = torch.rand(2, 40), torch.tensor([[3, 1], [1, 2]])
        weights = torch.softmax(torch.randn(2, 2), dim=-1)
        torch.testing.assert_close(experts_chosen(x, weights, indices, layer.experts),
                                   experts_reference(x, weights, indices, layer.experts))
assert len(launched) == 4, launched
print("kernels match")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=interpreter_env(),
                            timeout=300)
    assert result.returncode == 0 and "kernels match" in result.stdout, result.stdout + result.stderr
