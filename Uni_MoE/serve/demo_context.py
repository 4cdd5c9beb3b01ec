"""What the demo's model sees besides the question: every earlier turn's media stays in the prompt (as in the
original, one conversation holds all its media), so a speech question asked after an image is still
answered with the image in view. The demo shows which media are in context and can drop them, keeping the
earlier questions and answers as text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.schema import PLACEHOLDER_RE, TOKEN_TO_MODALITY
from .demo_engine import PROMPT_ORDER, Conversation

NOTHING = "**In context:** no media. Uploads join the context and stay for the following questions."


@dataclass(frozen=True)
class ContextMedium:
    """One media file the model sees: its modality, file name and the human turn (from 1) that brought it."""

    modality: str
    name: str
    turn: int


def media_in_context(conversation: Conversation) -> list[ContextMedium]:
    """Every media file in the conversation's prompt, by turn, in placeholder order."""
    files = {m: iter(conversation.media[m]) for m in PROMPT_ORDER}
    found: list[ContextMedium] = []
    human = [t for t in conversation.turns if t["from"] == "human"]
    for number, turn in enumerate(human, start=1):
        for token in PLACEHOLDER_RE.findall(turn["value"]):
            modality = TOKEN_TO_MODALITY[token]
            path = next(files[modality], None)
            if path is not None:
                found.append(ContextMedium(modality, Path(path).name, number))
    return found


def without_media(conversation: Conversation) -> Conversation:
    """The conversation with its questions and answers as text only: placeholders and media files removed."""
    turns = [{"from": t["from"], "value": PLACEHOLDER_RE.sub("", t["value"]).lstrip("\n")}
             for t in conversation.turns]
    return Conversation(turns, {m: [] for m in PROMPT_ORDER})


def context_note(conversation: Conversation | None) -> str:
    """A line of Markdown naming the media the next answer will see, and how to drop them."""
    found = media_in_context(conversation) if conversation is not None else []
    if not found:
        return NOTHING
    listed = "; ".join(f"{m.modality} `{m.name}` (turn {m.turn})" for m in found)
    return (f"**In context:** {listed}. The next answer sees these too; press *Forget media* to ask about "
            "new uploads alone (the questions and answers so far stay).")
