"""Chat with a Uni-MoE model in the terminal: media given once, then as many turns as you like.

    python -m Uni_MoE.serve.cli --model_path checkpoint/tiny --image cat.png [--speech q.wav] [--audio s.wav]
        [--video clip.mp4 | --video frames_folder/] [--question "What is this?"]

``--model_path`` may also be an original release folder, with ``--model_base``, ``--vision_tower``,
``--audio_tower`` (and ``--mlp_dir``) as the original scripts take them. With ``--question`` it answers
once and exits. The model folder and every media file are checked before the model loads; a problem is
reported in one line naming the argument. A video file's soundtrack is added as the model's voice
modality (speech or audio) unless ``--no_video_audio``. Decoding: greedy when an image is given, else
sampled at T=0.2, as the original CLI; KV-cached, unlike the original.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..checkpoint.loader import config_and_tokenizer, load_model
from ..cli_args import add_release_arguments, release_parts
from ..model_folder import ModelFolderError, require_model_folder
from .generate import GenerationSettings, build_chat_sample, generate_batch

EXIT_WORDS = ("exit", "quit", ":q")
MEDIA_FLAGS = ("image", "speech", "audio", "video")


class MediaArgumentError(ValueError):
    """A media argument that cannot be used; the message names the flag and the file."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m Uni_MoE.serve.cli", description=__doc__.split("\n")[0])
    p.add_argument("--model_path", required=True)
    p.add_argument("--image")
    p.add_argument("--speech", help="speech file (Whisper encoder)")
    p.add_argument("--audio", help="sound file (BEATs encoder)")
    p.add_argument("--video", help="video file, or a folder of frame images")
    p.add_argument("--no_video_audio", action="store_true", help="do not add a video file's soundtrack")
    p.add_argument("--question", help="answer this once and exit")
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: see above)")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"])
    add_release_arguments(p)
    return p


def chat_settings(args: argparse.Namespace) -> GenerationSettings:
    temperature = args.temperature if args.temperature is not None else (0.0 if args.image else 0.2)
    return GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=temperature > 0,
                              temperature=temperature, top_p=args.top_p, num_beams=args.num_beams)


def check_media(args: argparse.Namespace, config: Any, tokenizer: Any) -> None:
    """Every media argument exists and decodes, checked as training data is (``data.validate``) before the
    model loads; otherwise MediaArgumentError naming the flag, file and reason."""
    from ..data import media
    from ..data.schema import parse_sample
    from ..data.validate import ERROR, check_samples

    given = {flag: getattr(args, flag) for flag in MEDIA_FLAGS if getattr(args, flag)}
    for flag, path in given.items():
        if not Path(path).exists():
            raise MediaArgumentError(f"--{flag} {path}: no such file")
    track = None if args.no_video_audio else config.voice_modality
    try:
        record = build_chat_sample("?", args.image, args.speech, args.audio, args.video, None, track)
        sample = parse_sample(record, 0, config.voice_modality, "command line")
    except (media.MediaError, ValueError) as err:
        raise MediaArgumentError(f"--video {args.video}: {err}") from err
    issues = check_samples([sample], ["command line"], tokenizer, config, for_generation=True, show_progress=False)[0]
    errors = [i.reason for i in issues if i.severity == ERROR]
    if errors:
        flag = next((f for f, p in given.items() if str(p) in errors[0] or Path(p).name in errors[0]), None)
        raise MediaArgumentError(f"--{flag} {errors[0]}" if flag else errors[0])


def main(argv: list[str] | None = None) -> None:
    """Check the model folder and the media, load the model, then answer (once, or turn by turn)."""
    args = build_parser().parse_args(argv)
    try:
        require_model_folder(args.model_path)
        parts = config_and_tokenizer(args.model_path)
        if parts:
            check_media(args, *parts)
        model, tokenizer = load_model(args.model_path, args.device, args.dtype, release=release_parts(args))
        if not parts:
            check_media(args, model.config, tokenizer)
    except (ModelFolderError, MediaArgumentError) as err:
        sys.exit(str(err))
    settings = chat_settings(args)
    track = None if args.no_video_audio else model.config.voice_modality
    history: list[tuple[str, str]] = []

    def answer(question: str) -> str:
        record = build_chat_sample(question, args.image, args.speech, args.audio, args.video, history, track)
        return generate_batch(model, tokenizer, [record], settings, batch_size=1, seed=args.seed)[0]

    if args.question is not None:
        print(answer(args.question))
        return
    print("Type a question (empty line or 'exit' to stop).", file=sys.stderr)
    while True:
        try:
            question = input("USER: ").strip()
        except EOFError:
            break
        if not question or question.lower() in EXIT_WORDS:
            break
        reply = answer(question)
        print(f"ASSISTANT: {reply}")
        history.append((question, reply))


if __name__ == "__main__":
    main()
