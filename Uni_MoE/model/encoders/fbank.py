"""Kaldi-compatible log-mel filter bank in pure torch, batched.

BEATs was trained on `torchaudio.compliance.kaldi.fbank` features; this module computes the same
numbers (povey window, pre-emphasis 0.97, DC removal, snip_edges framing, power spectrum, 20 Hz to
Nyquist mel banks, log floored at float32 eps, no dither) without depending on torchaudio.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PREEMPHASIS = 0.97
POVEY_EXPONENT = 0.85
LOW_FREQ_HZ = 20.0
LOG_FLOOR = torch.finfo(torch.float32).eps


def mel_scale(freq_hz: Tensor) -> Tensor:
    """Kaldi's mel scale: 1127 ln(1 + f / 700)."""
    return 1127.0 * torch.log1p(freq_hz / 700.0)


def mel_banks(num_mel_bins: int, fft_size: int, sample_rate: int) -> Tensor:
    """Triangular filters, equally spaced on the mel scale, over the rfft bins: (num_mel_bins, fft_size // 2 + 1).

    The Nyquist bin gets zero weight, as in Kaldi.
    """
    half = fft_size // 2
    mel_low = mel_scale(torch.tensor(LOW_FREQ_HZ, dtype=torch.float64))
    mel_high = mel_scale(torch.tensor(sample_rate / 2.0, dtype=torch.float64))
    step = (mel_high - mel_low) / (num_mel_bins + 1)
    left = mel_low + step * torch.arange(num_mel_bins, dtype=torch.float64)[:, None]  # (M, 1)
    centre, right = left + step, left + 2 * step
    bin_mel = mel_scale(torch.arange(half, dtype=torch.float64) * (sample_rate / fft_size))[None, :]  # (1, half)
    rising = (bin_mel - left) / (centre - left)
    falling = (right - bin_mel) / (right - centre)
    weights = torch.clamp(torch.minimum(rising, falling), min=0.0)  # (M, half)
    return torch.nn.functional.pad(weights, (0, 1)).to(torch.float32)  # (M, half + 1)


def povey_window(length: int) -> Tensor:
    """Kaldi's default window: a symmetric Hann window raised to the power 0.85."""
    n = torch.arange(length, dtype=torch.float64)
    hann = 0.5 - 0.5 * torch.cos(2 * math.pi * n / (length - 1))
    return hann.pow(POVEY_EXPONENT).to(torch.float32)


def kaldi_fbank(
    waveforms: Tensor,
    sample_rate: int = 16000,
    num_mel_bins: int = 128,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
) -> Tensor:
    """Log mel filter bank energies of a batch of waveforms: (B, S) -> (B, T, num_mel_bins).

    T = 1 + (S - window) // shift. Computed in float32 whatever the input dtype, because low
    precision would wreck the log energies.
    """
    if waveforms.dim() != 2:
        raise ValueError(f"kaldi_fbank expects waveforms of shape (batch, samples), got {tuple(waveforms.shape)}")
    window = int(sample_rate * frame_length_ms / 1000)
    shift = int(sample_rate * frame_shift_ms / 1000)
    if waveforms.shape[1] < window:
        raise ValueError(f"kaldi_fbank needs at least {window} samples per waveform, got {waveforms.shape[1]}")
    fft_size = 1 << (window - 1).bit_length()
    device = waveforms.device

    frames = waveforms.float().unfold(1, window, shift)  # (B, T, window)
    frames = frames - frames.mean(dim=-1, keepdim=True)
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)  # x[n-1], with x[-1] := x[0]
    frames = (frames - PREEMPHASIS * previous) * povey_window(window).to(device)
    spectrum = torch.fft.rfft(frames, n=fft_size).abs().pow(2)  # (B, T, fft_size // 2 + 1)
    energies = spectrum @ mel_banks(num_mel_bins, fft_size, sample_rate).to(device).T  # (B, T, M)
    return energies.clamp(min=LOG_FLOOR).log()
