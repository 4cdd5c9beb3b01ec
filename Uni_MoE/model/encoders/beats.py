"""BEATs audio encoder (arXiv 2212.09058), the sound tower of Uni-MoE.

Written by hand because no maintained library ships it. Parameter names follow the published
release so that `BEATs_iter3_plus_AS2M.pt` loads with `load_state_dict(strict=True)`.
Pipeline: waveform x 2^15 -> Kaldi fbank (128 bins) -> normalise -> 16x16 patch conv -> LayerNorm
-> Linear -> convolutional position embedding -> post-norm (DeepNorm) transformer whose attention
carries a bucketed relative position bias scaled by a query-dependent GRU-style gate.
"""

from __future__ import annotations

import math
import pickle
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from Uni_MoE.model.encoders.fbank import kaldi_fbank

FBANK_MEAN = 15.41663
FBANK_STD = 6.55582
WAVEFORM_SCALE = 2**15
PREDICTOR_PREFIX = "predictor."

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_accurate": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "tanh": torch.tanh,
    "linear": lambda x: x,
}


@dataclass
class BEATsConfig:
    """Hyper-parameters under the original `cfg` names; defaults are those of BEATs_iter3_plus_AS2M."""

    input_patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_wise_gradient_decay_ratio: float = 0.6
    layer_norm_first: bool = False
    deep_norm: bool = True
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.05
    dropout_input: float = 0.0
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True
    finetuned_model: bool = False
    predictor_dropout: float = 0.0
    predictor_class: int = 527

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BEATsConfig:
        """Build from a checkpoint's `cfg`, ignoring keys this encoder does not use."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward, gradient multiplied by `scale` (the layer-wise gradient decay)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> Tensor:
    """Bidirectional T5-style buckets of key - query offsets: (length, length) long.

    Half the buckets per direction; the first half of those are exact offsets, the rest grow
    logarithmically up to `max_distance`. Arithmetic is float32 as in the original, so buckets match.
    """
    position = torch.arange(length)
    offset = position[None, :] - position[:, None]  # (L, L)
    per_side = num_buckets // 2
    exact = per_side // 2
    distance = offset.abs()
    far = exact + (
        torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (per_side - exact)
    ).long()
    far = far.clamp(max=per_side - 1)
    return (offset > 0).long() * per_side + torch.where(distance < exact, distance, far)


def downsample_padding_mask(mask: Tensor, length: int) -> Tensor:
    """(B, L) -> (B, length): drop the trailing L % length entries, then a step is padding only if all of its
    L // length consecutive entries are.

    Applied to samples -> fbank frames and to frames -> patch tokens exactly as the original does; patch
    tokens are ordered time-major with several frequency patches per time step, so the second step groups
    consecutive frames rather than whole patch columns. Kept as is for fidelity with the trained model.
    """
    usable = mask.shape[1] - mask.shape[1] % length
    return mask[:, :usable].reshape(mask.shape[0], length, -1).all(dim=-1)


class WeightNormConv1d(nn.Module):
    """Grouped 'same' Conv1d with torch weight_norm over the kernel axis (weight = g * v / ||v||, dim=2).

    Stores `weight_g` (1, 1, K) and `weight_v` (C, C / groups, K) under the names the release uses.
    """

    def __init__(self, channels: int, kernel_size: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.kernel_size = kernel_size
        direction = torch.randn(channels, channels // groups, kernel_size) * math.sqrt(4.0 / (kernel_size * channels))
        self.weight_v = nn.Parameter(direction)
        self.weight_g = nn.Parameter(direction.norm(dim=(0, 1), keepdim=True))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C, N) -> (B, C, N)
        weight = self.weight_v * (self.weight_g / self.weight_v.norm(dim=(0, 1), keepdim=True))
        out = F.conv1d(x, weight, self.bias, padding=self.kernel_size // 2, groups=self.groups)
        return out[..., : x.shape[-1]]  # an even kernel yields one extra step at the end


class BEATsAttention(nn.Module):
    """Self-attention with an additive relative position bias, optionally gated per query (gru_rel_pos)."""

    def __init__(self, config: BEATsConfig, relative_attention_bias: nn.Embedding | None) -> None:
        super().__init__()
        dim, heads = config.encoder_embed_dim, config.encoder_attention_heads
        if dim % heads:
            raise ValueError(f"encoder_embed_dim {dim} is not divisible by encoder_attention_heads {heads}")
        self.num_heads, self.head_dim = heads, dim // heads
        self.dropout = config.attention_dropout
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        if relative_attention_bias is not None:
            self.relative_attention_bias = relative_attention_bias  # layer 0 owns the table all layers use
        self.gru_rel_pos = config.gru_rel_pos
        if self.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, heads, 1, 1))

    def forward(self, x: Tensor, position_bias: Tensor | None, padding_mask: Tensor | None) -> Tensor:
        # x: (B, N, D); position_bias: (H, N, N); padding_mask: (B, N), True = padding
        batch, length, dim = x.shape
        q, k, v = (
            proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, hd)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        bias = None
        if position_bias is not None:
            bias = position_bias.to(q.dtype).expand(batch, -1, -1, -1)  # (B, H, N, N)
            if self.gru_rel_pos:
                gates = torch.sigmoid(self.grep_linear(q).view(batch, self.num_heads, length, 2, 4).sum(-1))
                gate_a, gate_b = gates.chunk(2, dim=-1)  # (B, H, N, 1) each
                bias = (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * bias
        if padding_mask is not None:
            if bias is None:
                bias = q.new_zeros(batch, 1, length, length)
            bias = bias.masked_fill(padding_mask[:, None, None, :], torch.finfo(bias.dtype).min)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0, scale=self.head_dim**-0.5
        )  # (B, H, N, hd)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


class BEATsLayer(nn.Module):
    """Transformer block: post-norm with DeepNorm residual scaling, or pre-norm when layer_norm_first."""

    def __init__(self, config: BEATsConfig, relative_attention_bias: nn.Embedding | None) -> None:
        super().__init__()
        dim = config.encoder_embed_dim
        if config.activation_fn not in ACTIVATIONS:
            raise ValueError(f"unsupported BEATs activation_fn {config.activation_fn!r}; known: {sorted(ACTIVATIONS)}")
        self.activation = ACTIVATIONS[config.activation_fn]
        self.self_attn = BEATsAttention(config, relative_attention_bias)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, config.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_embed_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(config.dropout)
        self.activation_dropout = nn.Dropout(config.activation_dropout)
        self.layer_norm_first = config.layer_norm_first
        self.residual_scale = (2.0 * config.encoder_layers) ** 0.25 if config.deep_norm else 1.0

    def feed_forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(self.activation_dropout(self.activation(self.fc1(x)))))

    def forward(self, x: Tensor, position_bias: Tensor | None, padding_mask: Tensor | None) -> Tensor:
        # x: (B, N, D) -> (B, N, D)
        if self.layer_norm_first:
            x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x), position_bias, padding_mask))
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.residual_scale * x + self.dropout(self.self_attn(x, position_bias, padding_mask))
        x = self.self_attn_layer_norm(x)
        return self.final_layer_norm(self.residual_scale * x + self.feed_forward(x))


class BEATsEncoder(nn.Module):
    """Convolutional position embedding followed by the transformer layers."""

    def __init__(self, config: BEATsConfig) -> None:
        super().__init__()
        dim = config.encoder_embed_dim
        self.config = config
        self.pos_conv = nn.Sequential(WeightNormConv1d(dim, config.conv_pos, config.conv_pos_groups), nn.GELU())
        shared_bias = None
        if config.relative_position_embedding:
            shared_bias = nn.Embedding(config.num_buckets, config.encoder_attention_heads)
        # The release shares one table across layers; only layer 0 registers it so weights save without
        # aliased tensors (from_checkpoint folds the release's per-layer copies into it).
        self.layers = nn.ModuleList(
            BEATsLayer(config, shared_bias if i == 0 else None) for i in range(config.encoder_layers)
        )
        self.layer_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(config.dropout)
        self._init_weights()

    def _init_weights(self) -> None:
        """BERT-style normal(0.02) init, then DeepNorm's scaled Xavier init of value/output/FFN weights."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        if self.config.deep_norm:
            beta = (8.0 * self.config.encoder_layers) ** -0.25
            for layer in self.layers:
                attn = layer.self_attn
                for weight, gain in ((attn.q_proj.weight, 1.0), (attn.k_proj.weight, 1.0), (attn.v_proj.weight, beta),
                                     (attn.out_proj.weight, beta), (layer.fc1.weight, beta), (layer.fc2.weight, beta)):
                    nn.init.xavier_normal_(weight, gain=gain)

    def position_bias(self, length: int) -> Tensor | None:
        """Relative position bias shared by all layers: (H, N, N), or None without relative positions."""
        if not self.config.relative_position_embedding:
            return None
        table = self.layers[0].self_attn.relative_attention_bias
        buckets = relative_position_buckets(length, self.config.num_buckets, self.config.max_distance)
        return table(buckets.to(table.weight.device)).permute(2, 0, 1)

    def forward(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        # x: (B, N, D) -> (B, N, D)
        if padding_mask is not None:
            x = x.masked_fill(padding_mask[..., None], 0.0)
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.config.layer_norm_first:
            x = self.layer_norm(x)
        x = self.dropout(x)
        position_bias = self.position_bias(x.shape[1])
        decay = self.config.layer_wise_gradient_decay_ratio
        for layer in self.layers:
            if self.training and decay != 1.0:
                x = _ScaleGradient.apply(x, decay)
            if self.training and torch.rand(()).item() < self.config.encoder_layerdrop:
                continue
            x = layer(x, position_bias, padding_mask)
        if self.config.layer_norm_first:
            x = self.layer_norm(x)
        return x


class BEATs(nn.Module):
    """BEATs feature extractor: 16 kHz waveforms -> patch token features and their padding mask."""

    def __init__(self, config: BEATsConfig) -> None:
        super().__init__()
        self.config = config
        patch = config.input_patch_size
        self.patch_embedding = nn.Conv2d(1, config.embed_dim, kernel_size=patch, stride=patch, bias=config.conv_bias)
        self.layer_norm = nn.LayerNorm(config.embed_dim)
        self.post_extract_proj = None
        if config.embed_dim != config.encoder_embed_dim:
            self.post_extract_proj = nn.Linear(config.embed_dim, config.encoder_embed_dim)
        self.dropout_input = nn.Dropout(config.dropout_input)
        self.encoder = BEATsEncoder(config)

    def forward(self, waveforms: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """waveforms (B, S) in [-1, 1] at 16 kHz, padding_mask (B, S) True at padding
        -> features (B, N, D), padding mask (B, N) or None. 30 s gives N = 187 * 8 = 1496."""
        fbank = kaldi_fbank(waveforms * WAVEFORM_SCALE)  # (B, T, 128)
        fbank = (fbank - FBANK_MEAN) / (2 * FBANK_STD)
        if padding_mask is not None:
            padding_mask = downsample_padding_mask(padding_mask, fbank.shape[1])  # (B, T)
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(fbank.unsqueeze(1).to(weight.dtype))  # (B, E, T / P, 128 / P)
        features = self.layer_norm(patches.flatten(2).transpose(1, 2))  # (B, N, E), time-major
        if padding_mask is not None:
            padding_mask = downsample_padding_mask(padding_mask, features.shape[1])  # (B, N)
        if self.post_extract_proj is not None:
            features = self.post_extract_proj(features)  # (B, N, D)
        return self.encoder(self.dropout_input(features), padding_mask), padding_mask

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> BEATs:
        """Build from a released checkpoint ({'cfg', 'model'}), loading strictly; returned in eval mode.

        A fine-tuned checkpoint's classifier (`predictor.*`) is dropped: Uni-MoE uses the features only.
        """
        config, state = load_beats_checkpoint(path)
        state = {k: v for k, v in state.items() if not k.startswith(PREDICTOR_PREFIX)}
        state = fold_shared_bias_copies(state, path)
        model = cls(config)
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
        if missing or unexpected:
            raise ValueError(
                f"BEATs checkpoint {path} does not match the model: "
                f"missing keys {missing}, unexpected keys {unexpected}"
            )
        model.load_state_dict(state, strict=True)
        return model.eval()


def fold_shared_bias_copies(state: dict[str, Tensor], path: str | Path) -> dict[str, Tensor]:
    """Drop the release's per-layer aliases of layer 0's relative position table (checking they agree)."""
    pattern = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.relative_attention_bias\.weight")
    first = state.get("encoder.layers.0.self_attn.relative_attention_bias.weight")
    out = {}
    for key, value in state.items():
        match = pattern.fullmatch(key)
        if match and match.group(1) != "0":
            if first is None or not torch.equal(value, first):
                raise ValueError(f"BEATs checkpoint {path}: {key} differs from layer 0's shared table")
            continue
        out[key] = value
    return out


def load_beats_checkpoint(path: str | Path) -> tuple[BEATsConfig, dict[str, Tensor]]:
    """Read a BEATs checkpoint safely (weights_only): its config and state dict.

    A pickle that would construct arbitrary objects (and so could run code) is refused with a ValueError.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"refusing to load BEATs checkpoint {path}: it holds objects beyond plain tensors and containers ({error})"
        ) from error
    well_formed = isinstance(payload, dict) and all(isinstance(payload.get(key), dict) for key in ("cfg", "model"))
    if not well_formed:
        raise ValueError(f"BEATs checkpoint {path} must be a dict with a 'cfg' dict and a 'model' state dict")
    return BEATsConfig.from_dict(payload["cfg"]), payload["model"]
