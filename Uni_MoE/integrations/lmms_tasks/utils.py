"""lmms-eval task functions for the project's sample tasks (``data_sample``): media as lmms-eval models get
them (PIL images, audio dicts, video paths) and the synthetic tasks' first-word accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import soundfile as sf
from PIL import Image

from Uni_MoE.data.synthetic_tasks import first_word

DATA_ROOT = Path(__file__).resolve().parents[3] / "data_sample"


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    """The document's image (PIL), audio (``{"array", "sampling_rate"}``) or video (a path)."""
    if doc.get("image"):
        with Image.open(DATA_ROOT / doc["image"]) as img:
            return [img.convert("RGB")]
    if doc.get("audio"):
        wave, rate = sf.read(DATA_ROOT / doc["audio"], dtype="float32")
        return [{"array": wave, "sampling_rate": rate, "path": str(DATA_ROOT / doc["audio"])}]
    if doc.get("video"):
        return [str(DATA_ROOT / doc["video"])]
    return []


def doc_to_text(doc: dict[str, Any]) -> str:
    return doc["question"]


def doc_to_choice(doc: dict[str, Any]) -> list[str]:
    return list(doc["choices"])


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Accuracy of the reply's first word against the answer (the project's synthetic-task score)."""
    return {"accuracy": float(first_word(results[0]) == first_word(doc["answer"]))}
