"""The vicuna_v1 conversation template and its tokenisation with answer-only labels.

Prompt: ``{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:`` (the original's template).
The ids are the original's (``tokenizer_image_token``: each text chunk between placeholders tokenised
on its own); prompt tokens are masked with IGNORE_INDEX and each answer plus its ``</s>`` is the
target. Placeholders become runs of their token, as long as their modality's feature rows.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from .schema import PLACEHOLDER_RE, TOKEN_TO_MODALITY
from .tokenizer import encode_chunk

IGNORE_INDEX = -100
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROLES = {"human": "USER", "gpt": "ASSISTANT"}


def prompt_pieces(turns: list[dict[str, str]], for_generation: bool = False) -> list[tuple[str, bool]]:
    """Split a conversation into (text, is_target) pieces of the vicuna_v1 template.

    With ``for_generation`` the last gpt turn (if any) is dropped and the text ends in ``ASSISTANT:``.
    """
    if for_generation and turns and turns[-1]["from"] == "gpt":
        turns = turns[:-1]
    pieces: list[tuple[str, bool]] = []
    prefix = SYSTEM + " "
    for turn in turns:
        if turn["from"] == "human":
            pieces.append((f"{prefix}USER: {turn['value']} ASSISTANT:", False))
            prefix = ""
        else:
            pieces.append((" " + turn["value"], True))
    if not for_generation and (not pieces or not pieces[-1][1]):
        raise ValueError("a training conversation must end with a gpt answer")
    return pieces


def render_prompt(turns: list[dict[str, str]], for_generation: bool = True) -> str:
    """The template as one string (``</s>`` after each answer), for logs and prediction files."""
    return "".join(text + ("</s>" if target else "") for text, target in prompt_pieces(turns, for_generation))


def _template_with_targets(pieces: list[tuple[str, bool]], eos: str) -> tuple[str, list[tuple[int, int]]]:
    """The template text (``eos`` after each answer) and the character span of each answer with its eos."""
    text, spans = "", []
    for piece, is_target in pieces:
        if is_target:
            spans.append((len(text), len(text) + len(piece) + len(eos)))
            piece += eos
        text += piece
    return text, spans


def encode_template(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    placeholder_lengths: dict[str, list[int]],
    placeholder_ids: dict[str, int],
) -> tuple[list[int], list[int | None]]:
    """Ids of a template text as the original made them: BOS, then each text chunk between placeholders
    tokenised on its own (``encode_chunk``), each placeholder a run of its token (``placeholder_lengths[m][j]``
    tokens for the j-th item of m); and the character each token starts at (None for BOS and placeholders)."""
    queues = {m: list(v) for m, v in placeholder_lengths.items()}
    ids: list[int] = [tokenizer.bos_token_id]
    starts: list[int | None] = [None]
    offset = 0
    for part in PLACEHOLDER_RE.split(text):
        if part in TOKEN_TO_MODALITY:
            modality = TOKEN_TO_MODALITY[part]
            if not queues.get(modality):
                raise ValueError(f"more {part} placeholders than {modality} items")
            run = queues[modality].pop(0)
            ids += [placeholder_ids[modality]] * run
            starts += [None] * run
        elif part:
            chunk_ids, chunk_starts = encode_chunk(tokenizer, part)
            ids += chunk_ids
            starts += [offset + s for s in chunk_starts]
        offset += len(part)
    leftover = {m: len(q) for m, q in queues.items() if q}
    if leftover:
        raise ValueError(f"media items without placeholders: {leftover}")
    return ids, starts


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    turns: list[dict[str, str]],
    placeholder_lengths: dict[str, list[int]],
    placeholder_ids: dict[str, int],
    for_generation: bool = False,
) -> tuple[list[int], list[int]]:
    """Token ids (``encode_template`` of the conversation's template) and labels: a token is a target when
    it starts inside an answer or its eos."""
    text, spans = _template_with_targets(prompt_pieces(turns, for_generation), tokenizer.eos_token)
    ids, starts = encode_template(tokenizer, text, placeholder_lengths, placeholder_ids)
    labels = [t if s is not None and any(a <= s < b for a, b in spans) else IGNORE_INDEX for t, s in zip(ids, starts)]
    return ids, labels


def tokenize_prompt(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    placeholder_lengths: dict[str, list[int]],
    placeholder_ids: dict[str, int],
) -> list[int]:
    """Token ids of a ready prompt (``render_prompt``'s, ``apply_chat_template``'s): the ids
    ``tokenize_conversation`` gives the same conversation."""
    return encode_template(tokenizer, text, placeholder_lengths, placeholder_ids)[0]
