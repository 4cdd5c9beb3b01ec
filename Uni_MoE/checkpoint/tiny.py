"""Build the tiny default checkpoint offline: a locally trained tokenizer and a randomly initialised
few-MB Uni-MoE with every encoder, saved with ``save_pretrained`` beside its processor.

    python -m Uni_MoE.checkpoint.tiny --out checkpoint/tiny            # dense LLM (stage-1 start)
    python -m Uni_MoE.checkpoint.tiny --out checkpoint/tiny-moe --moe  # 4 experts in every layer
    python -m Uni_MoE.checkpoint.tiny --out wide --moe --hidden_size 4096 --intermediate_size 11008 \
        --num_heads 32 --num_layers 4                                    # LLaMA-7B width, for GPU runs
"""

from __future__ import annotations

import argparse
import string
from pathlib import Path

import torch

from .. import presets
from ..data.conversation import ROLES, SYSTEM
from ..data.tokenizer import train_tokenizer
from ..modalities import MODALITIES
from ..model.uni_moe import UniMoEForCausalLM
from ..processing_uni_moe import UniMoEProcessor

WORDS = (
    "the a an is are was what which who where when how many much colour color shape picture image video "
    "audio sound speech spoken word say said hear heard see seen in on of to and or not yes no it this that "
    "there one two three four five six seven eight nine ten red green blue yellow black white orange purple "
    "circle square triangle star cat dog bird fish cow horse sheep tone high low noise beep beeps hum music "
    "moving move moves left right up down answer question describe please tell me about first last short "
    "long letter option choose best following is correct true false"
)


def tokenizer_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: the template, common words and the synthetic tasks."""
    texts = [SYSTEM, " ".join(ROLES.values()), WORDS, string.printable]
    try:
        from ..data import synthetic

        texts += list(getattr(synthetic, "corpus_texts", lambda: [])())
    except ImportError:
        pass
    return texts * 4


def build_tiny(out: str | Path, moe: bool = False, seed: int = 0, vocab_size: int = 1024,
               llm: dict[str, int] | None = None) -> Path:
    """Write a tiny checkpoint (config, safetensors weights, tokenizer) to ``out``; ``llm`` overrides fields
    of the LLaMA config (e.g. ``hidden_size``, ``num_hidden_layers``) for a model of another width."""
    out = Path(out)
    tokenizer = train_tokenizer(tokenizer_corpus(), vocab_size=vocab_size)
    ids = {m.token_id_field: tokenizer.convert_tokens_to_ids(m.placeholder) for m in MODALITIES.values()}
    config = presets.tiny(vocab_size=len(tokenizer), placeholder_ids=ids, moe_layers="all" if moe else "none")
    for key, value in (llm or {}).items():
        setattr(config.text_config, key, value)
    if llm and "num_attention_heads" in llm:
        config.text_config.num_key_value_heads = llm["num_attention_heads"]
    config.text_config.pad_token_id = tokenizer.pad_token_id
    config.text_config.bos_token_id = tokenizer.bos_token_id
    config.text_config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = UniMoEForCausalLM(config)
    # At std 0.02 Whisper's conv front-end is drowned by its sinusoidal positions (content ~0.5% of the
    # output), so a random encoder would pass on almost no speech; He init keeps the content audible.
    for conv in (model.model.speech_encoder.conv1, model.model.speech_encoder.conv2):
        torch.nn.init.kaiming_normal_(conv.weight)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    UniMoEProcessor.from_config(config, tokenizer).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="checkpoint/tiny")
    parser.add_argument("--moe", action="store_true", help="mixture of 4 experts in every layer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden_size", type=int, help="LLM width (default: the tiny preset's)")
    parser.add_argument("--intermediate_size", type=int, help="LLM MLP width")
    parser.add_argument("--num_layers", type=int, dest="num_hidden_layers", help="LLM depth")
    parser.add_argument("--num_heads", type=int, dest="num_attention_heads", help="LLM attention heads")
    args = parser.parse_args()
    llm = {k: getattr(args, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                         "num_attention_heads") if getattr(args, k) is not None}
    path = build_tiny(args.out, moe=args.moe, seed=args.seed, llm=llm)
    size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
    print(f"tiny checkpoint written to {path} ({size:.1f} MB)")


if __name__ == "__main__":
    main()
