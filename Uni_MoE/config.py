"""UniMoEConfig: one configuration for every Uni-MoE variant (speech/audio, v1/v2, 4/8 experts).

The backbone and encoders are ordinary transformers sub-configs (LLaMA, CLIP vision, Whisper, BLIP-2
Q-Former); BEATs, which transformers lacks, is a plain dict. Field names follow the original
release's config.json where it has one (``mm_vision_select_layer``, ``num_experts``,
``num_experts_per_tok``, ``query_tokens_size``, ``ep_size``, ``capacity_factor``, ...).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PreTrainedConfig

from .compat import SubConfigSpec, build_sub_configs
from .modalities import MODALITIES

ORIGINAL_MODEL_TYPES = ("llava", "llava_llama")  # config.json model_type of an original Uni-MoE release
MOE_LAYER_CHOICES = ("all", "even", "odd", "none")
EXPERT_TYPES = ("mlp", "shared")
MOE_BACKENDS = ("local", "deepspeed")
MOE_IMPLEMENTATIONS = ("auto", "reference", "grouped")
SUB_CONFIG_TYPES = {  # field: (default model_type, may be None)
    "text_config": ("llama", False),
    "vision_config": ("clip_vision_model", True),
    "speech_config": ("whisper", True),
    "audio_qformer_config": ("blip_2_qformer", True),
}


class UniMoEConfig(PreTrainedConfig):
    """Backbone, encoders, connectors and mixture-of-experts settings of a Uni-MoE model.

    MoE fields:
      moe_layers: "all" | "even" | "odd" | "none" | list of layer indices that get a MoE MLP.
      expert_type: "mlp" (each expert its own frozen SwiGLU MLP, as v1 and v2) or "shared"
        (all experts share one frozen MLP and differ by their LoRA, a cheaper variant).
      expert_lora_r: rank of each expert's LoRA on gate/up/down (0 = none; v2 and stage 3 use 8).
      router_second_expert_sampling: pick the 2nd expert by Gumbel-noised argmax in training (v2).
      aux_balance_loss_coef: weight of the GShard balance loss (v1: 0, v2: 0.01).
      moe_backend: "local" (experts on every GPU) or "deepspeed" (DeepSpeed-MoE, sharded by ep_size).
      moe_implementation: "reference" (clear per-expert loop), "grouped" (batched), "auto".
    """

    model_type = "uni_moe"
    if SubConfigSpec is not None:
        sub_configs_defaults = {
            key: SubConfigSpec(config_class=AutoConfig, model_type=kind, optional=optional)
            for key, (kind, optional) in SUB_CONFIG_TYPES.items()
        }
    else:
        sub_configs = {key: AutoConfig for key in SUB_CONFIG_TYPES}

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    speech_config: dict | PreTrainedConfig | None = None
    audio_config: dict | None = None
    audio_qformer_config: dict | PreTrainedConfig | None = None

    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    mm_projector_type: str = "mlp2x_gelu"
    image_aspect_ratio: str = "square"
    video_num_frames: int = 8

    query_tokens_size: int = 50
    audio_projector_type: str = "linear"
    max_audio_chunks: int | None = 20
    voice_modality: str = "speech"

    image_token_index: int = 32000
    video_token_index: int = 32001
    speech_token_index: int = 32002
    audio_token_index: int = 32003

    num_experts: int = 4
    num_experts_per_tok: int = 2
    moe_layers: Any = "all"
    expert_type: str = "mlp"
    expert_lora_r: int = 0
    expert_lora_alpha: int = 16
    expert_lora_dropout: float = 0.0
    router_jitter: float = 0.0
    router_second_expert_sampling: bool = False
    aux_balance_loss_coef: float = 0.0
    capacity_factor: float = 1.5
    moe_backend: str = "local"
    moe_implementation: str = "auto"
    ep_size: int = 1

    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        if SubConfigSpec is None:
            build_sub_configs(self, SUB_CONFIG_TYPES)
        super().__post_init__(**kwargs)
        self.validate_fields()

    def validate_fields(self) -> None:
        """Reject settings that cannot work, naming the field."""
        if isinstance(self.moe_layers, str) and self.moe_layers not in MOE_LAYER_CHOICES:
            raise ValueError(f"moe_layers={self.moe_layers!r}: expected one of {MOE_LAYER_CHOICES} or a list")
        if self.expert_type not in EXPERT_TYPES:
            raise ValueError(f"expert_type={self.expert_type!r}: expected one of {EXPERT_TYPES}")
        if self.moe_backend not in MOE_BACKENDS:
            raise ValueError(f"moe_backend={self.moe_backend!r}: expected one of {MOE_BACKENDS}")
        if self.moe_implementation not in MOE_IMPLEMENTATIONS:
            raise ValueError(
                f"moe_implementation={self.moe_implementation!r}: expected one of {MOE_IMPLEMENTATIONS}"
            )
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts={self.num_experts}]"
            )
        if self.voice_modality not in ("speech", "audio"):
            raise ValueError(f"voice_modality={self.voice_modality!r}: expected 'speech' or 'audio'")

    def moe_layer_indices(self) -> list[int]:
        """Indices of decoder layers whose MLP is a mixture of experts."""
        n = self.text_config.num_hidden_layers
        if isinstance(self.moe_layers, (list, tuple)):
            bad = [i for i in self.moe_layers if not 0 <= int(i) < n]
            if bad:
                raise ValueError(f"moe_layers has indices {bad} outside 0..{n - 1}")
            return sorted(int(i) for i in self.moe_layers)
        return {
            "all": list(range(n)),
            "even": list(range(0, n, 2)),
            "odd": list(range(1, n, 2)),
            "none": [],
        }[self.moe_layers]

    def enabled_modalities(self) -> list[str]:
        """Modalities whose encoder is configured."""
        return [m.name for m in MODALITIES.values() if getattr(self, m.encoder_config) is not None]

    def placeholder_token_ids(self) -> dict[str, int]:
        """Vocabulary id of each modality's placeholder token."""
        return {m.name: getattr(self, m.token_id_field) for m in MODALITIES.values()}

    def speech_chunk_samples(self) -> int:
        """16 kHz samples per Whisper window (480000 = 30 s for Whisper-small)."""
        return self.speech_config.max_source_positions * 2 * 160

    def audio_chunk_samples(self) -> int:
        """16 kHz samples per BEATs window; the original uses the same 30 s windows."""
        return int((self.audio_config or {}).get("chunk_samples", 480000))


def saved_config(folder: str | Path) -> dict[str, Any]:
    """A checkpoint folder's ``config.json`` as a plain dict ({} when it has none)."""
    path = Path(folder) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def is_original_release(folder: str | Path) -> bool:
    """Whether the folder holds an original Uni-MoE release (a llava config) rather than our checkpoint."""
    return saved_config(folder).get("model_type") in ORIGINAL_MODEL_TYPES


def saved_with_experts(saved: dict[str, Any]) -> bool:
    """Whether a saved config (as a dict) has MoE layers, whose experts are in the weights; a dense base's
    MoE layers, if asked for, are built fresh."""
    return saved.get("moe_layers", "all") not in ("none", [])
