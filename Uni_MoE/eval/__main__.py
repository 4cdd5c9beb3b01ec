"""Command line: ``python -m Uni_MoE.eval --model_path M --data_path X --data_type vqa --output preds.json``.

Also accepts the original scripts' argument names: ``--output_dir`` (the 8e name of the predictions
file); ``--enable_deepspeed_moe True --eval_ep_size N``: DeepSpeed-MoE experts sharded over N ranks,
started with ``deepspeed --num_gpus=N --module Uni_MoE.eval ...`` (every rank runs the same batches, rank 0
writes); and, when ``--model_path`` is an original release folder (converted in memory), ``--model_base``,
``--mlp_dir`` (v2/8e experts), ``--vision_tower`` (CLIP folder) and ``--audio_tower`` (Whisper folder or
BEATs .pt file). ``--deepspeed`` and ``--version`` are parsed and ignored.

Replies are kept in ``<output stem>.partial.jsonl`` as each batch finishes; rerunning the same command
continues from there (``--overwrite`` starts over).
"""

from __future__ import annotations

import argparse
import sys

from ..cli_args import add_release_arguments, release_parts, str_to_bool
from ..data.schema import SampleError
from ..model_folder import ModelFolderError
from .journal import JournalError
from .runner import EvalConfig, run_eval
from .tasks import ALIASES, TASKS, TaskError

NO_OP_ARGS = ("deepspeed", "version")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m Uni_MoE.eval", description=__doc__.split("\n")[0])
    p.add_argument("--model_path", required=True, help="save_pretrained folder of a (converted) Uni-MoE model")
    p.add_argument("--data_path", required=True, help="eval JSON (list) or JSON-lines file")
    p.add_argument("--data_type", required=True,
                   help=f"one of {', '.join(sorted(set(TASKS) | set(ALIASES)))}")
    p.add_argument("--output", "--output_dir", dest="output", required=True, help="predictions JSON to write")
    p.add_argument("--metrics_output", default=None, help="metrics JSON (default: <output>_metrics.json)")
    p.add_argument("--data_root", default=None, help="folder relative media paths are under (default: data file's)")
    p.add_argument("--annotation_file", default=None,
                   help="reference answers kept apart from the questions (VQA / TextVQA annotation JSON)")
    p.add_argument("--batch_size", type=int, default=None, help="default: 32 on a GPU, 8 on a CPU")
    p.add_argument("--num_workers", type=int, default=0, help="processes loading media")
    p.add_argument("--refill_rows", action="store_true",
                   help="a batch row whose answer has ended takes the next waiting question at once instead of "
                        "waiting for its batch (greedy or sampled decoding, one process)")
    p.add_argument("--limit", type=int, default=None, help="only the first N records")
    p.add_argument("--skip_bad_samples", "--skip_missing_media", dest="skip_bad_samples", action="store_true",
                   help="evaluate the rest when records or media fail the check before generation (each is "
                        "listed in the summary and the metrics file); without it they stop the run")
    p.add_argument("--overwrite", action="store_true",
                   help="start over instead of continuing the partial predictions file of an earlier run")
    p.add_argument("--circular", action=argparse.BooleanOptionalAction, default=True,
                   help="MMBench CircularEval (every rotation of the options must be answered right)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampled decoding")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"])
    g = p.add_argument_group("decoding (default: the task's settings)")
    g.add_argument("--max_new_tokens", type=int)
    g.add_argument("--min_new_tokens", type=int)
    g.add_argument("--do_sample", type=str_to_bool, default=None)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top_p", type=float)
    g.add_argument("--num_beams", type=int)
    g.add_argument("--stop", nargs="+", default=None, help="stop strings")
    e = p.add_argument_group("expert parallelism (DeepSpeed-MoE)")
    e.add_argument("--enable_deepspeed_moe", type=str_to_bool, nargs="?", const=True, default=False,
                   help="shard the experts over --eval_ep_size ranks with DeepSpeed-MoE")
    e.add_argument("--eval_ep_size", type=int, default=1, help="expert-parallel group size")
    e.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    add_release_arguments(p)
    o = p.add_argument_group("original arguments, accepted and ignored")
    for name in NO_OP_ARGS:
        o.add_argument(f"--{name}", default=None)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    ignored = [f"--{n}" for n in NO_OP_ARGS if getattr(args, n) is not None]
    if ignored:
        print(f"ignoring {' '.join(ignored)}", file=sys.stderr)
    overrides = {k: getattr(args, k) for k in ("max_new_tokens", "min_new_tokens", "do_sample", "temperature",
                                               "top_p", "num_beams")}
    overrides["stop"] = tuple(args.stop) if args.stop else None
    run_eval(EvalConfig(
        model_path=args.model_path, data_path=args.data_path, data_type=args.data_type, output=args.output,
        metrics_output=args.metrics_output, data_root=args.data_root, annotation_file=args.annotation_file,
        batch_size=args.batch_size, num_workers=args.num_workers, limit=args.limit, circular=args.circular,
        seed=args.seed, device=args.device, dtype=args.dtype, overrides=overrides,
        enable_deepspeed_moe=args.enable_deepspeed_moe, eval_ep_size=args.eval_ep_size,
        skip_bad_samples=args.skip_bad_samples, overwrite=args.overwrite, release=release_parts(args),
        refill_rows=args.refill_rows,
    ))


def cli(argv: list[str] | None = None) -> None:
    """``main`` with the mistakes a user can fix reported as their message alone, not a traceback."""
    try:
        main(argv)
    except (ModelFolderError, SampleError, JournalError, TaskError) as err:
        sys.exit(str(err))
    except KeyError as err:  # an unknown --data_type
        sys.exit(err.args[0])


if __name__ == "__main__":
    cli()
