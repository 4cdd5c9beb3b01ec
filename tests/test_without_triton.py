"""Installs without Triton (the CPU quickstart's ``train`` extra): the package imports and every MoE block runs
its PyTorch path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHECK = """
import sys
sys.modules["triton"] = None  # "import triton" now raises ImportError, as where it is not installed
import torch
import Uni_MoE  # the whole model stack, with every module that has Triton kernels
from Uni_MoE.model.moe import MoELayer, rank_grad_kernels, swiglu_lora_kernels
assert swiglu_lora_kernels.triton is None and rank_grad_kernels.triton is None
torch.manual_seed(0)
x = torch.rand(24, 16)
for expert_type in ("mlp", "shared"):
    layer = MoELayer(16, 40, 4, 2, expert_type=expert_type, lora_r=4)
    with torch.no_grad():
        for p in layer.experts.lora_parameters():
            p.normal_(0.0, 0.1)
    grads = []
    for implementation in ("reference", "grouped"):
        layer.implementation = implementation
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads.append([y.detach(), xi.grad, layer.experts.gate_lora_A.grad])
    for ref, ours in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
print("ok")
"""


def test_the_package_imports_and_the_moe_layer_runs_without_triton() -> None:
    result = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")
