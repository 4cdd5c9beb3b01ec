"""The fused RMSNorm keeps transformers' parameters, keys and CPU results, and torch's fused function
(what it runs on CUDA) computes LLaMA's RMSNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaModel
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from Uni_MoE.model.rms_norm import FusedRMSNorm, fuse_rms_norms


def test_fused_function_is_llamas_rms_norm() -> None:
    torch.manual_seed(0)
    norm = LlamaRMSNorm(16, eps=1e-5)  # float32: transformers' RMSNorm computes in float32 at any dtype
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 16) * 3
    torch.testing.assert_close(F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon), norm(x))


def test_fusing_keeps_keys_and_outputs() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=50)
    model = LlamaModel(config).eval()
    ids = torch.randint(0, 50, (2, 7))
    before, keys = model(input_ids=ids).last_hidden_state, list(model.state_dict())
    assert fuse_rms_norms(model) == 2 * 2 + 1
    assert all(type(m) is not LlamaRMSNorm for m in model.modules())
    assert isinstance(model.norm, FusedRMSNorm) and list(model.state_dict()) == keys
    torch.testing.assert_close(model(input_ids=ids).last_hidden_state, before)
