"""UniMoEProcessor: text with media placeholders + images / videos / speech / sounds -> the model's inputs.

One place for all preprocessing, used by the dataset (training, eval, generation), the demo and the
lmms-eval plug-in. It holds transformers' own components, so ``save_pretrained`` / ``AutoProcessor`` work:
a CLIP image processor (PIL backend: the same pixels with or without torchvision), a Whisper feature
extractor for speech windows and the tokenizer. Sounds go to the model as 16 kHz waveform windows (BEATs
computes its Kaldi fbank inside the model), videos as ``num_frames`` sampled frames.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, PreTrainedTokenizerBase, ProcessorMixin, WhisperFeatureExtractor

from .config import UniMoEConfig
from .data.collate import collate
from .data.conversation import SYSTEM, render_prompt, tokenize_conversation, tokenize_prompt
from .data.schema import PLACEHOLDER_RE, TOKEN_TO_MODALITY
from .modalities import MEDIA_INPUT_KEYS, PLACEHOLDERS

try:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
except ImportError:  # transformers < 5.2: the PIL processor is the default one
    from transformers import CLIPImageProcessor as CLIPImageProcessorPil

PROCESSOR_FILE = "processor_config.json"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WHISPER_HOP = 160  # Whisper's mel hop: 100 frames per second at 16 kHz


def _media():
    """The media readers; PyAV and soundfile load only when media are read, so ``import Uni_MoE`` works
    without them."""
    from .data import media

    return media


def visual_token_count(config: UniMoEConfig) -> int:
    """Placeholder tokens per image (and per mean-pooled video): CLIP patches, plus CLS for ``cls_patch``."""
    vc = config.vision_config
    patches = (vc.image_size // vc.patch_size) ** 2
    return patches if config.mm_vision_select_feature == "patch" else patches + 1


class UniMoEProcessor(ProcessorMixin):
    """Tokenizer + CLIP image processor + Whisper feature extractor + sound windows + video frame sampling.

    ``processor(text=..., images=[...], videos=[...], speech=[...], audio=[...])`` takes prompts whose
    ``<image>`` / ``<video>`` / ``<speech>`` / ``<audio>`` placeholders are filled, in order, from the media
    lists (shared by all prompts of the batch) and returns ``input_ids``, ``attention_mask`` and the media
    tensors, each placeholder repeated as often as its item has feature rows.
    """

    def __init__(
        self,
        image_processor: CLIPImageProcessorPil | None = None,
        feature_extractor: WhisperFeatureExtractor | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        num_frames: int = 8,
        image_aspect_ratio: str = "square",
        tokens_per_visual: int = 576,
        query_tokens_size: int = 50,
        audio_chunk_samples: int = 480000,
        max_audio_chunks: int | None = 20,
        voice_modality: str = "speech",
        placeholder_token_ids: dict[str, int] | None = None,
        **kwargs: Any,
    ) -> None:
        if image_aspect_ratio not in ("square", "pad"):
            raise ValueError(f"image_aspect_ratio must be 'square' or 'pad', got {image_aspect_ratio!r}")
        self.num_frames = num_frames
        self.image_aspect_ratio = image_aspect_ratio
        self.tokens_per_visual = tokens_per_visual
        self.query_tokens_size = query_tokens_size
        self.audio_chunk_samples = audio_chunk_samples
        self.max_audio_chunks = max_audio_chunks
        self.voice_modality = voice_modality
        self.placeholder_token_ids = placeholder_token_ids
        super().__init__(image_processor, feature_extractor, tokenizer, **kwargs)

    # ------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, config: UniMoEConfig, tokenizer: PreTrainedTokenizerBase) -> "UniMoEProcessor":
        """The processor a model of ``config`` needs (sizes from its encoders' configs)."""
        size = config.vision_config.image_size if config.vision_config is not None else 336
        images = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                       image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
        speech_samples = config.speech_chunk_samples() if config.speech_config is not None else 480000
        mel_bins = config.speech_config.num_mel_bins if config.speech_config is not None else 80
        rate = _media().SAMPLE_RATE
        features = WhisperFeatureExtractor(feature_size=mel_bins, sampling_rate=rate, hop_length=WHISPER_HOP,
                                           n_fft=400, chunk_length=speech_samples // rate)
        return cls(images, features, tokenizer, num_frames=config.video_num_frames,
                   image_aspect_ratio=config.image_aspect_ratio,
                   tokens_per_visual=visual_token_count(config) if config.vision_config is not None else 0,
                   query_tokens_size=config.query_tokens_size, audio_chunk_samples=config.audio_chunk_samples(),
                   max_audio_chunks=config.max_audio_chunks, voice_modality=config.voice_modality,
                   placeholder_token_ids=config.placeholder_token_ids())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> "UniMoEProcessor":
        """Load a saved processor; a model folder saved without one gets it from its config and tokenizer.
        Keyword arguments that name a setting (``num_frames``, ...) override the saved one; the hub's
        (``trust_remote_code``, ...) are ignored: everything is read from the local folder."""
        from .data.tokenizer import load_tokenizer

        folder = Path(pretrained_model_name_or_path)
        tokenizer = load_tokenizer(folder)
        if not (folder / PROCESSOR_FILE).is_file():
            return cls.from_config(UniMoEConfig.from_pretrained(str(folder)), tokenizer)
        saved = json.loads((folder / PROCESSOR_FILE).read_text())
        try:
            images = CLIPImageProcessorPil(**{k: v for k, v in saved.pop("image_processor").items()
                                              if k != "image_processor_type"})
            features = WhisperFeatureExtractor(**{k: v for k, v in saved.pop("feature_extractor").items()
                                                  if k not in ("feature_extractor_type", "mel_filters")})
        except KeyError as err:
            raise ValueError(f"{folder / PROCESSOR_FILE}: no {err} entry; save it with "
                             "UniMoEProcessor.save_pretrained") from err
        settings = {k: v for k, v in {**saved, **kwargs}.items() if k in cls._settings()}
        return cls(images, features, tokenizer, **settings)

    @classmethod
    def _settings(cls) -> tuple[str, ...]:
        return ("num_frames", "image_aspect_ratio", "tokens_per_visual", "query_tokens_size",
                "audio_chunk_samples", "max_audio_chunks", "voice_modality", "placeholder_token_ids")

    def placeholder_ids(self) -> dict[str, int]:
        """Vocabulary id of each modality's placeholder token: the model config's, else the tokenizer's."""
        if self.placeholder_token_ids:
            return dict(self.placeholder_token_ids)
        return {m: self.tokenizer.convert_tokens_to_ids(t) for m, t in PLACEHOLDERS.items()}

    # ------------------------------------------------------------ one media item

    def image(self, source: Any) -> torch.Tensor:
        """[3, S, S] pixel values of an image file, base64 string or PIL image."""
        img = source if isinstance(source, Image.Image) else _media().load_image(source)
        img = img.convert("RGB")
        if self.image_aspect_ratio == "pad":
            img = _media().expand_to_square(img, tuple(int(m * 255) for m in self.image_processor.image_mean))
        return self.image_processor(img, return_tensors="pt")["pixel_values"][0]

    def video(self, source: Any) -> torch.Tensor:
        """[F, 3, S, S] from a video file, a list of frame files or a list of PIL frames."""
        if isinstance(source, (list, tuple)) and source and isinstance(source[0], Image.Image):
            frames = [source[i] for i in _media().frame_indices(len(source), self.num_frames)]
        else:
            frames = _media().load_video_frames(source, self.num_frames)
        return torch.stack([self.image(f) for f in frames])

    def waveform(self, source: Any) -> np.ndarray:
        """Mono float32 16 kHz audio of a file, a ``{"array", "sampling_rate"}`` dict or a 16 kHz array."""
        if isinstance(source, dict):
            if "array" not in source:
                return _media().load_waveform(source["path"])
            return _media().waveform_from_array(source["array"], source.get("sampling_rate", _media().SAMPLE_RATE))
        if isinstance(source, (np.ndarray, torch.Tensor)):
            return _media().waveform_from_array(np.asarray(source), _media().SAMPLE_RATE)
        return _media().load_waveform(source)

    def _chunks(self, source: Any, chunk_samples: int) -> list[np.ndarray]:
        name = source if isinstance(source, (str, Path)) else "audio array"
        return _media().split_into_chunks(self.waveform(source), chunk_samples, self.max_audio_chunks, source=name)

    def speech(self, source: Any) -> torch.Tensor:
        """[n_windows, mel, frames] Whisper log-mel windows, each window zero-padded to full length."""
        n = self.feature_extractor.n_samples
        chunks = self._chunks(source, n)
        out = self.feature_extractor(chunks, sampling_rate=self.feature_extractor.sampling_rate, max_length=n,
                                     padding="max_length", truncation=True, return_tensors="np")
        return torch.from_numpy(np.ascontiguousarray(out["input_features"], dtype=np.float32))

    def audio(self, source: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """([n_windows, samples], padding mask [n_windows, samples]) sound windows for BEATs."""
        return _media().audio_chunks(self._chunks(source, self.audio_chunk_samples), self.audio_chunk_samples)

    # ------------------------------------------------------------ one sample

    def media_inputs(self, images: Sequence[Any] = (), videos: Sequence[Any] = (), speech: Sequence[Any] = (),
                     audio: Sequence[Any] = ()) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
        """Encoder inputs of one sample's media and the placeholder length of each item."""
        q = self.query_tokens_size
        out: dict[str, torch.Tensor] = {}
        lengths: dict[str, list[int]] = {}
        if images:
            out["pixel_values"] = torch.stack([self.image(p) for p in images])
            lengths["image"] = [self.tokens_per_visual] * len(images)
        if videos:
            out["pixel_values_videos"] = torch.stack([self.video(v) for v in videos])
            lengths["video"] = [self.tokens_per_visual] * len(videos)
        if speech:
            feats = [self.speech(p) for p in speech]
            out["input_features"] = torch.cat(feats)
            lengths["speech"] = [q * f.shape[0] for f in feats]
        if audio:
            waves = [self.audio(p) for p in audio]
            out["input_values"] = torch.cat([w for w, _ in waves])
            out["padding_mask"] = torch.cat([m for _, m in waves])
            lengths["audio"] = [q * w.shape[0] for w, _ in waves]
        return out, lengths

    def tokenize_conversation(self, turns: list[dict[str, str]], lengths: dict[str, list[int]],
                              for_generation: bool = False) -> tuple[list[int], list[int]]:
        """Ids and answer-only labels of a vicuna_v1 conversation (``from``/``value`` turns)."""
        return tokenize_conversation(self.tokenizer, turns, lengths, self.placeholder_ids(), for_generation)

    # ------------------------------------------------------------ prompts and batches

    def __call__(
        self,
        text: str | list[str] | None = None,
        images: Sequence[Any] | None = None,
        videos: Sequence[Any] | None = None,
        speech: Sequence[Any] | None = None,
        audio: Sequence[Any] | None = None,
        padding_side: str = "left",
        return_tensors: str = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """Batch of prompts (left-padded for generation) with their media; placeholders take the media lists'
        items in order across the batch. ``speech`` goes to the Whisper encoder, ``audio`` (sounds) to BEATs;
        ``voice_modality`` says which of the two a model hears the original data's ``voice`` files with."""
        if text is None:
            raise ValueError("UniMoEProcessor needs text (a prompt with media placeholders, or a list of them)")
        if return_tensors != "pt":
            raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' is supported")
        prompts = [text] if isinstance(text, str) else list(text)
        queues = {"image": list(images or []), "video": list(videos or []), "speech": list(speech or []),
                  "audio": list(audio or [])}
        items = []
        for n, prompt in enumerate(prompts):
            counts = {m: 0 for m in queues}
            for part in PLACEHOLDER_RE.findall(prompt):
                counts[TOKEN_TO_MODALITY[part]] += 1
            mine = {}
            for m, k in counts.items():
                if k > len(queues[m]):
                    raise ValueError(f"prompt {n}: {k} {PLACEHOLDERS[m]} placeholder(s) but only {len(queues[m])} "
                                     f"{m} item(s) left")
                mine[m], queues[m] = queues[m][:k], queues[m][k:]
            tensors, lengths = self.media_inputs(mine["image"], mine["video"], mine["speech"], mine["audio"])
            ids = tokenize_prompt(self.tokenizer, prompt, lengths, self.placeholder_ids())
            items.append({**tensors, "input_ids": torch.tensor(ids), "labels": torch.tensor(ids)})
        unused = {m: len(q) for m, q in queues.items() if q}
        if unused:
            raise ValueError(f"media items without placeholders: {unused}")
        batch = collate(items, self.tokenizer.pad_token_id, padding_side)
        for key in ("labels", "modality", "sample_index"):
            batch.pop(key)
        return BatchFeature(batch)

    def apply_chat_template(self, conversation: list[dict[str, Any]], chat_template: str | None = None,
                            tokenize: bool = False, add_generation_prompt: bool = True,
                            **kwargs: Any) -> str | BatchFeature:
        """The vicuna_v1 prompt of a conversation.

        Messages are ``{"from": "human"|"gpt", "value": str}`` (the data schema) or ``{"role": "user" |
        "assistant" | "system", "content": str | [{"type": "text", "text": ...}, {"type": "image", "image":
        ...}, ...]}``; a media part becomes its placeholder, on its own line, where it stands. A conversation
        ending with a user turn ends in ``ASSISTANT:`` for generation. With ``tokenize=True`` the media
        parts are loaded and the processor's batch is returned.
        """
        if chat_template is not None:
            raise ValueError("UniMoEProcessor uses the vicuna_v1 template; chat_template cannot be replaced")
        turns, found = _turns_and_media(conversation)
        if turns[-1]["from"] == "gpt" and not turns[-1]["value"]:
            turns = turns[:-1]  # an eval record's empty answer turn
        prompt = render_prompt(turns, for_generation=turns[-1]["from"] == "human")
        if not tokenize:
            return prompt
        return self(text=prompt, images=found["image"], videos=found["video"], speech=found["speech"],
                    audio=found["audio"], **kwargs)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        """The tokenizer's batch_decode."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        """The tokenizer's decode."""
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", *MEDIA_INPUT_KEYS]


ROLE_NAMES = {"user": "human", "human": "human", "assistant": "gpt", "gpt": "gpt"}


def _turns_and_media(conversation: list[dict[str, Any]]) -> tuple[list[dict[str, str]], dict[str, list[Any]]]:
    """Data-schema turns and, per modality, the media items the messages carry (in placeholder order)."""
    turns: list[dict[str, str]] = []
    found: dict[str, list[Any]] = {m: [] for m in PLACEHOLDERS}
    for n, message in enumerate(conversation):
        if "from" in message:
            turns.append({"from": message["from"], "value": message["value"]})
            continue
        role = message.get("role")
        if role == "system":
            if _text_of(message["content"], found, n) != SYSTEM:
                raise ValueError(f"message {n}: the vicuna_v1 template has a fixed system prompt")
            continue
        if role not in ROLE_NAMES:
            raise ValueError(f"message {n}: role {role!r} is not one of user, assistant, system")
        turns.append({"from": ROLE_NAMES[role], "value": _text_of(message["content"], found, n)})
    if not turns or turns[0]["from"] != "human":
        raise ValueError("a conversation must start with a user turn")
    return turns, found


def _text_of(content: str | list[dict[str, Any]], found: dict[str, list[Any]], n: int) -> str:
    """A message's text with each media part replaced by its placeholder (and its item kept in ``found``)."""
    if isinstance(content, str):
        return content
    text = ""
    for part in content:
        kind = part.get("type")
        if kind == "text":
            text += part["text"]
        elif kind in PLACEHOLDERS:
            item = next((part[k] for k in (kind, "path", "url") if part.get(k) is not None), None)
            if item is not None:
                found[kind].append(item)
            text += PLACEHOLDERS[kind] + "\n"
        else:
            raise ValueError(f"message {n}: content part of type {kind!r} is not text or one of {list(PLACEHOLDERS)}")
    return text
