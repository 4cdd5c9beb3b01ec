"""The fused LoRA linear keeps PEFT's parameters and keys and equals PEFT's forward and gradients (same
dropout masks), adds the update inside one addmm, and leaves the cases it does not cover to PEFT."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from Uni_MoE.train.lora_linear import FusedLoraLinear, fuse_lora


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(16, 24)
        self.o = nn.Linear(24, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.tanh(self.q(x)))


def _pair(dropout: float = 0.3) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = _Block().double()
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q", "o"]), model)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; a random B makes the update visible
            nn.init.normal_(p)
    fused = copy.deepcopy(model)
    assert fuse_lora(fused) == 2 and isinstance(fused.q, FusedLoraLinear)
    assert list(fused.state_dict()) == list(model.state_dict())
    return model, fused


def _run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(1)
    out = model(x)
    trained = [p for p in model.parameters() if p.requires_grad]
    return out, list(torch.autograd.grad(out.square().sum(), [x, *trained]))


@pytest.mark.parametrize("training", [True, False])
def test_fused_equals_peft(training: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    model, fused = _pair()
    model.train(training), fused.train(training)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    ref, ref_grads = _run(model, x)
    calls = []
    addmm = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: calls.append(k["alpha"]) or addmm(*a, **k))
    out, grads = _run(fused, x)
    assert calls == [2.0, 2.0]  # both layers, alpha / r
    torch.testing.assert_close(out, ref)
    for ours, exp in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(ours, exp)


def test_cases_beyond_one_plain_adapter_run_peft(monkeypatch: pytest.MonkeyPatch) -> None:
    model, fused = _pair(dropout=0.0)
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: pytest.fail("fused path ran"))
    x = torch.randn(2, 16, dtype=torch.float64)
    fused.q.merge()
    model.q.merge()
    torch.testing.assert_close(fused.q(x), model.q(x))
    fused.q.unmerge()
    fused.q.enable_adapters(False)
    torch.testing.assert_close(fused.q(x), fused.q.base_layer(x))
    fused.q.enable_adapters(True)
    assert fused.q._plain_adapter(x.float()) is None  # dtype differs from the weights
    fused.q.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused.q._plain_adapter(x.float()) is None
    assert fused.q._plain_adapter(x.float()) == "default"
    fused.q.lora_B["default"].weight.ds_id = 0  # how DeepSpeed ZeRO-3 marks a partitioned parameter
    assert fused.q._plain_adapter(x.float()) is None
