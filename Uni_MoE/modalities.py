"""The modality table: one record per kind of media, read by the config, the data pipeline, the model,
training statistics and the demo, so that a modality's names are written down once.

The table's order (image, video, speech, audio) is the order placeholder ids are appended to an original
release's vocabulary and the order the model splices features in; ``PROMPT_ORDER`` is the order the chat
prompts list the placeholders of a first turn, as the original CLI and demo build it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Modality:
    """Everything that names one modality across the package."""

    name: str  # the modality's name, also its key in a data record ("image", "video", "speech", "audio")
    placeholder: str  # prompt token replaced by the media features
    token_id_field: str  # UniMoEConfig field holding the placeholder's vocabulary id
    sample_field: str  # Sample attribute listing the sample's media of this kind
    input_keys: tuple[str, ...]  # model inputs (batch keys) of this modality; the first is always present
    processor_step: str  # UniMoEProcessor method that turns one file into encoder inputs
    encoder_config: str  # UniMoEConfig field configuring its encoder (None there: modality off)
    encoder: str  # UniMoEModel attribute of its encoder
    connector: str  # UniMoEModel attribute of the connector from encoder features to the LLM width


MODALITIES: dict[str, Modality] = {m.name: m for m in (
    Modality("image", "<image>", "image_token_index", "images", ("pixel_values",), "image", "vision_config",
             "vision_tower", "mm_projector"),
    Modality("video", "<video>", "video_token_index", "videos", ("pixel_values_videos",), "video", "vision_config",
             "vision_tower", "mm_projector"),
    Modality("speech", "<speech>", "speech_token_index", "speech", ("input_features",), "speech", "speech_config",
             "speech_encoder", "speech_aligner"),
    Modality("audio", "<audio>", "audio_token_index", "audio", ("input_values", "padding_mask"), "audio",
             "audio_config", "audio_encoder", "audio_aligner"),
)}
MODALITY_NAMES: tuple[str, ...] = tuple(MODALITIES)
PLACEHOLDERS: dict[str, str] = {m.name: m.placeholder for m in MODALITIES.values()}
MEDIA_INPUT_KEYS: tuple[str, ...] = tuple(k for m in MODALITIES.values() for k in m.input_keys)
PROMPT_ORDER: tuple[str, ...] = ("image", "speech", "audio", "video")  # <image>, then the voice, then <video>
VOICE_KEY = "voice"  # the original schema's key for audio files whose meaning is the model's voice_modality
