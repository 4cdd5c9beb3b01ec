"""The lmms-eval model ``uni_moe``: ``python -m lmms_eval --model uni_moe --model_args pretrained=FOLDER ...``.

Registered through lmms-eval's ``lmms_eval.models`` entry point (``pip install -e .[lmms]``), so lmms-eval
runs unchanged. ``generate_until`` decodes in batches with the project's cached generation; ``loglikelihood``
(multiple-choice tasks) scores the continuations of a batch in one forward pass. Model arguments:
``pretrained`` (a save_pretrained folder or an original release), ``device``, ``dtype``, ``batch_size``,
``ep_size`` (experts sharded over that many ranks with DeepSpeed-MoE) and ``voice`` (``speech`` or
``audio``: which encoder hears audio; default the model's). Started with ``accelerate launch`` or
``torchrun``, each rank evaluates its share of the documents (lmms-eval splits them); with ``ep_size`` the
ranks also exchange tokens in every MoE layer, so they step through the same number of batches.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from lmms_eval.utils import simple_parse_args_string
from tqdm import tqdm

from ..checkpoint.loader import load_model
from ..processing_uni_moe import UniMoEProcessor
from ..serve.generate import GenerationSettings, cut_at_stop, generate_token_ids
from .lmms_inputs import continuation_logprobs, encode_prompts


def settings_from(gen_kwargs: dict[str, Any], default_max_new_tokens: int) -> GenerationSettings:
    """lmms-eval's generation_kwargs as our settings: ``until`` strings stop a reply; temperature 0 is greedy."""
    until = gen_kwargs.get("until") or ()
    until = (until,) if isinstance(until, str) else tuple(until)
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    return GenerationSettings(
        max_new_tokens=int(gen_kwargs.get("max_new_tokens") or default_max_new_tokens),
        do_sample=bool(gen_kwargs.get("do_sample", temperature > 0)) and temperature > 0,
        temperature=temperature or 1.0,
        top_p=float(gen_kwargs.get("top_p") or 1.0),
        num_beams=int(gen_kwargs.get("num_beams") or 1),
        stop=until,
    )


class UniMoELMMS(lmms):
    """Uni-MoE for lmms-eval: batched generation and continuation log-likelihoods."""

    def __init__(self, pretrained: str, device: str | None = None, dtype: str = "auto", batch_size: int | str = 8,
                 ep_size: int | None = None, voice: str | None = None, max_new_tokens: int = 256,
                 **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"uni_moe: unknown --model_args {sorted(kwargs)}; known: pretrained, device, dtype, "
                             "batch_size, ep_size, voice, max_new_tokens")
        ep = int(ep_size) if ep_size not in (None, "", 0) else None
        if ep is not None:  # torch.distributed through DeepSpeed, before lmms-eval's Accelerator adopts it
            from ..eval.distributed import init_expert_parallel

            ranks = init_expert_parallel(ep)
            self._rank, self._world_size = ranks.rank, ranks.world_size
            device = device or ranks.device()
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1:  # data parallel under accelerate launch / torchrun
            from accelerate import Accelerator

            self.accelerator = Accelerator()
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
            device = device or str(self.accelerator.device)
        self.ep_size = ep
        self.model, self.tokenizer = load_model(pretrained, device, dtype, ep)
        self.processor = UniMoEProcessor.from_config(self.model.config, self.tokenizer)
        self.voice = voice or self.model.config.voice_modality
        if self.voice not in ("speech", "audio"):
            raise ValueError(f"uni_moe: voice={self.voice!r}: expected speech or audio")
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> "UniMoELMMS":
        """``--model_args`` win over the CLI's ``--batch_size`` / ``--device`` (whose defaults are always sent)."""
        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items()
                 if v is not None and k not in args and k in ("batch_size", "device")}
        return cls(**args, **extra)

    def _doc_visuals(self, doc_to_visual: Any, doc_id: int, task: str, split: str) -> Any:
        return doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None

    def _batches(self, requests: list[Instance], same: Any) -> Iterator[list[tuple[int, Instance]]]:
        """Runs of at most ``batch_size`` consecutive requests with equal ``same(request)``, in order; under
        expert parallelism every rank steps through as many batches (repeating its last one), because each
        MoE forward exchanges tokens between the ranks."""
        batches: list[list[tuple[int, Instance]]] = []
        for i, request in enumerate(requests):
            if batches and len(batches[-1]) < self.batch_size and same(batches[-1][0][1]) == same(request):
                batches[-1].append((i, request))
            else:
                batches.append([(i, request)])
        total = len(batches)
        if self.ep_size is not None and self.world_size > 1:
            count = torch.tensor([total], device=self.model.device)
            torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
            total = int(count.item())
        for n in range(total):
            yield batches[n] if n < len(batches) else [(-1, r) for _, r in batches[-1]] if batches else []

    def generate_until(self, requests: list[Instance]) -> list[str]:
        replies = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="uni_moe generating")
        for batch in self._batches(requests, lambda r: repr(sorted(r.args[1].items()))):
            if not batch:
                continue
            args = [r.args for _, r in batch]
            contexts = [a[0] for a in args]
            visuals = [self._doc_visuals(a[2], a[3], a[4], a[5]) for a in args]
            settings = settings_from(dict(args[0][1]), self.max_new_tokens)
            inputs = encode_prompts(self.processor, contexts, visuals, self.voice, padding_side="left")
            with torch.inference_mode():
                new = generate_token_ids(self.model, self.tokenizer, dict(inputs), settings,
                                         synced_gpus=self.ep_size is not None and self.world_size > 1)
            for (i, _), text in zip(batch, self.tokenizer.batch_decode(new, skip_special_tokens=True)):
                if i >= 0:
                    replies[i] = cut_at_stop(text, settings.stop)
                    bar.update(1)
        bar.close()
        return replies

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """(the continuation's negative log-likelihood, summed over its tokens; whether it is the greedy
        continuation) per request. Negative because lmms-eval's multiple-choice scoring picks the choice with
        the lowest value (its models return a loss); wrapped in ``GenerationResult`` because lmms-eval 0.7.3
        turns any other non-string reply into its ``str`` before that scoring unpacks it."""
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="uni_moe log-likelihoods")
        for batch in self._batches(requests, lambda r: 0):
            if not batch:
                continue
            args = [r.args for _, r in batch]
            contexts, continuations = [], []
            for context, target, doc_to_visual, doc_id, task, split in args:
                doc = self.task_dict[task][split][doc_id]
                continuation = target if isinstance(target, str) else target(doc)
                contexts.append(context)
                continuations.append(self.tokenizer(continuation, add_special_tokens=False)["input_ids"])
            visuals = [self._doc_visuals(a[2], a[3], a[4], a[5]) for a in args]
            inputs = encode_prompts(self.processor, contexts, visuals, self.voice, padding_side="right")
            scored = continuation_logprobs(self.model, inputs, continuations, self.tokenizer.pad_token_id)
            for (i, _), result in zip(batch, scored):
                if i >= 0:
                    results[i] = result
                    bar.update(1)
        bar.close()
        return [GenerationResult(text=(-logprob, greedy)) for logprob, greedy in results]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("uni_moe: multi-round generation is not supported; use single-turn tasks")
