"""The one chat prompt builder of the CLI, the v2 chat and the demo: turns in the original schema with a
placeholder per media file in the turn that brought it, and the files themselves in placeholder order."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..data.schema import PLACEHOLDER_RE, Sample
from ..modalities import PLACEHOLDERS, PROMPT_ORDER


@dataclass
class Conversation:
    """The turns so far (original schema) and every media file they refer to, in placeholder order."""

    turns: list[dict[str, str]] = field(default_factory=list)
    media: dict[str, list[Any]] = field(default_factory=lambda: {m: [] for m in PROMPT_ORDER})

    def with_question(self, question: str, uploads: dict[str, list[Any]]) -> "Conversation":
        """A copy with one more human turn: a placeholder per upload (in prompt order), then the question.
        Placeholders typed by the user are removed: only real uploads may ask for media."""
        text = PLACEHOLDER_RE.sub("", question).strip()
        tokens = "".join(PLACEHOLDERS[m] + "\n" for m in PROMPT_ORDER for _ in uploads.get(m, []))
        new_media = {m: files + list(uploads.get(m, [])) for m, files in self.media.items()}
        return Conversation(self.turns + [{"from": "human", "value": tokens + text}], new_media)

    def with_answer(self, answer: str) -> "Conversation":
        return dataclasses.replace(self, turns=self.turns + [{"from": "gpt", "value": answer}])

    def sample(self) -> Sample:
        m = self.media
        return Sample(0, "chat", self.turns, m["image"], m["video"], m["speech"], m["audio"])

    def record(self) -> dict[str, Any]:
        """The conversation as a record of the data JSON schema (one image as a plain path, as the
        original's records have it; the schema holds at most one video)."""
        m = self.media
        if len(m["video"]) > 1:
            raise ValueError(f"a record holds one video; this conversation has {len(m['video'])}")
        record: dict[str, Any] = {}
        if m["image"]:
            record["image"] = m["image"][0] if len(m["image"]) == 1 else list(m["image"])
        if m["video"]:
            record["video"] = m["video"][0]
        record.update({k: list(m[k]) for k in ("speech", "audio") if m[k]})
        record["conversations"] = list(self.turns)
        return record
