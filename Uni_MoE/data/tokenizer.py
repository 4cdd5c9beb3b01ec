"""Tokenizer helpers: placeholder tokens, loading, and a small tokenizer trained locally.

Placeholders (``<image>``, ``<video>``, ``<speech>``, ``<audio>``) are real vocabulary tokens; the
data pipeline repeats each one as many times as its modality yields feature rows.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..modalities import PLACEHOLDERS
from ..model_folder import require_model_folder
from .llama_tokenization import encode_llama_chunk, release_legacy_flag, tokenizer_config

BASE_SPECIALS = ["<unk>", "<s>", "</s>"]
LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")
SENTENCEPIECE_NEEDS = {"sentencepiece": "sentencepiece", "protobuf": "google.protobuf"}  # package: module


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def add_placeholder_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Add the four placeholder tokens (if missing) and return their ids by modality."""
    missing = [t for t in PLACEHOLDERS.values() if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return {m: tokenizer.convert_tokens_to_ids(t) for m, t in PLACEHOLDERS.items()}


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer folder (LLaMA's, or ours) and make sure placeholders and padding exist.

    A LLaMA tokenizer (``tokenizer_class`` LlamaTokenizer[Fast]) keeps the release's ``legacy`` flag (4.31's
    default, True, when absent), written back on ``save_pretrained``; ``encode_chunk`` follows it. A path
    that is not a folder is named, never looked up online.
    """
    folder = require_model_folder(path)
    missing = [name for name, module in SENTENCEPIECE_NEEDS.items() if not _importable(module)]
    if missing and (folder / "tokenizer.model").is_file() and not (folder / "tokenizer.json").is_file():
        raise ImportError(f"{folder / 'tokenizer.model'} is a sentencepiece model; reading it needs: pip install "
                          + " ".join(missing))
    if tokenizer_config(folder).get("tokenizer_class") in LLAMA_CLASSES:  # AutoTokenizer would follow a
        tokenizer = LlamaTokenizer.from_pretrained(str(path))             # release's llava config.json instead
        tokenizer.legacy = tokenizer.init_kwargs["legacy"] = release_legacy_flag(folder)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    add_placeholder_tokens(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def encode_chunk(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[int]]:
    """Ids (no BOS) of one text chunk between media placeholders, as the original tokenized it, and the
    character each token starts at. Special-token text (``</s>``) becomes its id."""
    if isinstance(tokenizer, LlamaTokenizer):
        return encode_llama_chunk(tokenizer, text)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [start for start, _ in enc["offset_mapping"]]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a SentencePiece-style BPE (metaspace) on ``texts``: ids 0-2 are <unk>, <s>, </s> as in
    LLaMA, and the four placeholders are the last ids."""
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.normalizer = normalizers.NFKC()
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(PLACEHOLDERS), special_tokens=BASE_SPECIALS, show_progress=False
    )
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )
    add_placeholder_tokens(tokenizer)
    return tokenizer
