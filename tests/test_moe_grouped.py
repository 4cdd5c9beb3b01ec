"""The grouped MoE experts compute the reference loop's function: outputs and all gradients."""

from __future__ import annotations

import pytest
import torch

from Uni_MoE.model.moe import MoELayer, experts_reference, resolve_expert_implementation
from Uni_MoE.model.moe import grouped, segments
from Uni_MoE.model.moe.decode import experts_all_dense
from Uni_MoE.model.moe.grouped import experts_grouped
from Uni_MoE.model.moe.implementations import DECODE_TOKENS
from Uni_MoE.model.moe.lora_blocks import mix_slots

H, I, T = 32, 48, 40


@pytest.fixture(autouse=True, params=["lora_a_outside", "lora_a_in_block"])
def lora_a_place(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs with the distinct block's gate/up LoRA-A products computed outside it for all experts
    and, where there is no input dropout, inside it for each slot's own expert."""
    monkeypatch.setattr(grouped, "OWN_LORA_A_MIN_WIDTH", 10**9 if request.param == "lora_a_outside" else 1)
    return request.param


@pytest.fixture(autouse=True)
def no_reference_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused path must not hand SiLU experts to the loop it is compared with."""
    def refuse(*args: object) -> None:
        raise AssertionError("experts_grouped fell back to the reference loop")

    monkeypatch.setattr(grouped, "experts_reference", refuse)


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
@pytest.mark.parametrize("all_on_two", [False, True])
def test_function_matches_reference_with_weight_grads(
    expert_type: str, use_grouped_mm: bool, all_on_two: bool, monkeypatch: pytest.MonkeyPatch
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
    if all_on_two:
        indices = torch.tensor([[3, 5]]).repeat(T, 1)  # six of eight experts empty
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


def test_auto_uses_grouped_except_for_decoding_sizes() -> None:
    assert resolve_expert_implementation("auto") is experts_grouped
    layer = MoELayer(H, I, 4, 2)
    assert resolve_expert_implementation(layer.implementation, 8) is experts_grouped
    assert resolve_expert_implementation(layer.implementation, 1) is experts_grouped  # training keeps grouped
    with torch.no_grad():
        assert resolve_expert_implementation(layer.implementation, 1) is experts_all_dense
        assert resolve_expert_implementation(layer.implementation, DECODE_TOKENS) is experts_all_dense
        assert resolve_expert_implementation(layer.implementation, DECODE_TOKENS + 1) is experts_grouped
        assert resolve_expert_implementation("grouped", 1) is experts_grouped


class _Block(torch.nn.Module):
    """experts_grouped as a module, so functional_call can feed its LoRA factors as gradcheck inputs."""

    def __init__(self, experts: torch.nn.Module, indices: torch.Tensor) -> None:
        super().__init__()
        self.experts, self.indices = experts, indices

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(0)  # the same dropout masks on every call
        return experts_grouped(x, w, self.indices, self.experts)


@pytest.mark.parametrize("expert_type", ["mlp", "shared"])
def test_gradients_with_lora_dropout_pass_gradcheck(expert_type: str) -> None:
    """Training mode with LoRA dropout (masks drawn inside the fused block): float64 gradcheck of x, the
    routing weights and every LoRA factor."""
    torch.manual_seed(2)
    experts = MoELayer(8, 16, 4, 2, expert_type=expert_type, lora_r=2, lora_dropout=0.3).experts.double()
    for p in experts.base_parameters():
        p.requires_grad_(False)
    block = _Block(experts, torch.tensor([[0, 1], [1, 2], [1, 3], [3, 1], [2, 0], [1, 0]])).train()
    names = [f"experts.{p}_lora_{ab}" for p in ("gate", "up", "down") for ab in "AB"]
    lora = [torch.randn_like(block.get_parameter(n)) * 0.3 for n in names]
    x = torch.randn(6, 8, dtype=torch.float64)
    w = torch.rand(6, 2, dtype=torch.float64)

    def fn(x: torch.Tensor, w: torch.Tensor, *factors: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(block, dict(zip(names, factors)), (x, w))

    inputs = tuple(t.requires_grad_(True) for t in (x, w, *lora))
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
    dropped = fn(*inputs)
    block.eval()
    assert not torch.allclose(dropped, fn(*inputs))  # dropout really acted in training mode


def test_eval_mode_ignores_lora_dropout() -> None:
    layer = MoELayer(H, I, 4, 2, lora_r=4, lora_dropout=0.5).eval()
    with torch.no_grad():
        for p in layer.experts.lora_parameters():
            p.normal_(0.0, 0.1)
    x = torch.randn(T, H)
    w, idx = torch.rand(T, 2), torch.stack([torch.zeros(T, dtype=torch.long), torch.ones(T, dtype=torch.long)], 1)
    assert_close(experts_grouped(x, w, idx, layer.experts), experts_reference(x, w, idx, layer.experts))


def test_other_activations_use_the_reference_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(grouped, "experts_reference", lambda *args: calls.append(args) or args[0])
    layer = MoELayer(H, I, 4, 2, hidden_act="gelu")
    layer(torch.randn(1, 3, H))
    assert len(calls) == 1


@pytest.mark.parametrize("expert_type", ["mlp", "shared"])
def test_autocast_computes_in_its_dtype_and_grads_reach_fp32_parameters(expert_type: str) -> None:
    layer = make_layer(4, 2, expert_type, lora_r=8)
    x = torch.rand(2, T // 2, H)
    ref = run_layer(layer, x, "reference")
    layer.implementation = "grouped"
    layer.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(xg)
    assert y.dtype == torch.bfloat16
    probe = torch.linspace(-1.0, 1.0, y.numel()).view_as(y)
    ((y.float() * probe).sum() + 0.01 * layer.aux_loss).backward()
    ours = {"y": y.float(), "dx": xg.grad, "experts.up_lora_B": layer.experts.up_lora_B.grad}
    for name, value in ours.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, ref[name], rtol=0.05, atol=0.05 * ref[name].abs().max().item())


@pytest.mark.parametrize("expert_type", ["mlp", "shared"])
def test_activation_checkpointing_recomputes_the_fused_block(expert_type: str) -> None:
    """The block's I-wide intermediates go through the saved-tensor hooks (so checkpointing can drop and
    recompute them), and gradients under non-reentrant checkpointing are unchanged."""
    layer = make_layer(4, 2, expert_type, lora_r=4)
    x = torch.rand(2, T // 2, H)
    plain = run_layer(layer, x, "grouped")
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.shape) or t, lambda t: t):
        layer(x)
    rows = 2 * T if expert_type == "mlp" else T  # pre-activation gate of every slot, or of every token
    assert torch.Size([rows, I]) in packed
    layer.zero_grad(set_to_none=True)
    xc = x.clone().requires_grad_(True)
    y = torch.utils.checkpoint.checkpoint(layer, xc, use_reentrant=False)
    probe = torch.linspace(-1.0, 1.0, y.numel()).view_as(y)
    ((y * probe).sum() + 0.01 * layer.aux_loss).backward()
    assert_close(xc.grad, plain["dx"])
    for name, p in layer.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, plain[name])


@pytest.mark.parametrize("expert_type", ["mlp", "shared"])
def test_no_tokens(expert_type: str) -> None:
    layer = make_layer(4, 2, expert_type, lora_r=4)
    out = run_layer(layer, torch.rand(1, 0, H), "grouped")
    assert out["y"].shape == (1, 0, H) and out["dx"].shape == (1, 0, H)
    assert float(out["experts.gate_lora_B"].abs().sum()) == 0.0


@pytest.mark.parametrize("expert_type", ["mlp", "shared"])
@pytest.mark.parametrize("lora_dropout", [0.0, 0.3])
@pytest.mark.parametrize("train_down_base", [False, True])
def test_recompute_projections_keeps_no_gate_up_and_gives_the_same_gradients(
    expert_type: str, lora_dropout: float, train_down_base: bool
) -> None:
    """``recompute_projections``: no [slots or tokens, I] float tensor is kept for backward (the dropout mask on
    the down LoRA's input stays), and output and every gradient equal the keeping block's bit for bit, with
    the dropout masks and with a trainable down base (whose gradient reads the activation again)."""
    torch.manual_seed(3)
    layer = MoELayer(H, I, 4, 2, expert_type=expert_type, lora_r=4, lora_dropout=lora_dropout).train()
    with torch.no_grad():
        for p in layer.experts.lora_parameters():
            p.normal_(0.0, 0.1)
    for p in layer.experts.base_parameters():
        p.requires_grad_(False)
    layer.experts.down_proj.requires_grad_(train_down_base)
    x = torch.rand(2, T // 2, H)

    def run(recompute: bool) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        layer.experts.recompute_projections = recompute
        kept: list[torch.Tensor] = []
        torch.manual_seed(4)  # the same dropout masks in both runs
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            out = run_layer(layer, x, "grouped")
        return out, kept

    keeping, kept_keeping = run(False)
    recomputing, kept_recomputing = run(True)
    for name, value in keeping.items():
        assert torch.equal(recomputing[name], value), name

    def wide(kept: list[torch.Tensor]) -> int:
        return sum(t.is_floating_point() and t.dim() == 2 and t.shape[1] == I for t in kept)

    assert wide(kept_keeping) >= 2 and wide(kept_recomputing) == wide(kept_keeping) - 2


@pytest.mark.parametrize("grouped_mm", [True, False])
def test_segment_products_equal_per_expert_products(grouped_mm: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """segment_mm (rows times their expert's factor, here a transposed view as the shared block passes it) and
    segment_mm_tn against a loop over experts, with an expert that has no rows, through torch's grouped GEMM and
    through the padded bmm."""
    if not grouped_mm:
        monkeypatch.setattr(segments, "_use_grouped_mm", lambda *tensors: False)
    torch.manual_seed(0)
    indices = torch.randint(0, 4, (30, 2))
    indices[indices == 2] = 3
    g = segments.group_slots(indices, 4)
    a, b, c = torch.randn(60, 24), torch.randn(4, 5, 24), torch.randn(60, 5)
    rows = [g.expert == e for e in range(4)]
    want = torch.zeros(60, 5)
    for e, r in enumerate(rows):
        want[r] = a[r] @ b[e].t()
    torch.testing.assert_close(segments.segment_mm(a, b.transpose(1, 2), g), want)
    tn = segments.segment_mm_tn(a, c, g)
    for e, r in enumerate(rows):
        torch.testing.assert_close(tn[e], a[r].t() @ c[r])
    assert tn[2].abs().max() == 0


def test_expert_products_one_gemm_per_expert_equal_the_grouped_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """From PER_EXPERT_MIN_SLOTS slot rows and PER_EXPERT_MIN_ROWS an expert on average the bases' products run one
    GEMM per expert on its row slice (two pairs accumulated into one tensor), with the counts copied to the host once;
    the same products as the grouped GEMMs, an expert without rows included."""
    torch.manual_seed(0)
    indices = torch.randint(0, 4, (30, 2))
    indices[indices == 2] = 3
    g = segments.group_slots(indices, 4)
    a, b = torch.randn(60, 24), torch.randn(60, 16)
    wa, wb = torch.randn(4, 24, 5), torch.randn(4, 16, 5)
    assert not segments.per_expert_pays(60, g)
    grouped_terms = segments.expert_products([(a, wa), (b, wb)], g)
    assert len(grouped_terms) == 2 and g.host_counts is None  # no host copy for the grouped GEMMs
    monkeypatch.setattr(segments, "PER_EXPERT_MIN_SLOTS", 60)
    monkeypatch.setattr(segments, "PER_EXPERT_MIN_ROWS", 16)
    assert not segments.per_expert_pays(60, g)  # 15 rows an expert on average
    monkeypatch.setattr(segments, "PER_EXPERT_MIN_ROWS", 15)
    assert segments.per_expert_pays(60, g) and not segments.per_expert_pays(59, g)
    (summed,) = segments.expert_products([(a, wa), (b, wb)], g)
    torch.testing.assert_close(summed, grouped_terms[0] + grouped_terms[1])
    assert g.host_counts == [int(c) for c in torch.bincount(indices.flatten(), minlength=4)] and g.host_counts[2] == 0
    (single,) = segments.expert_products([(a, wa)], g)
    torch.testing.assert_close(single, grouped_terms[0])


@pytest.mark.parametrize("recompute", [False, True])
def test_block_with_one_gemm_per_expert_matches_reference(recompute: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The distinct block with every base product as one GEMM per expert (forward, recomputed projections, d h
    and the input gradient) against the reference loop: output and every gradient."""
    monkeypatch.setattr(segments, "PER_EXPERT_MIN_SLOTS", 1)
    monkeypatch.setattr(segments, "PER_EXPERT_MIN_ROWS", 1)
    layer = make_layer(4, 2, "mlp", lora_r=4)
    layer.experts.recompute_projections = recompute
    x = torch.rand(2, T // 2, H)
    ref = run_layer(layer, x, "reference")
    copies = []  # per call for host counts: whether it had to copy them
    counts_on_host = segments.SlotGrouping.counts_on_host
    monkeypatch.setattr(segments.SlotGrouping, "counts_on_host",
                        lambda g: copies.append(g.host_counts is None) or counts_on_host(g))
    ours = run_layer(layer, x, "grouped")
    products = 7 if recompute else 5  # gate, up, down; d h, (gate, up again,) the input gradient
    assert copies == [True] + [False] * (products - 1)  # one copy for the forward and the backward
    assert set(ours) == set(ref)
    for name in ref:
        assert_close(ours[name], ref[name])


def test_mix_slots_puts_each_weighted_slot_in_its_experts_block() -> None:
    """[T, k, r] down LoRA-A outputs -> [T, E*r]: w_j zd_j in block e_j, zeros in the other blocks."""
    zd = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]])  # T=2, k=2, r=2
    weights = torch.tensor([[0.5, 0.25], [2.0, 1.0]])
    indices = torch.tensor([[2, 0], [1, 2]])  # E=3
    expected = torch.tensor([[0.75, 1.0, 0.0, 0.0, 0.5, 1.0], [0.0, 0.0, 10.0, 12.0, 7.0, 8.0]])
    assert torch.equal(mix_slots(zd, weights, indices, 3), expected)


@pytest.mark.parametrize("lora_dropout", [0.0, 0.2])
def test_lora_a_products_run_where_the_place_says(lora_a_place: str, lora_dropout: float,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Without input dropout the blocks take the LoRA-A factors: the shared block always, distinct experts from
    OWN_LORA_A_MIN_WIDTH (here 1 or never); with dropout the activations come from outside."""
    calls = []
    outside = grouped._lora_input_acts
    monkeypatch.setattr(grouped, "_lora_input_acts", lambda *args: calls.append(1) or outside(*args))
    for expert_type in ("mlp", "shared"):
        layer = MoELayer(H, I, 4, 2, expert_type=expert_type, lora_r=4, lora_dropout=lora_dropout)
        with torch.no_grad():
            layer.experts.up_lora_B.normal_(0.0, 0.1)
        layer(torch.randn(T, H)).sum().backward()
        own = expert_type == "mlp" and lora_dropout == 0.0 and lora_a_place == "lora_a_in_block"
        assert grouped.own_lora_a_pays(layer.experts) == own
        in_block = own or (expert_type == "shared" and lora_dropout == 0.0)
        assert len(calls) == (0 if in_block else 1), (expert_type, calls)
        assert layer.experts.gate_lora_A.grad is not None and layer.experts.up_lora_A.grad.abs().sum() > 0
        calls.clear()
