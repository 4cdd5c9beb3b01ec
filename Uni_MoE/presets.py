"""Named configurations: the released Uni-MoE variants at real size, and the tiny CPU default.

Real-size presets describe the released models' geometry (LLaMA-2-7B / Vicuna-7B-v1.5 backbone,
CLIP ViT-L/14-336, Whisper-small, BEATs iter3+); the tiny preset is the same code with small numbers.
"""

from __future__ import annotations

from typing import Any

from .config import UniMoEConfig
from .modalities import PLACEHOLDERS

LLAMA_7B = dict(
    model_type="llama", vocab_size=32004, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)
CLIP_L_336 = dict(
    model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
    num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
)
WHISPER_SMALL = dict(
    model_type="whisper", vocab_size=51865, d_model=768, encoder_layers=12, decoder_layers=12,
    encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
    num_mel_bins=80, max_source_positions=1500, max_target_positions=448,
)
QFORMER_BLIP2 = dict(
    model_type="blip_2_qformer", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
    intermediate_size=3072, cross_attention_frequency=2, encoder_hidden_size=768,
)
BEATS_ITER3 = dict(encoder_layers=12, encoder_embed_dim=768, encoder_ffn_embed_dim=3072, encoder_attention_heads=12)


def placeholder_token_indices(text_vocab: int) -> dict[str, int]:
    """The config's placeholder id fields: ``<image> <video> <speech> <audio>`` (PLACEHOLDERS order) right
    after the text vocabulary, where load_tokenizer appends them. The original added no tokens (it used
    negative ids), so this numbering is ours; the converter, the presets and the tokenizer all use it."""
    return {f"{m}_token_index": text_vocab + i for i, m in enumerate(PLACEHOLDERS)}


PLACEHOLDER_IDS = placeholder_token_indices(32000)


def speech_v1(**overrides: Any) -> UniMoEConfig:
    """Uni-MoE-speech (v1): CLIP + Whisper, 4 full-MLP experts in all 32 layers, top-2, no aux loss."""
    return UniMoEConfig(**{**dict(text_config=LLAMA_7B, vision_config=CLIP_L_336, speech_config=WHISPER_SMALL,
                                  moe_layers="all", num_experts=4, **PLACEHOLDER_IDS), **overrides})


def speech_v1_5(**overrides: Any) -> UniMoEConfig:
    """Uni-MoE-speech v1.5 / base-interval: as speech_v1 with MoE on even layers only."""
    return speech_v1(**{"moe_layers": "even", **overrides})


def audio_v1(**overrides: Any) -> UniMoEConfig:
    """Uni-MoE-audio (v1): CLIP + BEATs + BLIP-2 Q-Former, 4 experts on even layers; `voice` is sound."""
    return UniMoEConfig(**{**dict(text_config=LLAMA_7B, vision_config=CLIP_L_336, audio_config=BEATS_ITER3,
                                  audio_qformer_config=QFORMER_BLIP2, moe_layers="even", num_experts=4,
                                  voice_modality="audio", **PLACEHOLDER_IDS), **overrides})


def v2_8e(**overrides: Any) -> UniMoEConfig:
    """Uni-MoE v2 / 8e: 8 LoRA-integrated experts in all layers, top-2, balance loss 0.01, DeepSpeed-MoE."""
    return speech_v1(**{"num_experts": 8, "expert_lora_r": 8, "expert_lora_alpha": 16,
                        "expert_lora_dropout": 0.05, "aux_balance_loss_coef": 0.01,
                        "router_second_expert_sampling": True, "moe_backend": "deepspeed",
                        "capacity_factor": 1.5, "ep_size": 8, **overrides})


def tiny(vocab_size: int = 1024, placeholder_ids: dict[str, int] | None = None, **overrides: Any) -> UniMoEConfig:
    """A few-MB model with every encoder, for CPU tests and the offline quickstart (4 s audio windows)."""
    ids = placeholder_ids or placeholder_token_indices(vocab_size - len(PLACEHOLDERS))
    text = dict(model_type="llama", vocab_size=vocab_size, hidden_size=128, intermediate_size=256,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    vision = dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, image_size=64, patch_size=8, projection_dim=64)
    speech = dict(model_type="whisper", vocab_size=64, d_model=64, encoder_layers=2, decoder_layers=2,
                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                  num_mel_bins=80, max_source_positions=200, max_target_positions=32, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, begin_suppress_tokens=None,
                  suppress_tokens=None)
    beats = dict(encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128, encoder_attention_heads=4,
                 embed_dim=32, conv_pos=16, conv_pos_groups=4, num_buckets=32, max_distance=64,
                 chunk_samples=64000)
    qformer = dict(model_type="blip_2_qformer", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=128, cross_attention_frequency=2, encoder_hidden_size=64)
    base = dict(text_config=text, vision_config=vision, speech_config=speech, audio_config=beats,
                audio_qformer_config=qformer, query_tokens_size=8, max_audio_chunks=4, moe_layers="all",
                num_experts=4, num_experts_per_tok=2, **ids)
    return UniMoEConfig(**{**base, **overrides})

