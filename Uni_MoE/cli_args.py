"""Argument helpers shared by the command lines (chat CLI, eval, the v2 expert-parallel chat): the
original scripts' boolean flags and the arguments that locate an original release's parts."""

from __future__ import annotations

import argparse


def str_to_bool(text: str) -> bool:
    """``True``/``False`` as the original's TrainingArguments-style flags take them (also 1/0, yes/no)."""
    value = text.strip().lower()
    if value not in ("1", "true", "yes", "0", "false", "no"):
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
    return value in ("1", "true", "yes")


def add_release_arguments(parser: argparse.ArgumentParser) -> None:
    """The original scripts' arguments that locate an original release's other parts."""
    group = parser.add_argument_group("when --model_path is an original release folder")
    group.add_argument("--model_base", default=None, help="the base release the --model_path folder fine-tunes")
    group.add_argument("--mlp_dir", default=None, help="v2/8e: the Experts directory (mlp_*.bin)")
    group.add_argument("--vision_tower", default=None, help="CLIP folder (default: the release config's path)")
    group.add_argument("--audio_tower", default=None, help="Whisper folder or BEATs .pt (default: the config's)")


def release_parts(args: argparse.Namespace) -> dict[str, str | None]:
    """Those arguments, named as the loader's ``release`` (the in-memory converter) takes them."""
    tower = args.audio_tower
    beats = tower if tower and tower.endswith(".pt") else None
    return {"model_base": args.model_base, "experts_dir": args.mlp_dir, "clip_dir": args.vision_tower,
            "whisper_dir": None if beats else tower, "beats_path": beats}
