"""The synthetic tasks' closed answer sets and their scorer, apart from the generator (which needs the
media stack), so that eval and training's held-out check score replies without loading it."""

from __future__ import annotations

import re
from collections import defaultdict

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 210, 30)}
SHAPES = ("circle", "square", "triangle")
WORDS = ("cat", "dog", "bird", "horse")
SOUNDS = ("hum", "whistle", "noise", "beeps")

TASK_CHOICES: dict[str, list[str]] = {
    "image_colour": list(COLOURS),
    "image_shape": list(SHAPES),
    "speech_word": list(WORDS),
    "speech_long": list(WORDS),
    "image_speech": list(COLOURS) + list(SHAPES),  # the spoken question picks colour or shape
    "audio_class": list(SOUNDS),
    "video_colour": list(COLOURS),
    "video_sound": list(SOUNDS),
}


def first_word(text: str) -> str:
    """The first lower-cased alphanumeric word ("" if none): a closed answer's form in a free reply."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return words[0] if words else ""


def synthetic_accuracy(
    tasks: list[str], answers: list[str], replies: list[str]
) -> tuple[dict[str, dict[str, float]], list[float]]:
    """Per task: n, accuracy of the reply's first word against the answer, and chance (1 / #choices: the
    task's choice list, else the distinct answers seen); and each reply's hit (1.0 or 0.0)."""
    hits = [float(first_word(p) == first_word(a)) for a, p in zip(answers, replies)]
    by_task: dict[str, list[float]] = defaultdict(list)
    seen: dict[str, set[str]] = defaultdict(set)
    for task, answer, hit in zip(tasks, answers, hits):
        by_task[task].append(hit)
        seen[task].add(answer)
    per = {t: {"n": len(v), "accuracy": sum(v) / len(v), "chance": 1.0 / len(TASK_CHOICES.get(t) or seen[t])}
           for t, v in sorted(by_task.items())}
    return per, hits
