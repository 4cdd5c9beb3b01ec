"""Decoding a stream of samples with finished rows refilled: when a sequence of the batch ends, the next
waiting samples are prefilled into its cache row and join the running decode, so a long answer no longer
holds a whole batch of short ones (nor the other way round).

The engine's static cache is shared by all rows and every step writes one cache position for all of them.
A sample that joins at position ``slot`` is prefilled on its own (several joining samples as one
left-padded batch) into a temporary cache, whose keys and values are copied into its row just before
``slot``; the row's valid-key mask hides what the row held before. The step's shapes never change, so
its CUDA graph keeps replaying. A round ends when no waiting sample fits (a prompt longer than the
positions before ``slot``, or no room left for its answer) and its rows have finished; the next round
starts from an empty cache sized for its first samples.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterable, Iterator

import torch

from .engine import CHECK_EVERY, GenerationEngine, GenerationSettings
from .sampling import choose_tokens
from .static_cache import StaticKVCache

Item = tuple[Any, dict[str, Any]]  # (the caller's key, one dataset item)


class _Round:
    """One static cache of ``rows`` rows and the samples decoding in it."""

    def __init__(self, engine: GenerationEngine, settings: GenerationSettings, batch: dict[str, Any],
                 keys: list[Any]) -> None:
        self.engine, self.settings = engine, settings
        prompt = batch["input_ids"].shape[1]
        # room for the first samples' answers and as many steps again for samples that join later
        rows = len(keys)
        self.step = engine.decode_step(rows, prompt + 2 * settings.max_new_tokens)
        self.step.valid.zero_()
        device = self.step.valid.device
        self.slot = prompt
        self.logits = torch.zeros(rows, engine.model.config.text_config.vocab_size, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.counts = torch.zeros(rows, dtype=torch.long, device=device)
        self.finished = torch.ones(rows, dtype=torch.bool, device=device)
        self.keys: list[Any] = [None] * rows
        self.starts = [0] * rows
        self.tokens: list[torch.Tensor] = []  # each step's new tokens [rows]
        self.join(list(range(rows)), keys, batch)

    def fits(self, prompt: int) -> bool:
        """Whether a prompt of this length can join now: it fits before the slot, its answer after it."""
        return prompt <= self.slot and self.slot + self.settings.max_new_tokens <= self.step.length

    def join(self, rows: list[int], keys: list[Any], batch: dict[str, Any]) -> None:
        """Prefill the collated ``batch`` into cache ``rows`` just before the slot."""
        engine = self.engine
        _, embeds, mask = engine.embed(batch)
        n, prompt = mask.shape
        scratch = StaticKVCache(engine.model.model.language_model, n, prompt)
        logits, next_position = engine.prefill_cache(embeds, mask, scratch)
        index = torch.tensor(rows, device=mask.device)
        begin, cache = self.slot - prompt, self.step.cache
        cache.keys[:, index, :, begin:self.slot] = scratch.keys
        cache.values[:, index, :, begin:self.slot] = scratch.values
        valid = torch.ones(n, self.step.length, dtype=torch.bool, device=mask.device)
        valid[:, :begin] = False
        valid[:, begin:self.slot] = mask.bool()
        self.step.valid[index] = valid
        self.logits[index] = logits
        self.positions[index] = next_position
        self.counts[index] = 0
        self.finished[index] = False
        for row, key in zip(rows, keys):
            self.keys[row], self.starts[row] = key, len(self.tokens)

    def choose(self) -> torch.Tensor:
        """Every row's next token [rows] from its logits (pad for rows with nothing to decode)."""
        settings, tokenizer = self.settings, self.engine.tokenizer
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        logits = self.logits
        if eos is not None and settings.min_new_tokens > 0:
            logits = logits.clone()
            logits[:, eos] = torch.where(self.counts < settings.min_new_tokens, float("-inf"), logits[:, eos])
        temperature = settings.temperature if settings.sampled else 0.0
        new = choose_tokens(logits, self.engine.suppress, temperature=temperature, top_p=settings.top_p)
        new = torch.where(self.finished, pad, new)
        self.tokens.append(new)
        self.counts += ~self.finished
        ended = self.counts >= settings.max_new_tokens
        if eos is not None:
            ended |= new == eos
        self.finished |= ended
        return new

    def advance(self, new: torch.Tensor) -> None:
        """One decoding step of every row on its ``new`` token; keeps the logits of the next ones."""
        self.logits = self.step(new, self.positions, self.slot)
        self.positions += 1
        self.slot += 1

    def reply(self, row: int) -> torch.Tensor:
        """The row's new tokens, up to and with its end-of-sequence token."""
        out = torch.stack(self.tokens[self.starts[row]:], dim=1)[row, :self.settings.max_new_tokens]
        eos = self.engine.tokenizer.eos_token_id
        ends = (out == eos).nonzero()
        return out[: int(ends[0]) + 1] if eos is not None and len(ends) else out

    def harvest(self) -> list[tuple[Any, torch.Tensor]]:
        """The finished rows' (key, reply); those rows become free (stop strings end rows here too)."""
        stop = self.settings.stop
        if stop:
            for row, key in enumerate(self.keys):
                if key is not None:
                    text = self.engine.tokenizer.decode(self.reply(row), skip_special_tokens=True)
                    if any(s and s in text for s in stop):
                        self.finished[row] = True
        done = self.finished.tolist()
        out = []
        for row, key in enumerate(self.keys):
            if key is not None and done[row]:
                out.append((key, self.reply(row)))
                self.keys[row] = None
        return out

    @property
    def free_rows(self) -> list[int]:
        return [row for row, key in enumerate(self.keys) if key is None]


def _check_due(round_: _Round, steps: int, max_new: int) -> bool:
    """Host checks every few steps, and at once when a row has reached the token limit."""
    return steps % CHECK_EVERY == 0 or any(key is not None and len(round_.tokens) - start >= max_new
                                           for key, start in zip(round_.keys, round_.starts))


@torch.inference_mode()
def generate_refilling(engine: GenerationEngine, items: Iterable[Item], settings: GenerationSettings, rows: int,
                       collate: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> Iterator[tuple[Any, torch.Tensor]]:
    """(key, new tokens) for every (key, dataset item), as rows finish (not in input order). Greedy or
    sampled decoding over at most ``rows`` rows; ``collate`` makes a left-padded batch of items. Feed
    items longest prompt first: a joining prompt must fit before the current cache position."""
    if settings.num_beams > 1:
        raise ValueError("refilled rows decode greedily or by sampling; beam search runs batch by batch")
    source, waiting = iter(items), deque()

    def take(n: int) -> list[Item]:
        while len(waiting) < n:
            item = next(source, None)
            if item is None:
                break
            waiting.append(item)
        return [waiting.popleft() for _ in range(min(n, len(waiting)))]

    while True:
        first = take(rows)
        if not first:
            return
        round_ = _Round(engine, settings, collate([item for _, item in first]), [key for key, _ in first])
        steps = 0
        while True:
            round_.advance(round_.choose())
            steps += 1
            if not _check_due(round_, steps, settings.max_new_tokens):
                continue
            yield from round_.harvest()
            free = round_.free_rows
            joining = take(len(free))
            fits = [round_.fits(len(item["input_ids"])) for _, item in joining]
            fit = [item for item, ok in zip(joining, fits) if ok]
            waiting.extendleft(reversed([item for item, ok in zip(joining, fits) if not ok]))
            if fit:
                round_.join(free[:len(fit)], [key for key, _ in fit], collate([item for _, item in fit]))
            if len(round_.free_rows) == len(round_.keys):
                break
