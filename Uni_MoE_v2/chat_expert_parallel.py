"""Chat with Uni-MoE v2 with its experts sharded over the GPUs (the original's inference_new.py, started by
Uni_MoE_v2/inference_speech.sh). Rank 0 reads the questions and prints the replies; every rank decodes the
same turn in step (one expert-parallel forward needs all of them), with ``synced_gpus`` generation.

    deepspeed --num_gpus 2 Uni_MoE_v2/chat_expert_parallel.py --model_path checkpoint/uni-moe-v2-e2 \\
        --enable_deepspeed_moe True --eval_ep_size 2 --image cat.png [--question "What is this?"]

Every flag of ``python -m Uni_MoE.serve.cli`` works; the original's ``--deepspeed`` and ``--version`` are
accepted and not needed. The model is a converted checkpoint (it holds base, experts and encoders).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from Uni_MoE.checkpoint.loader import load_model
from Uni_MoE.cli_args import str_to_bool
from Uni_MoE.data.dataset import UniMoEDataset
from Uni_MoE.eval.distributed import end_expert_parallel, init_expert_parallel
from Uni_MoE.model_folder import ModelFolderError, require_model_folder
from Uni_MoE.serve.cli import EXIT_WORDS, build_parser, chat_settings
from Uni_MoE.serve.generate import build_chat_sample, iter_replies, to_samples

ORIGINAL_ARGS = ("deepspeed", "version")  # the CLI parser already takes --model_base, --mlp_dir, towers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    p.prog = "Uni_MoE_v2/chat_expert_parallel.py"
    p.add_argument("--enable_deepspeed_moe", type=str_to_bool, default=True, help="must be True here")
    p.add_argument("--eval_ep_size", type=int, default=2, help="expert-parallel group size")
    p.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    for name in ORIGINAL_ARGS:
        p.add_argument(f"--{name}", default=None, help="accepted, not needed")
    args = p.parse_args(argv)
    if not args.enable_deepspeed_moe:
        p.error("--enable_deepspeed_moe False: use python -m Uni_MoE.serve.cli for one process")
    return args


def next_question(is_main: bool) -> str:
    """Rank 0 reads a line (empty at end of input); every rank returns it."""
    line = [""]
    if is_main:
        try:
            line[0] = input("USER: ").strip()
        except EOFError:
            line[0] = ""
    dist.broadcast_object_list(line, src=0)
    return line[0]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        require_model_folder(args.model_path)
    except ModelFolderError as err:
        sys.exit(str(err))
    ranks = init_expert_parallel(args.eval_ep_size)
    model, tokenizer = load_model(args.model_path, args.device or ranks.device(), args.dtype, args.eval_ep_size)
    settings = chat_settings(args)
    track = None if args.no_video_audio else model.config.voice_modality
    history: list[tuple[str, str]] = []

    def answer(question: str) -> str:
        record = build_chat_sample(question, args.image, args.speech, args.audio, args.video, history, track)
        dataset = UniMoEDataset(to_samples([record], model.config.voice_modality), tokenizer, model.config,
                                None, for_generation=True)
        torch.manual_seed(args.seed)  # the same on every rank, so sampled decoding agrees across them
        return next(iter_replies(model, tokenizer, dataset, settings, 1, synced_gpus=ranks.world_size > 1))[1]

    if args.question is not None:
        reply = answer(args.question)
        if ranks.is_main:
            print(reply, flush=True)
    else:
        if ranks.is_main:
            print("Type a question (empty line or 'exit' to stop).", file=sys.stderr)
        while True:
            question = next_question(ranks.is_main)
            if not question or question.lower() in EXIT_WORDS:
                break
            reply = answer(question)
            if ranks.is_main:
                print(f"ASSISTANT: {reply}", flush=True)
            history.append((question, reply))
    end_expert_parallel(ranks)


if __name__ == "__main__":
    main()
