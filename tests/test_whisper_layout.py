"""The Whisper encoder keeps its outputs when its hidden states are stored token-major, and its layers
then see contiguous states (transformers' permute otherwise hands them transposed strides)."""

from __future__ import annotations

import copy

import torch
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from Uni_MoE.model.encoders.whisper import store_states_token_major


def test_token_major_states_keep_outputs_and_are_contiguous() -> None:
    torch.manual_seed(0)
    config = WhisperConfig(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
                           num_mel_bins=8, max_source_positions=20)
    plain = WhisperEncoder(config).eval()
    fixed = copy.deepcopy(plain)
    store_states_token_major(fixed)
    seen = {}

    def record(name: str):
        def hook(_module, args, kwargs) -> None:
            seen[name] = (args[0] if args else kwargs["hidden_states"]).is_contiguous()
        return hook

    for name, model in (("plain", plain), ("fixed", fixed)):
        model.layers[0].register_forward_pre_hook(record(name), with_kwargs=True)
    features = torch.randn(3, 8, 40)
    out = fixed(features).last_hidden_state
    torch.testing.assert_close(out, plain(features).last_hidden_state)
    assert seen == {"plain": False, "fixed": True}
