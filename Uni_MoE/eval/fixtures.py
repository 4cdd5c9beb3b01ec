"""Small benchmark files in each eval ``--data_type``'s own format, with media made by ``data.synthetic``.

    python -m Uni_MoE.eval.fixtures --out eval_fixtures [--n 3]

Each file copies the layout of the benchmark's released eval JSON (OK-VQA / A-OKVQA / MM-Vet / MMBench1.1
as in the original's data_sample, LLaVA's POPE, TextVQA and SEED-Bench files, ClothoAQA / Clotho / RACE /
listening / MSVD / ActivityNet records with ``voice``), so the whole eval path runs offline on real
formats. Media paths start with "/" and are relative to the output folder, as the original's are.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..data import synthetic as syn
from ..data.synthetic_tasks import COLOURS, SHAPES, SOUNDS, WORDS
from .tasks import LETTER_ANSWER, SHORT_ANSWER

IMAGE_SIZE = 64
SOUND_SECONDS = 1.0


class MediaMaker:
    """Writes synthetic media under ``root`` and returns their "/"-rooted relative paths."""

    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.rng = np.random.default_rng(seed)
        self.count = 0
        self.answers: dict[Any, list[str]] = {}  # question id -> human answers kept out of the records

    def _path(self, folder: str, suffix: str) -> tuple[Path, str]:
        self.count += 1
        rel = f"{folder}/{self.count:04d}{suffix}"
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path, "/" + rel

    def pick(self, choices: Any) -> str:
        return str(self.rng.choice(list(choices)))

    def image(self, colour: str, shape: str) -> str:
        path, rel = self._path("images", ".png")
        syn.random_shape_image(self.rng, IMAGE_SIZE, colour, shape).save(path)
        return rel

    def sound(self, kind: str, seconds: float = SOUND_SECONDS) -> str:
        path, rel = self._path("sounds", ".wav")
        syn.write_wav(path, syn.sound_wave(self.rng, kind, seconds))
        return rel

    def speech(self, texts: list[str], min_seconds: float = 0.0) -> str:
        path, rel = self._path("speech", ".wav")
        syn.write_wav(path, syn.spoken(self.rng, texts, min_seconds))
        return rel

    def video_frames(self, colour: str) -> list[str]:
        folder, rel = self._path("frames", "")
        folder.mkdir(parents=True, exist_ok=True)
        rels = []
        for k, img in enumerate(syn.moving_shape_frames(self.rng, IMAGE_SIZE, colour)):
            img.save(folder / f"{k:03d}.jpg")
            rels.append(f"{rel}/{k:03d}.jpg")
        return rels

    def video_file(self, colour: str, sound: str) -> str:
        path, rel = self._path("videos", ".mp4")
        frames = syn.moving_shape_frames(self.rng, IMAGE_SIZE, colour)
        syn.write_mp4(path, frames, syn.sound_wave(self.rng, sound, len(frames) / syn.VIDEO_FPS))
        return rel


def _turns(human: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": human}, {"from": "gpt", "value": ""}]


def _options_text(options: list[str], sep: str = ". ") -> str:
    return "\n".join(f"{chr(ord('A') + i)}{sep}{o}" for i, o in enumerate(options))


def _shuffled(m: MediaMaker, answer: str, pool: Any, n: int = 4) -> list[str]:
    others = [c for c in pool if c != answer]
    opts = [answer] + list(m.rng.choice(others, size=min(n - 1, len(others)), replace=False))
    return [str(o) for o in m.rng.permutation(opts)]


def okvqa(m: MediaMaker, i: int) -> dict[str, Any]:
    colour, shape = m.pick(COLOURS), m.pick(SHAPES)
    text = f"What colour is the {shape}?\n{SHORT_ANSWER}"
    m.answers[1000 + i] = [colour] * 8 + [m.pick(COLOURS) for _ in range(2)]  # mostly right, as humans
    return {"question_id": 1000 + i, "image": m.image(colour, shape), "text": text, "category": "default",
            "conversations": _turns(f"<image>\n{text}")}


def vqa_annotations(records: list[dict[str, Any]], m: MediaMaker) -> dict[str, Any]:
    """VQA's annotation file: the ten human answers of each question, apart from the questions."""
    anns = [{"question_id": r["question_id"], "answers": [{"answer": a} for a in m.answers[r["question_id"]]]}
            for r in records]
    return {"annotations": anns}


def textvqa(m: MediaMaker, i: int) -> dict[str, Any]:
    colour, shape = m.pick(COLOURS), m.pick(SHAPES)
    text = f"what is written on the sign?\nReference OCR token: {colour}, {shape}\n{SHORT_ANSWER}"
    return {"question_id": 2000 + i, "image": m.image(colour, shape), "text": text, "category": "default",
            "answers": [colour] * 6 + [shape] * 4}


def aokvqa(m: MediaMaker, i: int) -> dict[str, Any]:
    colour, shape = m.pick(COLOURS), m.pick(SHAPES)
    text = f"What colour is the shape?\n{SHORT_ANSWER}"
    choices = _shuffled(m, colour, COLOURS)
    return {"question_id": f"aok{i:03d}", "image": m.image(colour, shape), "text": text, "category": "default",
            "gt": [colour] * 7 + [m.pick(COLOURS) for _ in range(3)], "choices": choices,
            "correct_choice_idx": choices.index(colour), "conversations": _turns(f"<image>\n{text}")}


def pope(m: MediaMaker, i: int) -> dict[str, Any]:
    shape, asked = m.pick(SHAPES), m.pick(SHAPES)
    return {"question_id": 3000 + i, "image": m.image(m.pick(COLOURS), shape),
            "text": f"Is there a {asked} in the image?", "label": "yes" if asked == shape else "no",
            "category": ["random", "popular", "adversarial"][i % 3]}


def mmbench(m: MediaMaker, i: int) -> dict[str, Any]:
    """MMBench1.1 as the original ships it: image list, no placeholder, "A.text" options, list answer."""
    colour = m.pick(COLOURS)
    opts = _shuffled(m, colour, COLOURS)
    text = f"Look at the image and select the correct answer to the following question:\nWhat colour is the " \
           f"shape?\nOptions:\n{_options_text(opts, '.')}\n{SHORT_ANSWER}"
    return {"id": f"MMBench1.1-{100 + i}", "image": [m.image(colour, m.pick(SHAPES))],
            "category": [["attribute_recognition"], ["spatial_relation"]][i % 2],
            "answer": [chr(ord("A") + opts.index(colour))], "conversations": _turns(text)}


def mmbench_audio(m: MediaMaker, i: int) -> dict[str, Any]:
    """MMBench-Audio: the question is spoken; the options stay text."""
    colour = m.pick(COLOURS)
    opts = _shuffled(m, colour, COLOURS)
    text = f"<image>\n<audio>\nOptions:\n{_options_text(opts)}\n{LETTER_ANSWER}"
    return {"index": 200 + i, "image": m.image(colour, m.pick(SHAPES)),
            "voice": [m.speech(["what colour is the shape"])], "category": "attribute_recognition",
            "answer": chr(ord("A") + opts.index(colour)), "conversations": _turns(text)}


def seedbench(m: MediaMaker, i: int) -> dict[str, Any]:
    shape = m.pick(SHAPES)
    opts = _shuffled(m, shape, SHAPES + ("star",))
    rec = {"question_id": f"seed{i}", "image": m.image(m.pick(COLOURS), shape),
           "question": "Which shape is in the picture?", "answer": chr(ord("A") + opts.index(shape)),
           "question_type_id": 1 + i % 2}
    rec.update({f"choice_{chr(ord('a') + k)}": o for k, o in enumerate(opts)})
    return rec


def mmvet(m: MediaMaker, i: int) -> dict[str, Any]:
    colour, shape = m.pick(COLOURS), m.pick(SHAPES)
    text = f"What is the colour of the {shape}?"
    return {"imagename": f"v1_{i}.png", "text": text, "gt": f"{colour}<OR>{colour} {shape}",
            "capability": ["rec"], "imagesource": "web", "id": f"v1_{i}", "conversations": _turns(f"<image>\n{text}"),
            "image": m.image(colour, shape)}


def clothoaqa(m: MediaMaker, i: int) -> dict[str, Any]:
    kind, asked = m.pick(SOUNDS), m.pick(SOUNDS)
    if i % 2:
        question, answer = f"Is this sound a {asked}?", "yes" if asked == kind else "no"
    else:
        question, answer = "What kind of sound is this?", kind
    return {"id": f"clotho_aqa_{i}", "audio": [m.sound(kind)], "answer": answer,
            "conversations": _turns(f"<audio>\n{question}")}


def clotho_caption(m: MediaMaker, i: int) -> dict[str, Any]:
    kind = m.pick(SOUNDS)
    captions = [f"a {kind} plays", f"the sound of a {kind}", f"a steady {kind} is heard",
                f"someone plays a {kind}", f"a {kind} and nothing else"]
    return {"id": f"clotho_{i}.wav", "audio": [m.sound(kind)], "gt": captions,
            "conversations": _turns("<audio>\nDescribe the audio in a sentence.")}


def race(m: MediaMaker, i: int) -> dict[str, Any]:
    """RACE read aloud: the passage is long speech, the question and options text."""
    word = m.pick(WORDS)
    opts = _shuffled(m, word, WORDS)
    text = f"<audio>\nWhich animal is named first in the passage?\n{_options_text(opts)}\n{LETTER_ANSWER}"
    return {"id": f"race_{i}", "voice": [m.speech([word], min_seconds=3.0)],
            "answer": chr(ord("A") + opts.index(word)), "category": ["middle", "high"][i % 2],
            "conversations": _turns(text)}


def english_listening(m: MediaMaker, i: int) -> dict[str, Any]:
    word = m.pick(WORDS)
    opts = _shuffled(m, word, WORDS, n=3)
    text = f"<audio>\nWhat animal does the speaker mention?\n{_options_text(opts)}\n{LETTER_ANSWER}"
    return {"id": f"ehsl_{i}", "voice": [m.speech([word], min_seconds=2.0)], "answer": opts.index(word),
            "conversations": _turns(text)}


def msvd(m: MediaMaker, i: int) -> dict[str, Any]:
    """MSVD-QA: frame list plus its soundtrack as a separate ``voice`` file, as the original reads video."""
    colour, kind = m.pick(COLOURS), m.pick(SOUNDS)
    return {"question_id": f"msvd_{i}", "video": m.video_frames(colour), "audio": [m.sound(kind)],
            "answer": colour, "conversations": _turns("<video>\n<audio>\nwhat colour is the moving shape?")}


def activitynet_qa(m: MediaMaker, i: int) -> dict[str, Any]:
    """ActivityNet-QA: an mp4 whose own soundtrack is the audio input."""
    colour, kind = m.pick(COLOURS), m.pick(SOUNDS)
    video = m.video_file(colour, kind)
    return {"question_id": f"v_anet_{i}", "video": video, "audio": [video], "answer": kind,
            "question": "what sound plays in the video?"}


BUILDERS: dict[str, Callable[[MediaMaker, int], dict[str, Any]]] = {
    "vqa": okvqa, "textvqa": textvqa, "aokvqa": aokvqa, "pope": pope, "mmbench": mmbench,
    "mmbench_audio": mmbench_audio, "seedbench": seedbench, "mmvet": mmvet, "clothoaqa": clothoaqa,
    "clothov1": clotho_caption, "clothov2": clotho_caption, "race": race, "english_listening": english_listening,
    "msvd": msvd, "activitynet_qa": activitynet_qa,
}


def write_benchmark_files(out: str | Path, n: int = 3, seed: int = 0,
                          data_types: list[str] | None = None) -> dict[str, dict[str, Path]]:
    """Write ``<data_type>.json`` (and ``vqa_annotations.json``) under ``out``; returns, per data type,
    {"data": path} plus {"annotations": path} where the answers live in a separate file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(data_types or []) - set(BUILDERS))
    if unknown:
        raise ValueError(f"no fixture builder for {unknown}; known: {sorted(BUILDERS)}")
    maker = MediaMaker(out, seed)
    files: dict[str, dict[str, Path]] = {}
    for data_type in tqdm(data_types or list(BUILDERS), desc="benchmark files", unit="file"):
        records = [BUILDERS[data_type](maker, i) for i in range(n)]
        path = out / f"{data_type}.json"
        path.write_text(json.dumps(records, indent=1) + "\n")
        files[data_type] = {"data": path}
        if data_type == "vqa":
            ann = out / "vqa_annotations.json"
            ann.write_text(json.dumps(vqa_annotations(records, maker), indent=1) + "\n")
            files[data_type]["annotations"] = ann
    return files


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m Uni_MoE.eval.fixtures", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=3, help="records per benchmark")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data_types", nargs="+", choices=sorted(BUILDERS), default=None)
    args = p.parse_args(argv)
    for data_type, paths in write_benchmark_files(args.out, args.n, args.seed, args.data_types).items():
        print(data_type, " ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
