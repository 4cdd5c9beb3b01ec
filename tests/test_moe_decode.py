"""The all-expert decode path computes the reference loop's function with no data-dependent shapes."""

from __future__ import annotations

import pytest
import torch

from Uni_MoE.model.moe import MoELayer, experts_reference
from Uni_MoE.model.moe.decode import experts_all_dense

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
