"""The one generation engine behind eval, the CLI, the demo, the v2 chat and the quick eval.

A left-padded batch is prefilled once (media encoded and spliced there, and nowhere else), then decoded
one token per sequence per step over a static KV cache. On a GPU the step is captured in a CUDA graph
and replayed, so a token costs one launch rather than hundreds, and the MoE layers take their sync-free
path (``model/moe/decode.py``). Placeholder tokens are suppressed at every step, so a generated token
can never ask for media; beam search runs through transformers' generate, which suppresses them too.
Streaming, stop strings, sampling, cancellation and routing capture (forward hooks on the MoE layers,
which turn graphs off) are options of the same loop.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from ..model.moe.implementations import DECODE_TOKENS, SYNC_FREE
from ..modalities import MEDIA_INPUT_KEYS
from ..model.uni_moe import UniMoEForCausalLM
from .sampling import choose_tokens
from .static_cache import StaticKVCache, forward_cached, prefill_mask, step_mask

NON_MODEL_KEYS = ("labels", "modality", "sample_index")
CACHE_ROUNDING = 128  # cache lengths are rounded up to this, so batches of similar length share a graph
CHECK_EVERY = 4  # steps between host checks of "all rows finished" / stop strings when nothing streams


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings; ``stop`` strings end a reply early and are cut from it."""

    max_new_tokens: int = 512
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    stop: tuple[str, ...] = ()

    def with_overrides(self, **changes: Any) -> "GenerationSettings":
        """A copy with the given fields replaced (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def sampled(self) -> bool:
        """Temperature 0 means greedy, as in the original."""
        return self.do_sample and self.temperature > 0

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model.generate`` (the beam-search path)."""
        kwargs: dict[str, Any] = dict(
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.min_new_tokens,
            do_sample=self.sampled,
            num_beams=self.num_beams,
            use_cache=True,
        )
        if self.sampled:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.num_beams > 1:
            kwargs["length_penalty"] = self.length_penalty
        return kwargs

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the first stop string, stripped."""
    cut = len(text)
    for s in stop:
        pos = text.find(s)
        if s and pos != -1:
            cut = min(cut, pos)
    return text[:cut].strip()


class DecodeStep:
    """One token per sequence through the language model and head over a static cache, from fixed input
    buffers; eager, or captured once in a CUDA graph and replayed."""

    def __init__(self, model: UniMoEForCausalLM, batch: int, length: int, graph: bool) -> None:
        self.model, self.length, self.use_graph = model, length, graph
        self.cache = StaticKVCache(model.model.language_model, batch, length)
        device = self.cache.keys.device
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch, length, dtype=torch.bool, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def _run(self) -> torch.Tensor:
        lm = self.model.model.language_model
        embeds = lm.get_input_embeddings()(self.tokens)[:, None]
        hidden = forward_cached(lm, embeds, self.positions, self.cache, self.slot, step_mask(self.valid, self.slot),
                                self.length)
        return self.model.lm_head(hidden[:, -1]).float()

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run()  # warm-up outside capture: lazy allocations and library handles
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._run()

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, slot: int) -> torch.Tensor:
        """Logits [B, V] (float) of the next token after ``tokens`` [B] at rotary ``positions`` [B], whose
        keys and values go to cache position ``slot``."""
        self.tokens.copy_(tokens)
        self.positions.copy_(positions[:, None])
        self.slot.fill_(slot)
        if not self.use_graph:
            return self._run()
        if self.graph is None:
            try:
                self._capture()
            except RuntimeError as err:  # a step that syncs with the host; slower, still correct
                warnings.warn(f"the decoding step could not be captured in a CUDA graph ({err}); running it eagerly")
                self.graph, self.use_graph = None, False
                return self._run()
        self.graph.replay()
        return self.logits


class GenerationEngine:
    """Batched generation for one model; keeps the last static cache (and its CUDA graph) for reuse."""

    def __init__(self, model: UniMoEForCausalLM, tokenizer: PreTrainedTokenizerBase,
                 cuda_graphs: bool | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.cuda_graphs = cuda_graphs
        ids = sorted(model.config.placeholder_token_ids().values())
        self.suppress = torch.tensor(ids, dtype=torch.long, device=model.device)
        self._step: DecodeStep | None = None
        self.steps_made = 0  # static caches allocated (and, with graphs, steps captured) so far

    def _graphs_on(self, batch: int) -> bool:
        """CUDA graphs: on a GPU, local experts (DeepSpeed-MoE all-to-alls synchronise), a batch the MoE
        decode path takes (and no other path configured), and no forward hooks on the MoE layers (routing
        capture reads every step on the host; a captured step would run them once, at capture)."""
        if self.cuda_graphs is False or self.model.device.type != "cuda" or batch > DECODE_TOKENS:
            return False
        if self.model.config.moe_backend == "deepspeed":
            return False
        layers = self.model.moe_mlps()
        if any(layer.implementation not in {"auto", *SYNC_FREE} for layer in layers):
            return False  # a configured grouped or reference path sizes its work on the host
        return not any(m._forward_hooks or m._forward_pre_hooks for m in layers)

    def decode_step(self, batch: int, length: int) -> DecodeStep:
        """The step for this batch size and cache length (rounded up), reusing the last one if it fits."""
        length = -(-length // CACHE_ROUNDING) * CACHE_ROUNDING
        graph = self._graphs_on(batch)
        step = self._step
        if step is None or step.cache.batch != batch or step.length != length or step.use_graph != graph:
            self._step = None  # free the old cache before allocating the new one
            step = self._step = DecodeStep(self.model, batch, length, graph)
            self.steps_made += 1
        return step

    def inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Model tensors of a collated batch on the model's device; float media in the model's dtype."""
        out = {}
        for key, value in batch.items():
            if key in NON_MODEL_KEYS:
                continue
            if key in MEDIA_INPUT_KEYS and value.is_floating_point():
                value = value.to(self.model.dtype)
            out[key] = value.to(self.model.device)
        return out

    def embed(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A collated batch's input ids [B, S], prompt embeddings with the media spliced in [B, S, H] (media
        encoded once, here) and attention mask [B, S]."""
        inputs = self.inputs(batch)
        input_ids = inputs.pop("input_ids")
        mask = inputs.pop("attention_mask", torch.ones_like(input_ids))
        media = {key: inputs.pop(key) for key in MEDIA_INPUT_KEYS if key in inputs}
        return input_ids, self.model.model.embed_multimodal(input_ids, **media), mask

    @torch.inference_mode()
    def generate(
        self,
        batch: dict[str, Any],
        settings: GenerationSettings,
        *,
        streamer: Any = None,
        should_stop: Callable[[], bool] | None = None,
        synced_gpus: bool = False,
    ) -> torch.Tensor:
        """New tokens [B, T] for one left-padded collated batch (pad after a sequence ends).

        ``streamer`` (transformers' streamer protocol, batch of one) receives each new token;
        ``should_stop`` is asked before every token after the first (a closed demo tab ends the reply at
        the next token); ``synced_gpus`` keeps every rank stepping until all are done, as expert
        parallelism needs.
        """
        input_ids, embeds, mask = self.embed(batch)
        if settings.num_beams > 1:
            return self._beam_search(input_ids, embeds, mask, settings, synced_gpus)
        return self._decode(embeds, mask, settings, streamer, should_stop, synced_gpus)

    def _beam_search(self, input_ids: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor,
                     settings: GenerationSettings, synced_gpus: bool) -> torch.Tensor:
        """Beams through transformers' generate from the spliced embeddings (generate repeats its inputs
        row by row per beam, which would misalign media tensors whose rows are not one per sample)."""
        kwargs = settings.generate_kwargs()
        if settings.stop:
            kwargs.update(stop_strings=list(settings.stop), tokenizer=self.tokenizer)
        out = self.model.generate(input_ids=input_ids, inputs_embeds=embeds, attention_mask=mask,
                                  pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
                                  synced_gpus=synced_gpus, **kwargs)
        return out[:, input_ids.shape[1]:]

    def prefill(self, embeds: torch.Tensor, mask: torch.Tensor, steps: int) -> tuple[DecodeStep, torch.Tensor,
                                                                                  torch.Tensor]:
        """Run the prompt embeddings [B, S, H] (left-padded under ``mask`` [B, S]) into the static cache of a
        step sized for ``steps`` more tokens. Returns the step, the last position's logits [B, V] (float)
        and the rotary position [B] of the first new token."""
        batch, prompt = mask.shape
        step = self.decode_step(batch, prompt + steps)
        step.valid.zero_()
        step.valid[:, :prompt] = mask.bool()
        step.valid[:, prompt:] = True
        return step, *self.prefill_cache(embeds, mask, step.cache)

    def prefill_cache(self, embeds: torch.Tensor, mask: torch.Tensor,
                      cache: StaticKVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the prompt embeddings [B, S, H] (left-padded under ``mask`` [B, S]) into the first S positions
        of ``cache``. Returns the last position's logits [B, V] (float) and the rotary position [B] of the
        first new token."""
        prompt = mask.shape[1]
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
        slots = torch.arange(prompt, device=mask.device)
        causal = None if bool(mask.all()) else prefill_mask(mask)  # no padding: SDPA's causal (flash) kernel
        hidden = forward_cached(self.model.model.language_model, embeds, positions, cache, slots, causal, prompt)
        return self.model.lm_head(hidden[:, -1]).float(), positions[:, -1] + 1

    def _decode(self, embeds: torch.Tensor, mask: torch.Tensor, settings: GenerationSettings, streamer: Any,
                should_stop: Callable[[], bool] | None, synced_gpus: bool) -> torch.Tensor:
        """Prefill, then the token loop; host checks (finished rows, stop strings) every few steps."""
        batch, prompt = mask.shape
        steps = settings.max_new_tokens
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        step, logits, next_position = self.prefill(embeds, mask, steps)
        finished = torch.zeros(batch, dtype=torch.bool, device=mask.device)
        temperature = settings.temperature if settings.sampled else 0.0
        tokens: list[torch.Tensor] = []
        every = 1 if streamer is not None else CHECK_EVERY
        try:
            for t in range(steps):
                if t > 0 and should_stop is not None and should_stop():
                    break
                block_eos = eos if eos is not None and t < settings.min_new_tokens else None
                new = choose_tokens(logits, self.suppress, block_eos=block_eos, temperature=temperature,
                                    top_p=settings.top_p)
                new = torch.where(finished, pad, new)
                tokens.append(new)
                if eos is not None:
                    finished |= new == eos
                if streamer is not None:
                    streamer.put(new.cpu())
                last = t == steps - 1
                if (t + 1) % every == 0 or last:
                    if settings.stop:
                        finished |= self._stopped(tokens, settings.stop, finished.device)
                    if self._all_done(finished, synced_gpus):
                        break
                if last:
                    break
                logits = step(new, next_position + t, prompt + t)
        finally:
            if streamer is not None:
                streamer.end()
        out = torch.stack(tokens, dim=1)
        return out[:, :self._kept_columns(out, eos, pad)]

    def _stopped(self, tokens: list[torch.Tensor], stop: Sequence[str], device: torch.device) -> torch.Tensor:
        """Rows whose text so far contains a stop string."""
        texts = self.tokenizer.batch_decode(torch.stack(tokens, dim=1), skip_special_tokens=True)
        return torch.tensor([any(s and s in text for s in stop) for text in texts], device=device)

    @staticmethod
    def _all_done(finished: torch.Tensor, synced_gpus: bool) -> bool:
        """Whether every row has finished (on every rank, when synced)."""
        done = finished.all()
        if synced_gpus and dist.is_available() and dist.is_initialized():
            done = done.to(torch.int32)
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        return bool(done)

    @staticmethod
    def _kept_columns(out: torch.Tensor, eos: int | None, pad: int | None) -> int:
        """Columns up to the step at which the last row finished (later columns, if the loop ran past it
        between host checks, hold only padding), as generate returns them."""
        if eos is None:
            return out.shape[1]
        ended = out == eos
        first_end = torch.where(ended.any(dim=1), ended.int().argmax(dim=1), out.shape[1] - 1)
        return int(first_end.max()) + 1


_ENGINES: "weakref.WeakKeyDictionary[UniMoEForCausalLM, GenerationEngine]" = weakref.WeakKeyDictionary()


def engine_for(model: UniMoEForCausalLM, tokenizer: PreTrainedTokenizerBase) -> GenerationEngine:
    """The model's engine (made once, so its static cache and CUDA graph are reused across calls)."""
    engine = _ENGINES.get(model)
    if engine is None or engine.tokenizer is not tokenizer:
        engine = _ENGINES[model] = GenerationEngine(model, tokenizer)
    return engine
