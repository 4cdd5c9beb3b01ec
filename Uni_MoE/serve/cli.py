"""Chat with a Uni-MoE model in the terminal: media given once, then as many turns as you like.

    python -m Uni_MoE.serve.cli --model_path checkpoint/tiny --image cat.png [--speech q.wav] [--audio s.wav]
        [--video clip.mp4 | --video frames_folder/] [--question "What is this?"]

``--model_path`` may also be an original release folder, with ``--model_base``, ``--vision_tower``,
``--audio_tower`` (and ``--mlp_dir``) as the original scripts take them. With ``--question`` it answers
once and exits. A video file's soundtrack is added as the model's voice
modality (speech or audio) unless ``--no_video_audio``. Decoding: greedy when an image is given, else
sampled at T=0.2, as the original CLI; KV-cached, unlike the original.
"""

from __future__ import annotations

import argparse
import sys

from .generate import (
    GenerationSettings,
    add_release_arguments,
    build_chat_sample,
    generate_batch,
    load_model,
    release_parts,
)

EXIT_WORDS = ("exit", "quit", ":q")


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


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    model, tokenizer = load_model(args.model_path, args.device, args.dtype, release=release_parts(args))
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
