"""LLaMA text tokenization as the released Uni-MoE models saw it: transformers 4.31's slow LlamaTokenizer.

The original tokenizes each text chunk between media placeholders on its own. Under 4.31 every piece of a
chunk between special tokens (``<s>``, ``</s>``, ``<unk>``) goes through sentencepiece, which prepends its
dummy-prefix space; so a chunk starting with a space (``" ASSISTANT:"`` after ``<audio>``) begins with the
lone ``▁`` token (29871 in LLaMA). transformers 5 prepends that space once per text, so it is redone here
on the tokenizer's own BPE table, which encodes exactly as the sentencepiece model does.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path

from tokenizers import Tokenizer, normalizers
from transformers import LlamaTokenizer

SPIECE_UNDERLINE = "▁"
_BACKENDS: "weakref.WeakKeyDictionary[LlamaTokenizer, tuple[int, Tokenizer]]" = weakref.WeakKeyDictionary()


def tokenizer_config(folder: str | Path) -> dict:
    """A tokenizer folder's tokenizer_config.json ({} when it has none)."""
    path = Path(folder) / "tokenizer_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def release_legacy_flag(folder: str | Path) -> bool:
    """The ``legacy`` setting of a tokenizer folder as 4.31 read it: absent or null means True."""
    return tokenizer_config(folder).get("legacy") is not False


def _per_piece_prefix_backend(tokenizer: LlamaTokenizer) -> Tokenizer:
    """The tokenizer's BPE table with sentencepiece's normaliser (dummy prefix, spaces as ``▁``) applied
    to each piece between special tokens, as 4.31 ran sentencepiece on each piece."""
    cached = _BACKENDS.get(tokenizer)
    if cached is not None and cached[0] == len(tokenizer):
        return cached[1]
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend(SPIECE_UNDERLINE), normalizers.Replace(" ", SPIECE_UNDERLINE)]
    )
    backend.pre_tokenizer = None
    _BACKENDS[tokenizer] = (len(tokenizer), backend)
    return backend


def encode_llama_chunk(tokenizer: LlamaTokenizer, text: str) -> tuple[list[int], list[int]]:
    """Ids (no BOS) of one text chunk under 4.31's rule, and the character of ``text`` each token starts at.

    ``tokenizer.legacy`` False follows 4.31's ``legacy=False``: a piece after a special token that does not
    start with a space loses the dummy prefix from its first token (looked up as a piece; ``<unk>`` if the
    vocabulary lacks it).
    """
    legacy = getattr(tokenizer, "legacy", None) is not False
    if not legacy:
        text = text.replace(SPIECE_UNDERLINE, " ")
    backend = _per_piece_prefix_backend(tokenizer)
    enc = backend.encode(text, add_special_tokens=False)
    starts = [start for start, _ in enc.offsets]
    if legacy:
        return list(enc.ids), starts
    specials = set(tokenizer.all_special_tokens)
    ids: list[int] = []
    kept: list[int] = []
    after_special = False
    for token_id, token, (start, end) in zip(enc.ids, enc.tokens, enc.offsets):
        is_special = token in specials and text[start:end] == token
        if after_special and not is_special and token.startswith(SPIECE_UNDERLINE) and text[start] != " ":
            token = token[1:]
            token_id = backend.token_to_id(token) if token else None
            token_id = tokenizer.unk_token_id if token and token_id is None else token_id
        after_special = is_special
        if token_id is not None:
            ids.append(token_id)
            kept.append(start)
    return ids, kept
