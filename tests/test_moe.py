import math

import torch
import torch.nn.functional as F

from Uni_MoE.model.moe import MoELayer, balance_loss, experts_reference, route_tokens
from Uni_MoE.model.moe.router_logits import HalfInputLogits


def test_route_tokens_on_a_hand_made_example():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0], [0.0, 3.0, 3.0 - math.log(3.0), 0.0]])
    weights, indices = route_tokens(logits, top_k=2)
    assert indices.tolist() == [[0, 2], [1, 2]]
    # softmax over the two chosen logits: e^2/(e^2+e^1) and e^3/(e^3+e^3/3) = 3/4
    assert torch.allclose(weights[0], torch.tensor([math.e / (math.e + 1), 1 / (math.e + 1)]))
    assert torch.allclose(weights[1], torch.tensor([0.75, 0.25]))
    # equals the full softmax renormalised over the chosen pair
    full = F.softmax(logits, -1).gather(-1, indices)
    assert torch.allclose(weights, full / full.sum(-1, keepdim=True))


def test_second_expert_sampling_keeps_top1_and_picks_another():
    logits = torch.randn(500, 8)
    _, idx = route_tokens(logits, 2, second_expert_sampling=True)
    assert torch.equal(idx[:, 0], logits.argmax(-1))
    assert (idx[:, 0] != idx[:, 1]).all()


def test_balance_loss_hand_worked():
    # 2 experts, 2 tokens; token probs (0.75, 0.25) and (0.5, 0.5) -> me = (0.625, 0.375)
    # top-1 of both tokens is expert 0 (the tie breaks to the lower index) -> ce = (1, 0)
    # loss = mean(me * ce) * E * E = (0.625 / 2) * 4 = 1.25
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    indices = torch.tensor([[0, 1], [0, 1]])
    assert torch.isclose(balance_loss(logits, indices, 2), torch.tensor(1.25))
    # a uniform router over evenly split tokens gives exactly 1
    uniform = torch.zeros(4, 4)
    assert torch.isclose(balance_loss(uniform, torch.tensor([[0], [1], [2], [3]]), 4), torch.tensor(1.0))


def _dense_mlp(x, gate, up, down):
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def test_reference_matches_per_token_brute_force():
    layer = MoELayer(16, 32, num_experts=4, top_k=2, lora_r=4, lora_alpha=8)
    layer.experts.reset_parameters(0.1)
    for p in layer.experts.lora_parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(3, 5, 16)
    y = layer(x).reshape(-1, 16)
    ex = layer.experts
    logits = x.reshape(-1, 16) @ layer.router.weight.T
    w, idx = route_tokens(logits, 2)
    for t, xt in enumerate(x.reshape(-1, 16)):
        want = torch.zeros(16)
        for j in range(2):
            e = int(idx[t, j])
            g = xt @ ex.gate_proj[e].T + 2.0 * xt @ ex.gate_lora_A[e].T @ ex.gate_lora_B[e].T
            u = xt @ ex.up_proj[e].T + 2.0 * xt @ ex.up_lora_A[e].T @ ex.up_lora_B[e].T
            h = F.silu(g) * u
            want += w[t, j] * (h @ ex.down_proj[e].T + 2.0 * h @ ex.down_lora_A[e].T @ ex.down_lora_B[e].T)
        assert torch.allclose(y[t], want, atol=1e-5)
    assert layer.routing.shape == (3, 5, 2)
    assert layer.aux_loss.ndim == 0


def test_identical_experts_without_lora_equal_the_dense_mlp():
    layer = MoELayer(16, 32, num_experts=4, top_k=2)
    gate, up, down = torch.randn(32, 16), torch.randn(32, 16), torch.randn(16, 32)
    layer.experts.load_dense_mlps([{"gate_proj.weight": gate, "up_proj.weight": up, "down_proj.weight": down}] * 4)
    x = torch.randn(10, 16)
    assert torch.allclose(layer(x[None])[0], _dense_mlp(x, gate, up, down), atol=1e-5)


def test_reference_skips_experts_without_tokens():
    layer = MoELayer(8, 16, num_experts=4, top_k=1, expert_type="shared", lora_r=2)
    x = torch.randn(6, 8)
    indices = torch.zeros(6, 1, dtype=torch.long)
    out = experts_reference(x, torch.ones(6, 1), indices, layer.experts)
    assert torch.allclose(out, layer.experts.expert_forward(0, x))


def test_router_logits_stay_float32_under_autocast():
    """Autocast must not run the router in bf16: near-tied expert choices would flip."""
    torch.manual_seed(0)
    layer = MoELayer(64, 96, 8, 2)
    x = torch.randn(2, 16, 64)
    expected = x.reshape(-1, 64).double() @ layer.router.weight.double().t()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer.router_logits(x.reshape(-1, 64))
        layer(x)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(layer.routing.reshape(-1, 2), route_tokens(expected.float(), 2)[1])


def test_half_input_router_logits_match_float64_with_gradients():
    """The bf16-input router function (its CUDA path; here the logits from float32 products): float32
    logits and gradients within bf16 rounding of float64."""
    torch.manual_seed(0)
    x = torch.randn(37, 64).bfloat16().requires_grad_()
    weight = (torch.randn(6, 64) * 0.1).bfloat16().requires_grad_()
    grad = torch.randn(37, 6)
    logits = HalfInputLogits.apply(x, weight)
    logits.backward(grad)
    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    (x64 @ w64.t()).backward(grad.double())
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), x64.detach() @ w64.detach().t(), rtol=1e-6, atol=1e-6)
    assert x.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=2**-8, atol=1e-6)  # one bf16 rounding step
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=2**-7, atol=1e-6)  # hi and lo rounded apart
