"""Build a UniMoEConfig from an original release's config.json (flat LLaMA keys + mm_* + MoE keys).

Encoder configs come from their own folders (CLIP, Whisper: transformers ``AutoConfig``) and the
BEATs ``.pt`` (its ``cfg`` dict). Which layers are MoE is not in a v1 config (the package decided),
so it is read from the base checkpoint's tensor names; v2 states it (``moe_type``/``moe_stride``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PreTrainedConfig

from .. import presets
from ..config import ORIGINAL_MODEL_TYPES, UniMoEConfig
from ..modalities import PLACEHOLDERS

LLAMA_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "hidden_act", "initializer_range",
    "pad_token_id", "bos_token_id", "eos_token_id", "rope_theta", "rope_scaling", "pretraining_tp",
)


def read_original_config(path: str | Path) -> dict[str, Any]:
    """The raw config dict of an original release, checked to be one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    raw = json.loads(path.read_text())
    if raw.get("model_type") not in ORIGINAL_MODEL_TYPES:
        raise ValueError(
            f"{path}: model_type={raw.get('model_type')!r}, expected one of {ORIGINAL_MODEL_TYPES} (an original "
            "Uni-MoE release); a converted checkpoint loads with UniMoEForCausalLM.from_pretrained"
        )
    return raw


def is_deepspeed_moe(raw: dict[str, Any]) -> bool:
    """v2/8e configs carry the DeepSpeed-MoE fields."""
    return raw.get("model_type") == "llava_llama" or "ep_size" in raw or "moe_type" in raw


def moe_layers_from_keys(keys: list[str]) -> list[int]:
    """Layers whose router appears among a v1 checkpoint's tensor names."""
    found = {int(m.group(1)) for k in keys if (m := re.fullmatch(r"model\.layers\.(\d+)\.mlp\.gate\.weight", k))}
    return sorted(found)


def _moe_layers_v2(raw: dict[str, Any], num_layers: int) -> list[int] | str:
    if raw.get("moe_type", "dense") == "dense":
        return "all"
    stride = int(raw.get("moe_stride", 1))
    return [i for i in range(num_layers) if i % stride == 0]


def _encoder_config(folder: str | Path, kind: str) -> PreTrainedConfig:
    config = AutoConfig.from_pretrained(str(folder))
    if kind == "vision" and hasattr(config, "vision_config"):
        config = config.vision_config
    return config


def build_config(
    raw: dict[str, Any],
    moe_layers: list[int] | str | None,
    clip_dir: str | Path | None,
    whisper_dir: str | Path | None,
    beats_cfg: dict[str, Any] | None,
    overrides: dict[str, Any] | None = None,
) -> UniMoEConfig:
    """Our config for an original release. ``moe_layers`` (v1, from the checkpoint) is ignored for v2."""
    text = {k: raw[k] for k in LLAMA_KEYS if k in raw}
    text_vocab = int(raw["vocab_size"])
    text.update(model_type="llama", vocab_size=text_vocab + len(PLACEHOLDERS), tie_word_embeddings=False)
    fields: dict[str, Any] = dict(
        text_config=text,
        vision_config=_encoder_config(clip_dir, "vision").to_dict() if clip_dir else None,
        speech_config=_encoder_config(whisper_dir, "speech").to_dict() if whisper_dir and not beats_cfg else None,
        audio_config=dict(beats_cfg) if beats_cfg else None,
        audio_qformer_config=(
            {**presets.QFORMER_BLIP2, "encoder_hidden_size": beats_cfg["encoder_embed_dim"]} if beats_cfg else None
        ),
        voice_modality="audio" if beats_cfg else "speech",
        mm_vision_select_layer=raw.get("mm_vision_select_layer", -2),
        mm_vision_select_feature=raw.get("mm_vision_select_feature", "patch"),
        mm_projector_type=raw.get("mm_projector_type", "linear"),
        image_aspect_ratio=raw.get("image_aspect_ratio", "square"),
        query_tokens_size=raw.get("query_tokens_size", 50),
        audio_projector_type=raw.get("audio_projector_type") or "linear",
        num_experts=raw.get("num_experts", 4),
        num_experts_per_tok=raw.get("num_experts_per_tok", 2),
        **presets.placeholder_token_indices(text_vocab),
    )
    if is_deepspeed_moe(raw):
        fields.update(
            moe_layers=_moe_layers_v2(raw, int(raw["num_hidden_layers"])),
            expert_lora_r=raw.get("lora_r", 8),
            expert_lora_alpha=raw.get("lora_alpha", 16),
            expert_lora_dropout=raw.get("lora_dropout", 0.05),
            aux_balance_loss_coef=raw.get("aux_balance_loss_coef", 0.01) if raw.get("aux_balance_loss") else 0.0,
            router_second_expert_sampling=True,
            capacity_factor=raw.get("capacity_factor", 1.5),
        )
    else:
        fields["moe_layers"] = moe_layers if moe_layers is not None else "none"
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(fields.get(key), dict):
            value = {**fields[key], **value}
        fields[key] = value
    return UniMoEConfig(**fields)
