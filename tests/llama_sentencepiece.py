"""A small LLaMA-style sentencepiece tokenizer, trained here in a fraction of a second and saved the way
the released checkpoints ship theirs (tokenizer.model + tokenizer_config.json + special_tokens_map.json)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import sentencepiece as spm

SENTENCES = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What colour is the shape in the picture? ASSISTANT: The shape is red.",
    "USER: Which sound do you hear? ASSISTANT: A dog barks twice, then a bell rings.",
    "Answer with the option's letter from the given choices directly.",
    "There are 12 circles and 345 squares on the table.",
]


def train_llama_sentencepiece(vocab_size: int = 400) -> bytes:
    """A BPE sentencepiece model with LLaMA's settings: ids 0-2 <unk> <s> </s>, byte fallback (ids 3-258),
    dummy prefix, identity normalisation, spaces kept, digits split."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 8), model_writer=out, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", split_digits=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2,
    )
    return out.getvalue()


def _added_token(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def write_release_tokenizer(folder: Path, model: bytes, legacy: bool | None = None) -> Path:
    """The three tokenizer files of a LLaVA-style release; ``legacy`` None leaves the key out."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model)
    config = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": _added_token("<s>"),
        "eos_token": _added_token("</s>"), "unk_token": _added_token("<unk>"), "pad_token": None,
        "clean_up_tokenization_spaces": False, "model_max_length": 2048, "padding_side": "right",
        "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
    }
    if legacy is not None:
        config["legacy"] = legacy
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {k: {key: v for key, v in _added_token(t).items() if key != "__type"}
               for k, t in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))}
    (folder / "special_tokens_map.json").write_text(json.dumps({**special, "pad_token": "<unk>"}, indent=2))
    return folder
