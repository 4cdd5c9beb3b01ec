"""The Whisper encoder keeps its outputs when its hidden states are stored token-major and its attention reads
views of the projections, its layers then see contiguous states (transformers' permute otherwise hands them
transposed strides), and its attention makes no copies of q, k, v or its output; likewise the speech aligner's
Whisper decoder."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperDecoder, WhisperEncoder

from Uni_MoE.model.encoders.whisper import TokenMajorWhisperAttention, attend_without_copies, store_states_token_major

COPIES = (torch.ops.aten.clone.default, torch.ops.aten.copy_.default)


class CountCopies(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.count += func in COPIES
        return func(*args, **(kwargs or {}))


def encoders(implementation: str) -> tuple[WhisperEncoder, WhisperEncoder]:
    torch.manual_seed(0)
    config = WhisperConfig(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
                           num_mel_bins=8, max_source_positions=20, attn_implementation=implementation)
    plain = WhisperEncoder(config).eval()
    fixed = copy.deepcopy(plain)
    store_states_token_major(fixed)
    return plain, fixed


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_token_major_states_keep_outputs_and_are_contiguous(implementation: str) -> None:
    plain, fixed = encoders(implementation)
    assert all(type(layer.self_attn) is TokenMajorWhisperAttention for layer in fixed.layers)
    seen = {}

    def record(name: str):
        def hook(_module, args, kwargs) -> None:
            seen[name] = (args[0] if args else kwargs["hidden_states"]).is_contiguous()
        return hook

    for name, model in (("plain", plain), ("fixed", fixed)):
        model.layers[0].register_forward_pre_hook(record(name), with_kwargs=True)
    features = torch.randn(3, 8, 40)
    copies = {}
    for name, model in (("plain", plain), ("fixed", fixed)):
        with torch.no_grad(), CountCopies() as counter:
            model(features)
        copies[name] = counter.count
    out = fixed(features).last_hidden_state
    torch.testing.assert_close(out, plain(features).last_hidden_state)
    assert seen == {"plain": False, "fixed": True}
    if implementation == "sdpa":  # eager attention's batched matmuls copy strided operands either way
        assert copies["fixed"] == 1  # the convolution's output, made token-major once
        assert copies["plain"] >= 1 + 3 * len(plain.layers)  # transformers copies q, k and v in every layer


@pytest.mark.parametrize("use_cache", [False, True])
def test_aligner_decoder_keeps_outputs_without_copies(use_cache: bool) -> None:
    """The speech aligner's Whisper decoder (causal self-attention over the queries, cross-attention to the
    encoder states) gives transformers' outputs; without a cache, as the aligner runs it, on views, and with
    one through transformers' forward."""
    torch.manual_seed(0)
    config = WhisperConfig(d_model=32, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64,
                           max_target_positions=16, attn_implementation="sdpa")
    plain = WhisperDecoder(config).eval()
    fixed = copy.deepcopy(plain)
    assert attend_without_copies(fixed) == 4  # two layers: self- and cross-attention
    queries, states = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    outputs, copies = [], []
    for model in (plain, fixed):
        with torch.no_grad(), CountCopies() as counter:
            outputs.append(model(inputs_embeds=queries, encoder_hidden_states=states,
                                 use_cache=use_cache).last_hidden_state)
        copies.append(counter.count)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    if not use_cache:
        assert copies[1] + 4 * 3 <= copies[0]  # q, k and v of every attention are no longer copied
