"""UniMoEForCausalLM: a LLaMA backbone with mixture-of-experts MLPs, fed by image, video, speech and
sound encoders whose connector outputs replace the placeholder tokens of the prompt.

The prompt already holds one placeholder token per modality feature row (the data pipeline expands
``<image>`` to as many tokens as the image yields), so splicing is a masked scatter, sequence lengths
are known before the model runs, and KV-cached batched generation works unchanged: media inputs are
consumed on the prefill step only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import CLIPVisionModel, GenerationMixin, LlamaModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from ..compat import CACHE_ARG
from ..config import ORIGINAL_MODEL_TYPES, UniMoEConfig, saved_config, saved_with_experts
from ..modalities import MEDIA_INPUT_KEYS, MODALITIES
from .attention import fuse_attention
from .connectors import AudioAligner, SpeechAligner, build_projector
from .encoders.whisper import store_states_token_major
from .lm_loss import causal_lm_loss
from .moe import MoEExperts, MoELayer
from .moe.deepspeed_backend import DeepSpeedMoELayer
from .rms_norm import fuse_rms_norms

FEATURES_ANNOTATION = "uni_moe: features of "  # + modality: the profiler's name for a modality's encoder and connector


@dataclass
class UniMoECausalLMOutput(CausalLMOutputWithPast):
    """Causal-LM output plus the MoE balance loss (summed over layers), the LM loss alone and, in training, each
    sample's mean LM loss [B] (detached; training returns no logits, see ``UniMoEForCausalLM.forward``)."""

    aux_loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    sample_loss: torch.Tensor | None = None


class UniMoEPreTrainedModel(PreTrainedModel):
    config_class = UniMoEConfig
    config: UniMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = getattr(self.config.get_text_config(), "initializer_range", 0.02)
        if isinstance(module, MoEExperts):
            module.reset_parameters(std)
        elif isinstance(module, (SpeechAligner, AudioAligner)):
            # N(0, 0.02) rather than the original's zeros: identical zero queries in the BLIP-2
            # Q-Former (which has no query position embedding) would receive identical gradients.
            init.normal_(module.query_tokens, mean=0.0, std=0.02)


def make_moe_layer(config: UniMoEConfig) -> MoELayer | DeepSpeedMoELayer:
    """The MoE MLP of the configured backend: experts on every rank, or placed by DeepSpeed-MoE."""
    tc = config.text_config
    common = dict(
        hidden_size=tc.hidden_size,
        intermediate_size=tc.intermediate_size,
        num_experts=config.num_experts,
        top_k=config.num_experts_per_tok,
        hidden_act=tc.hidden_act,
        expert_type=config.expert_type,
        lora_r=config.expert_lora_r,
        lora_alpha=config.expert_lora_alpha,
        lora_dropout=config.expert_lora_dropout,
        router_jitter=config.router_jitter,
        second_expert_sampling=config.router_second_expert_sampling,
    )
    if config.moe_backend == "deepspeed":
        return DeepSpeedMoELayer(**common, ep_size=config.ep_size, capacity_factor=config.capacity_factor,
                                 implementation=config.moe_implementation)
    return MoELayer(**common, implementation=config.moe_implementation)


class UniMoEModel(UniMoEPreTrainedModel):
    """Encoders, connectors and the MoE language model (without the LM head)."""

    def __init__(self, config: UniMoEConfig) -> None:
        super().__init__(config)
        hidden = config.text_config.hidden_size
        self.language_model = LlamaModel(config.text_config)
        fuse_rms_norms(self.language_model)
        fuse_attention(self.language_model)
        for idx in config.moe_layer_indices():
            self.language_model.layers[idx].mlp = make_moe_layer(config)

        self.vision_tower = self.mm_projector = None
        if config.vision_config is not None:
            self.vision_tower = CLIPVisionModel(config.vision_config)
            self.mm_projector = build_projector(config.mm_projector_type, config.vision_config.hidden_size, hidden)

        self.speech_encoder = self.speech_aligner = None
        if config.speech_config is not None:
            self.speech_encoder = WhisperEncoder(config.speech_config)
            store_states_token_major(self.speech_encoder)
            self.speech_aligner = SpeechAligner(
                config.speech_config, config.query_tokens_size, hidden, config.audio_projector_type
            )

        self.audio_encoder = self.audio_aligner = None
        if config.audio_config is not None:
            from .encoders.beats import BEATs, BEATsConfig

            self.audio_encoder = BEATs(BEATsConfig.from_dict(config.audio_config))
            self.audio_aligner = AudioAligner(
                config.audio_qformer_config, config.query_tokens_size, hidden, config.audio_projector_type
            )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def moe_mlps(self) -> list[MoELayer | DeepSpeedMoELayer]:
        """The mixture-of-experts MLP modules, in layer order (``config.moe_layer_indices()`` says where;
        ``config.moe_layers`` is the saved spec, "all" / "even" / a list ...)."""
        moe_types = (MoELayer, DeepSpeedMoELayer)
        return [layer.mlp for layer in self.language_model.layers if isinstance(layer.mlp, moe_types)]

    @staticmethod
    def _encoder_grad(module: nn.Module) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())

    def _vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> projected patch features [N, P, hidden]."""
        with torch.set_grad_enabled(self._encoder_grad(self.vision_tower)):
            out = self.vision_tower(pixel_values.to(self.vision_tower.dtype), output_hidden_states=True)
            feats = out.hidden_states[self.config.mm_vision_select_layer]
            if self.config.mm_vision_select_feature == "patch":
                feats = feats[:, 1:]
        return self.mm_projector(feats.to(self.mm_projector_dtype()))

    def mm_projector_dtype(self) -> torch.dtype:
        return next(self.mm_projector.parameters()).dtype

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, S, S] -> [N, P, hidden]: CLIP (penultimate layer, patch tokens) + projector."""
        return self._vision_features(pixel_values)

    def get_video_features(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        """Videos [N, F, 3, S, S] -> [N, P, hidden]: every frame encoded and projected, then the frames
        averaged (the original's mean pooling, so a video costs as many tokens as one image)."""
        n, f = pixel_values_videos.shape[:2]
        feats = self._vision_features(pixel_values_videos.flatten(0, 1))
        return feats.view(n, f, *feats.shape[1:]).mean(dim=1)

    def get_speech_features(self, input_features: torch.Tensor) -> torch.Tensor:
        """Whisper log-mel windows [n, mel, frames] -> [n, Q, hidden] (one row of Q per 30 s window)."""
        with torch.set_grad_enabled(self._encoder_grad(self.speech_encoder)):
            states = self.speech_encoder(input_features.to(self.speech_encoder.dtype)).last_hidden_state
        return self.speech_aligner(states.to(self.speech_aligner.query_tokens.dtype))

    def get_audio_features(self, input_values: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """Waveform windows [n, samples] (+ padding mask) -> [n, Q, hidden] via BEATs + Q-Former."""
        with torch.set_grad_enabled(self._encoder_grad(self.audio_encoder)):
            feats, feat_mask = self.audio_encoder(input_values, padding_mask)
        return self.audio_aligner(feats.to(self.audio_aligner.query_tokens.dtype), feat_mask)

    def placeholder_counts(self, input_ids: torch.Tensor) -> dict[str, int]:
        """How many placeholder tokens of each modality ``input_ids`` holds (one host sync for all)."""
        ids = self.config.placeholder_token_ids()
        counts = torch.stack([(input_ids == ids[name]).sum() for name in MODALITIES]).tolist()
        return dict(zip(MODALITIES, counts))

    def splice_modality_features(
        self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, modality: str, features: torch.Tensor,
        n_tokens: int | None = None,
    ) -> torch.Tensor:
        """Write features [n, t, hidden] (in order) over the placeholder tokens of ``modality``, of which the
        prompt holds ``n_tokens`` (counted here when not given)."""
        token_id = self.config.placeholder_token_ids()[modality]
        mask = input_ids == token_id
        n_tokens = int(mask.sum()) if n_tokens is None else n_tokens
        n_rows = features.shape[0] * features.shape[1]
        if n_tokens != n_rows:
            raise ValueError(
                f"{modality}: the prompt has {n_tokens} placeholder tokens but the {modality} inputs give "
                f"{n_rows} feature rows ({features.shape[0]} items x {features.shape[1]} tokens)"
            )
        flat = features.reshape(-1, features.shape[-1]).to(inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1), flat)

    def embed_multimodal(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        input_values: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with every modality's features spliced in at its placeholders (in the modality
        table's order, each through its ``get_<modality>_features``). The placeholders are counted once up
        front, so a batch costs one host sync however many modalities it has."""
        embeds = self.get_input_embeddings()(input_ids)
        given = dict(pixel_values=pixel_values, pixel_values_videos=pixel_values_videos,
                     input_features=input_features, input_values=input_values, padding_mask=padding_mask)
        counts = self.placeholder_counts(input_ids)
        for name, modality in MODALITIES.items():
            inputs = [given[key] for key in modality.input_keys]
            if inputs[0] is None or inputs[0].shape[0] == 0:
                if counts[name]:
                    raise ValueError(f"{name}: the prompt has placeholder tokens but no {name} inputs")
                continue
            if getattr(self, modality.encoder) is None:
                raise ValueError(f"{name} inputs were given but this model has no {name} encoder")
            with torch.profiler.record_function(f"{FEATURES_ANNOTATION}{name}"):  # named in profiles
                features = getattr(self, f"get_{name}_features")(*inputs)
                embeds = self.splice_modality_features(input_ids, embeds, name, features, counts[name])
        return embeds


class UniMoEForCausalLM(UniMoEPreTrainedModel, GenerationMixin):
    """Uni-MoE: multimodal inputs, MoE language model, LM head; loss = LM loss + coef * balance loss."""

    _tied_weights_keys: dict[str, str] = {}

    def __init__(self, config: UniMoEConfig) -> None:
        super().__init__(config)
        self.model = UniMoEModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        """transformers' ``from_pretrained``, which refuses, naming the loader to use instead, the two
        folder kinds it would read wrong: an original release (a llava config, converted by
        :func:`Uni_MoE.checkpoint.loader.load_checkpoint`), and experts to be sharded over
        expert-parallel ranks (``moe_backend="deepspeed"``), which loading by parameter name cannot split."""
        saved = saved_config(pretrained_model_name_or_path)
        loader = "Uni_MoE.checkpoint.loader.load_checkpoint"
        if saved.get("model_type") in ORIGINAL_MODEL_TYPES or "model_base" in kwargs:
            raise ValueError(f"{pretrained_model_name_or_path} (model_type {saved.get('model_type')!r}): an original "
                             f"Uni-MoE release, and model_base and its other parts, load with {loader}(path, "
                             "release={...})")
        if saved_with_experts(saved) and kwargs.get("moe_backend", saved.get("moe_backend")) == "deepspeed":
            raise ValueError(f"{pretrained_model_name_or_path}: experts sharded by DeepSpeed-MoE load with "
                             f"{loader}(path, ep_size=...), which splits them over the ranks")
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def moe_mlps(self) -> list[MoELayer | DeepSpeedMoELayer]:
        """The mixture-of-experts MLP modules, in layer order."""
        return self.model.moe_mlps()

    def moe_recompute_enable(self, enabled: bool = True) -> None:
        """Let the batched expert blocks keep no gate/up activations in training and recompute them in
        backward: 2 x token-slots x intermediate values less per MoE layer for one more pass of the gate/up
        projections (checkpointing recomputes the whole layer instead); under expert parallelism the experts
        also keep no copy of the rows they received, which backward receives again. Gradients are unchanged."""
        for module in self.modules():
            if isinstance(module, MoEExperts):
                module.recompute_projections = enabled

    def prepare_inputs_for_generation(self, input_ids, *args, inputs_embeds=None, is_first_iteration=False, **kwargs):
        """Media inputs enter on the prefill step only (later steps hold no placeholders); without a
        cache every step re-reads them. Older transformers did not drop the audio inputs themselves.
        (``inputs_embeds`` is named so that generate accepts precomputed embeddings.)"""
        inputs = super().prepare_inputs_for_generation(
            input_ids, *args, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs
        )
        if not is_first_iteration and kwargs.get("use_cache", True):
            for key in MEDIA_INPUT_KEYS:
                inputs.pop(key, None)
        return inputs

    def generate(self, *args: Any, **kwargs: Any):
        """transformers' generate that never emits a placeholder token (fed back, it would ask for media
        that is not there): the placeholder ids join ``suppress_tokens`` for greedy, sampling and beams."""
        given = kwargs.pop("suppress_tokens", None) or self.generation_config.suppress_tokens or []
        kwargs["suppress_tokens"] = sorted(set(given) | set(self.config.placeholder_token_ids().values()))
        return super().generate(*args, **kwargs)

    def collect_routing(self) -> list[torch.Tensor]:
        """Experts chosen in the last forward, one [B, S, k] tensor per MoE layer (each layer's ``routing``)."""
        return [layer.routing for layer in self.moe_mlps()]

    def _chunked_loss(self) -> bool:
        """Whether the LM loss skips the logits: in training, when the head is a plain linear layer whose
        whole weight is on this rank (not a ZeRO-3 partition, not wrapped by an adapter)."""
        head = self.lm_head
        return self.training and type(head) is nn.Linear and head.bias is None and not hasattr(head.weight, "ds_id")

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        input_values: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> UniMoECausalLMOutput:
        """input_ids [B, S] with expanded placeholders; media tensors are consumed only when given.

        pixel_values [N_img, 3, S, S]; pixel_values_videos [N_vid, F, 3, S, S]; input_features
        [N_speech_windows, mel, frames]; input_values / padding_mask [N_audio_windows, samples].
        With labels in training, the loss comes from ``lm_loss.causal_lm_loss`` and no logits are returned.
        """
        cache = kwargs.pop("past_key_values", cache)
        if use_cache is None and self.training:
            use_cache = False  # a training forward keeps no cache: it would copy every layer's keys and values
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_multimodal(
                input_ids, pixel_values, pixel_values_videos, input_features, input_values, padding_mask
            )
        out = self.model.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{CACHE_ARG: cache},
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = out.last_hidden_state
        moe = self.moe_mlps()
        aux_loss = torch.stack([m.aux_loss for m in moe]).sum() if moe else None
        for m in moe:  # the returned loss holds the graph; the layers keep values (no activations past the step)
            m.aux_loss = m.aux_loss.detach()
        logits = lm_loss = sample_loss = None
        if labels is not None and self._chunked_loss():
            lm_loss, sample_loss = causal_lm_loss(
                hidden, self.lm_head.weight, labels, num_items_in_batch=kwargs.get("num_items_in_batch"),
                shift_labels=kwargs.get("shift_labels"))
        else:
            if isinstance(logits_to_keep, int) and logits_to_keep > 0:
                hidden = hidden[:, -logits_to_keep:]
            elif isinstance(logits_to_keep, torch.Tensor):
                hidden = hidden[:, logits_to_keep]
            logits = self.lm_head(hidden)
            if labels is not None:
                lm_loss = self.loss_function(
                    logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
                )
        loss = lm_loss
        if lm_loss is not None and aux_loss is not None and self.config.aux_balance_loss_coef > 0:
            loss = lm_loss + self.config.aux_balance_loss_coef * aux_loss
        return UniMoECausalLMOutput(
            loss=loss,
            logits=logits,
            **{CACHE_ARG: getattr(out, CACHE_ARG)},
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            aux_loss=aux_loss,
            lm_loss=lm_loss,
            sample_loss=sample_loss,
        )
