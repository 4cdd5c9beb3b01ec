"""BEATs encoder and its Kaldi fbank front end: numerics, shapes, padding and safe checkpoint loading."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from Uni_MoE.model.encoders.beats import (
    BEATs,
    BEATsAttention,
    BEATsConfig,
    load_beats_checkpoint,
    relative_position_buckets,
)
from Uni_MoE.model.encoders.fbank import kaldi_fbank

SR = 16000


def tiny_config(**overrides) -> BEATsConfig:
    values = dict(encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128, encoder_attention_heads=4,
                  embed_dim=32, conv_pos=16, conv_pos_groups=4, encoder_layerdrop=0.0)
    return BEATsConfig(**{**values, **overrides})


def tone_and_noise(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    return 0.5 * np.sin(2 * np.pi * 440.0 * t) + 0.05 * rng.standard_normal(t.shape) + 0.01


def numpy_fbank(signal: np.ndarray, num_mel_bins: int = 128) -> np.ndarray:
    """Kaldi compute-fbank-feats with default options, written from its definition in float64."""
    window, shift, fft_size = 400, 160, 512
    count = 1 + (len(signal) - window) // shift
    frames = np.stack([signal[i * shift: i * shift + window] for i in range(count)])
    frames = frames - frames.mean(axis=1, keepdims=True)
    emphasised = frames.copy()
    emphasised[:, 1:] -= 0.97 * frames[:, :-1]
    emphasised[:, 0] -= 0.97 * frames[:, 0]
    n = np.arange(window)
    povey = (0.5 - 0.5 * np.cos(2 * np.pi * n / (window - 1))) ** 0.85
    power = np.abs(np.fft.rfft(emphasised * povey, n=fft_size)) ** 2

    def mel(f):
        return 1127.0 * np.log(1.0 + f / 700.0)

    low, high = mel(20.0), mel(SR / 2)
    step = (high - low) / (num_mel_bins + 1)
    banks = np.zeros((num_mel_bins, fft_size // 2 + 1))
    for m in range(num_mel_bins):
        left, centre, right = low + m * step, low + (m + 1) * step, low + (m + 2) * step
        for k in range(fft_size // 2):
            f = mel(k * SR / fft_size)
            if left < f <= centre:
                banks[m, k] = (f - left) / (centre - left)
            elif centre < f < right:
                banks[m, k] = (right - f) / (right - centre)
    return np.log(np.maximum(power @ banks.T, np.finfo(np.float32).eps))


def test_kaldi_fbank_matches_numpy_reference():
    signals = np.stack([tone_and_noise(1.0, seed=0), tone_and_noise(1.0, seed=1)[::-1]]) * 2**15
    ours = kaldi_fbank(torch.tensor(signals, dtype=torch.float32))
    assert ours.shape == (2, 1 + (SR - 400) // 160, 128)
    for row, signal in zip(ours, signals):
        np.testing.assert_allclose(row.double().numpy(), numpy_fbank(signal), atol=1e-3, rtol=0)


@pytest.mark.parametrize("samples", [400, 559, 560, 12345, 64000])
def test_kaldi_fbank_frame_count(samples):
    assert kaldi_fbank(torch.randn(1, samples)).shape == (1, 1 + (samples - 400) // 160, 128)


def test_kaldi_fbank_rejects_short_input():
    with pytest.raises(ValueError, match="at least 400 samples"):
        kaldi_fbank(torch.randn(1, 399))


def test_relative_position_buckets():
    buckets = relative_position_buckets(1000, num_buckets=320, max_distance=800)  # [query, key]
    assert buckets[0, 0] == 0 and buckets[5, 4] == 1 and buckets[4, 5] == 161
    assert buckets[0, 79] == 160 + 79 and buckets[79, 0] == 79
    assert buckets[0, 999] == 319 and buckets[999, 0] == 159
    assert (buckets.diff(dim=1)[0] >= 0).all()


def test_attention_matches_explicit_gated_softmax():
    config = tiny_config()
    table = torch.nn.Embedding(config.num_buckets, config.encoder_attention_heads)
    attention = BEATsAttention(config, table).eval()
    torch.nn.init.normal_(attention.grep_a, std=1.0)
    x, length = torch.randn(2, 7, 64), 7
    padding = torch.tensor([[False] * 7, [False] * 5 + [True] * 2])
    bias = table(relative_position_buckets(length, config.num_buckets, config.max_distance)).permute(2, 0, 1)

    def heads(t):
        return t.view(2, length, 4, 16).transpose(1, 2)  # (B, H, N, hd)

    q, k, v = heads(attention.q_proj(x)), heads(attention.k_proj(x)), heads(attention.v_proj(x))
    gate_a, gate_b = torch.sigmoid(attention.grep_linear(q).view(2, 4, length, 2, 4).sum(-1)).chunk(2, dim=-1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(16) + (gate_a * (gate_b * attention.grep_a - 1) + 2) * bias
    scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
    expected = attention.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, length, 64))
    torch.testing.assert_close(attention(x, bias, padding), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seconds, tokens", [(4, 24 * 8), (30, 187 * 8)])
def test_beats_output_shapes(seconds, tokens):
    model = BEATs(tiny_config()).eval()
    with torch.no_grad():
        features, mask = model(torch.randn(1, seconds * SR) * 0.1)
    assert features.shape == (1, tokens, 64) and mask is None
    assert torch.isfinite(features).all()


def test_padding_leaves_unpadded_sample_unchanged():
    model = BEATs(tiny_config()).eval()
    audio = torch.tensor(np.stack([tone_and_noise(4, 0), tone_and_noise(4, 1)]), dtype=torch.float32)
    padding = torch.zeros_like(audio, dtype=torch.bool)
    padding[1, 2 * SR:] = True
    audio[1, 2 * SR:] = audio[1, 2 * SR - 1]  # padded by repeating the last sample, as the data pipeline does
    with torch.no_grad():
        batch, batch_mask = model(audio, padding)
        alone, alone_mask = model(audio[:1], padding[:1])
        unmasked, _ = model(audio[:1])
    assert batch_mask.shape == (2, 192) and not batch_mask[0].any()
    assert batch_mask[1, 100:].all() and not batch_mask[1, :100].any()  # 2 s of 4 s, grouped as the original does
    torch.testing.assert_close(batch[0], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, unmasked)
    assert torch.isfinite(batch).all()


def test_checkpoint_round_trip(tmp_path):
    config = tiny_config()
    model = BEATs(config).eval()
    path = tmp_path / "beats.pt"
    torch.save({"cfg": {**config.to_dict(), "unused_option": 1}, "model": model.state_dict()}, path)
    loaded_config, _ = load_beats_checkpoint(path)
    assert loaded_config == config
    audio = torch.randn(2, 3 * SR) * 0.1
    with torch.no_grad():
        torch.testing.assert_close(BEATs.from_checkpoint(path)(audio)[0], model(audio)[0])


def test_checkpoint_shares_relative_bias_and_ignores_predictor(tmp_path):
    config = tiny_config(finetuned_model=True)
    model = BEATs(config)
    state = model.state_dict()
    table = "encoder.layers.{}.self_attn.relative_attention_bias.weight"
    assert table.format(0) in state and table.format(1) not in state  # saved once, no aliased tensors
    for i in range(1, config.encoder_layers):  # the release stores the shared table under every layer
        state[table.format(i)] = state[table.format(0)].clone()
    state["predictor.weight"], state["predictor.bias"] = torch.zeros(527, 64), torch.zeros(527)
    torch.save({"cfg": config.to_dict(), "model": state}, tmp_path / "finetuned.pt")
    loaded = BEATs.from_checkpoint(tmp_path / "finetuned.pt")
    torch.testing.assert_close(loaded.state_dict()[table.format(0)], state[table.format(0)])
    state[table.format(1)] += 1.0
    torch.save({"cfg": config.to_dict(), "model": state}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="differs from layer 0"):
        BEATs.from_checkpoint(tmp_path / "bad.pt")


def test_checkpoint_with_renamed_key_names_it(tmp_path):
    config = tiny_config()
    state = BEATs(config).state_dict()
    state["encoder.layers.1.fc_one.weight"] = state.pop("encoder.layers.1.fc1.weight")
    torch.save({"cfg": config.to_dict(), "model": state}, tmp_path / "renamed.pt")
    with pytest.raises(ValueError, match=r"encoder\.layers\.1\.fc1\.weight.*encoder\.layers\.1\.fc_one\.weight"):
        BEATs.from_checkpoint(tmp_path / "renamed.pt")


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    torch.save({"cfg": tiny_config().to_dict(), "model": {}, "payload": _RunsCode(str(marker))}, path)
    with pytest.raises(ValueError, match=str(path)):
        BEATs.from_checkpoint(path)
    assert not marker.exists()


def test_config_defaults_are_the_released_ones():
    config = BEATsConfig.from_dict({"encoder_layers": 12, "predictor_foo": 3})
    assert (config.encoder_embed_dim, config.encoder_attention_heads, config.encoder_ffn_embed_dim) == (768, 12, 3072)
    assert (config.num_buckets, config.max_distance, config.gru_rel_pos, config.deep_norm) == (320, 800, True, True)
    assert BEATsConfig.from_dict(config.to_dict()) == config
