"""The fused LLaMA attention keeps transformers' parameters, keys, outputs and gradients, rotates in the
projections' layout when no cache is given, and its Triton rotary kernel (run by Triton's interpreter where
Triton is installed) equals transformers' rotary embedding both ways."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from transformers import LlamaConfig, LlamaModel
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import LlamaAttention

from helpers import run_in_triton_interpreter
from Uni_MoE.compat import CACHE_ARG
from Uni_MoE.model import attention
from Uni_MoE.model.attention import FusedLlamaAttention, fuse_attention
from Uni_MoE.model.retype import retype_modules
from Uni_MoE.model.rotary import apply_rotary


def _models() -> tuple[LlamaModel, LlamaModel]:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50, attn_implementation="sdpa")
    model = LlamaModel(config)
    fused = copy.deepcopy(model)
    assert fuse_attention(fused) == 2
    assert all(type(m) is not LlamaAttention for m in fused.modules())
    assert list(fused.state_dict()) == list(model.state_dict())
    return model, fused


@pytest.mark.parametrize("padded", [False, True])
def test_fused_attention_equals_transformers_in_training(padded: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    model, fused = _models()
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    if padded:
        mask[1, :3] = 0
    rotations = []
    monkeypatch.setattr(attention, "apply_rotary", lambda *a: rotations.append(a[0].shape) or apply_rotary(*a))
    ref = model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    out = fused(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    assert rotations == [torch.Size([2, 9, 4, 16])] * 2  # both layers rotated [B, S, heads, dim]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    grads = torch.autograd.grad(out.square().sum(), list(fused.parameters()))
    for ours, exp in zip(grads, torch.autograd.grad(ref.square().sum(), list(model.parameters()))):
        torch.testing.assert_close(ours, exp, rtol=0, atol=0)


def test_a_cache_runs_transformers_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    model, fused = _models()
    model.eval(), fused.eval()
    ids = torch.randint(0, 50, (2, 6))
    monkeypatch.setattr(attention, "apply_rotary", lambda *a: pytest.fail("fused rotary ran with a cache"))
    out = fused(input_ids=ids[:, :5], use_cache=True)
    ref = model(input_ids=ids[:, :5], use_cache=True)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state)
    step = fused(input_ids=ids[:, 5:], **{CACHE_ARG: getattr(out, CACHE_ARG)}).last_hidden_state
    expected = model(input_ids=ids[:, 5:], **{CACHE_ARG: getattr(ref, CACHE_ARG)}).last_hidden_state
    torch.testing.assert_close(step, expected)
    assert isinstance(fused.layers[0].self_attn, FusedLlamaAttention)


def test_torch_rotary_is_transformers_to_the_bit() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8)
    cos, sin = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    ours = apply_rotary(q, k, cos, sin)
    ref = modeling_llama.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b.transpose(1, 2), rtol=0, atol=0)


_KERNEL_CHECK = """
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from Uni_MoE.model import rotary, rotary_kernel

torch.manual_seed(0)
for batch, seq, hq, hk, dim, cos_batch in [(2, 5, 4, 2, 16, 2), (1, 3, 3, 3, 12, 1)]:
    q = torch.randn(batch, seq, hq, dim, requires_grad=True)
    k = torch.randn(batch, seq, hk, dim, requires_grad=True)
    cos, sin = torch.randn(cos_batch, seq, dim), torch.randn(cos_batch, seq, dim)
    assert rotary_kernel.usable(q, k, cos)
    ours = rotary.apply_rotary(q, k, cos, sin)
    ref = [t.transpose(1, 2) for t in apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
    gq, gk = torch.randn_like(ours[0]), torch.randn_like(ours[1])
    grads = torch.autograd.grad((ours[0] * gq).sum() + (ours[1] * gk).sum(), (q, k))
    expected = torch.autograd.grad((ref[0] * gq).sum() + (ref[1] * gk).sum(), (q, k))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b)
print("kernel matches")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_kernel_in_the_triton_interpreter_matches_transformers() -> None:
    assert "kernel matches" in run_in_triton_interpreter(_KERNEL_CHECK, timeout=600)


def test_retyping_needs_a_subclass() -> None:
    model, _ = _models()
    with pytest.raises(TypeError, match="must subclass LlamaAttention"):
        retype_modules(model, LlamaAttention, torch.nn.Linear)
    assert all(type(layer.self_attn) is LlamaAttention for layer in model.layers)
