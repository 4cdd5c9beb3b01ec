"""Stage-3 training through the real launcher at real lengths, next to benchmarks/train_step.py at the same
shapes, and the data pipeline's rate per worker.

It writes a speech model of LLaMA-7B width (random init; CLIP ViT-L/14-336, Whisper-small, 4 full-MLP
experts in every layer; ``--layers`` decoder layers) and a training set of image + speech questions at real
lengths (336 px images = 576 tokens, 30 s of speech = one 50-token Whisper window, about 200 text tokens),
then runs ``Uni_MoE/finetune_speech.sh`` on it (ZeRO-2, bf16, gradient checkpointing, its own data loader
workers) with ``--per_device_train_batch_size``. It reports:

- the launcher's tokens/s: the median of the per-step ``tokens_per_second_per_device`` the trainer logs
  (data waits, encoders, ZeRO and logging included), after the first steps;
- train_step.py's tokens/s and MFU on the same layers, batch and sequence length (encoders stubbed by
  random features, the same activation checkpointing);
- samples/s of one data worker (``UniMoEDataset`` item = media decode + CLIP/Whisper transforms + tokens)
  and the frozen encoders' forward time per batch, which train_step does not run.

The ratio moves by several per cent between runs on one machine, so ``--repeats N`` runs N launcher +
train_step pairs back to back and reports the median pair, listing every pair.

    python benchmarks/launcher_run.py --out FILE            # CUDA, 8 layers, batch 8
    python benchmarks/launcher_run.py --repeats 3 --out FILE  # three launcher + train_step pairs, the median
    python benchmarks/launcher_run.py --smoke               # the tiny preset on the CPU, 2 steps
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import train_step  # noqa: E402
from generation import median_ms  # noqa: E402
from report import device_name, emit_table  # noqa: E402

from Uni_MoE import presets  # noqa: E402
from Uni_MoE.checkpoint.tiny import WORDS, build_tiny, tokenizer_corpus  # noqa: E402
from Uni_MoE.data.collate import Collator  # noqa: E402
from Uni_MoE.data.dataset import UniMoEDataset  # noqa: E402
from Uni_MoE.data.synthetic import random_shape_image, sound_wave, write_wav  # noqa: E402
from Uni_MoE.data.synthetic_tasks import COLOURS, SHAPES, SOUNDS  # noqa: E402
from Uni_MoE.data.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from Uni_MoE.model.uni_moe import UniMoEForCausalLM  # noqa: E402
from Uni_MoE.modalities import MODALITIES  # noqa: E402
from Uni_MoE.processing_uni_moe import UniMoEProcessor  # noqa: E402
from Uni_MoE.train.data import checked_samples  # noqa: E402

def build_model(out: Path, layers: int, smoke: bool) -> UniMoEForCausalLM:
    """The speech model at real geometry with ``layers`` decoder layers (the tiny MoE preset with --smoke),
    saved with its tokenizer and processor; returned on the device in the launcher's dtype."""
    if smoke:
        build_tiny(out, moe=True)
        return UniMoEForCausalLM.from_pretrained(out).eval()
    tokenizer = train_tokenizer(tokenizer_corpus(), vocab_size=1024)
    ids = {m.token_id_field: tokenizer.convert_tokens_to_ids(m.placeholder) for m in MODALITIES.values()}
    text = {**presets.LLAMA_7B, "num_hidden_layers": layers, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = presets.speech_v1(text_config=text, **ids)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = UniMoEForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    UniMoEProcessor.from_config(config, tokenizer).save_pretrained(out)
    return model.eval()


def make_data(root: Path, n: int, image_size: int, seconds: float, answer_words: int) -> Path:
    """``n`` image + speech questions with answers of ``answer_words`` words, in the original's JSON (media
    drawn and synthesised as the quickstart's data is)."""
    words = WORDS.split()
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        colour, shape, sound = list(COLOURS)[i % len(COLOURS)], SHAPES[i % len(SHAPES)], SOUNDS[i % len(SOUNDS)]
        random_shape_image(rng, image_size, colour, shape).save(root / f"{i:05d}.png")
        write_wav(root / f"{i:05d}.wav", sound_wave(rng, sound, seconds))
        records.append({"id": f"real_{i:05d}", "image": f"{i:05d}.png", "speech": [f"{i:05d}.wav"],
                        "conversations": [
                            {"from": "human", "value": "<image>\n<speech>\nAnswer the spoken question."},
                            {"from": "gpt", "value": " ".join(rng.choice(words, answer_words))}]})
    path = root / "train.json"
    path.write_text(json.dumps(records))
    return path


def pipeline(model: UniMoEForCausalLM, model_dir: Path, data: Path, batch: int,
             profile_to: Path | None = None) -> dict[str, float]:
    """Samples/s of one data worker, the batch's sequence length, and the frozen encoders' (with the
    connectors') forward ms per batch; with ``profile_to``, their operator table is written there."""
    tokenizer = load_tokenizer(model_dir)
    samples = checked_samples([str(data)], tokenizer, model.config, str(data.parent), 2048,
                              show_progress=False).samples
    dataset = UniMoEDataset(samples, tokenizer, model.config, data.parent, 2048)
    t0 = time.perf_counter()
    items = [dataset[i] for i in range(2 * batch)]
    per_worker = 2 * batch / (time.perf_counter() - t0)
    device = model.device
    collated = Collator(tokenizer.pad_token_id)(items[:batch])
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collated.items()}
    media = {k: inputs[k].to(model.dtype) for k in ("pixel_values", "input_features") if k in inputs}
    with torch.no_grad():
        model.model.embed_multimodal(inputs["input_ids"], **media)  # warm-up
        ms = median_ms(lambda: model.model.embed_multimodal(inputs["input_ids"], **media), device, 3)
        if profile_to is not None:
            with torch.profiler.profile(record_shapes=True) as prof:
                model.model.embed_multimodal(inputs["input_ids"], **media)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
            profile_to.write_text(prof.key_averages().table(sort_by=key, row_limit=30))
    return {"per_worker": per_worker, "encoders_ms": ms, "seq": int(inputs["input_ids"].shape[1])}


def launcher_tokens_per_second(model_dir: Path, data: Path, out: Path, batch: int, steps: int, workers: int,
                               smoke: bool, profile: bool) -> tuple[float, list[float]]:
    """Run finetune_speech.sh; the median per-step tokens/s after the first third of the steps (with
    ``profile``, its last two steps are profiled into ``out/profile`` and left out of the median)."""
    env = {**os.environ, "MODEL": str(model_dir), "DATA": str(data), "DATA_ROOT": str(data.parent),
           "OUTPUT": str(out), "NUM_GPUS": "1", "MASTER_PORT": "29533"}
    if smoke:  # one CPU process, started as the deepspeed launcher would
        env.update(LAUNCHER=f"{sys.executable} -m", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1")
    extra = ["--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", "1",
             "--max_steps", str(steps), "--logging_steps", "1", "--save_steps", "100000", "--report_to", "none",
             "--dataloader_num_workers", str(workers), "--disable_tqdm", "True"]
    if smoke:
        extra += ["--bf16", "False", "--tf32", "False"]
    if profile:
        extra += ["--profile_steps", f"{steps - 1}-{steps}"]
    done = subprocess.run(["bash", str(ROOT / "Uni_MoE" / "finetune_speech.sh"), *extra], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    log = done.stdout + done.stderr
    if done.returncode:
        raise RuntimeError(f"finetune_speech.sh exited {done.returncode}:\n{log[-4000:]}")
    rates = []
    for line in log.splitlines():
        line = line.strip()
        if line.startswith("{") and "tokens_per_second_per_device" in line:
            rates.append(float(ast.literal_eval(line)["tokens_per_second_per_device"]))
    if not rates:
        raise RuntimeError(f"no tokens_per_second_per_device in the launcher's log:\n{log[-4000:]}")
    kept = rates[len(rates) // 3:len(rates) - 2 * profile] or rates
    return statistics.median(kept), rates


def measure(args: argparse.Namespace, work: Path) -> str:
    """Build the model and data in ``work``, run the launcher and train_step.py; the report."""
    device = torch.device("cpu" if args.smoke else "cuda")
    (work / "data").mkdir(parents=True, exist_ok=True)
    model = build_model(work / "model", args.layers, args.smoke)
    image_size = model.config.vision_config.image_size
    layers = model.config.text_config.num_hidden_layers
    seconds = 2.0 if args.smoke else 30.0
    data = make_data(work / "data", args.batch * (args.steps + 2), image_size, seconds, 20 if args.smoke else 170)
    tables = None
    if args.profile:
        tables = Path(args.out).parent if args.out else Path(args.work_dir or ".")
    if tables:
        tables.mkdir(parents=True, exist_ok=True)
    pipe = pipeline(model.to(device), work / "model", data, args.batch,
                    tables / "encoders_ops.txt" if tables else None)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    shapes = train_step.SMOKE if args.smoke else train_step.FULL
    image_tokens = shapes.image_tokens if args.smoke else 576
    train_step.SPEECH_CHUNKS = 1  # 30 s of speech: one Whisper window of QUERIES tokens
    shapes = replace(shapes, layers=layers, batch=args.batch, seq=pipe["seq"], image_tokens=image_tokens,
                     checkpointing=True)
    runs = []
    for i in range(args.repeats):  # each launcher run next to a train_step run, so drift hits both alike
        if i:  # the previous run's checkpoint: tens of GB at real width, and nothing more is read from it
            shutil.rmtree(work / f"out{i - 1}", ignore_errors=True)
        out = work / f"out{i}"
        profiled = args.profile and i == args.repeats - 1
        launcher, rates = launcher_tokens_per_second(work / "model", data, out, args.batch, args.steps,
                                                        args.workers, args.smoke, profiled)
        rows = train_step.run(shapes, ["mlp"], device, 1 if args.smoke else 2, 1 if args.smoke else 5)
        runs.append(Run(launcher, rates, next(r for r in rows if r["impl"] == "grouped"), profiled))
        if profiled and tables:
            shutil.copy(out / "profile" / "ops_rank0.txt", tables / "launcher_ops.txt")
            shutil.copy(out / "profile" / "syncs_rank0.txt", tables / "launcher_syncs.txt")
            if device.type == "cuda":
                shutil.copy(out / "profile" / "gaps_rank0.txt", tables / "launcher_gaps.txt")
    return report(args, shapes, pipe, runs, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=15, help="launcher steps (the first third is warm-up)")
    parser.add_argument("--workers", type=int, default=3, help="the launcher's --dataloader_num_workers")
    parser.add_argument("--smoke", action="store_true", help="the tiny preset on the CPU")
    parser.add_argument("--out", help="write the markdown table here")
    parser.add_argument("--repeats", type=int, default=1,
                        help="launcher + train_step.py pairs; the report is the median pair's, with every pair listed")
    parser.add_argument("--profile", action="store_true",
                        help="operator tables of the encoders and of the last run's final two launcher steps, "
                        "beside --out")
    parser.add_argument("--work_dir", help="where the model and data go and stay (default: a temporary folder, "
                        "removed at the end); --profile tables go beside --out, else here (else the current folder)")
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.steps, args.workers = 2, 3, 0
    if args.work_dir:
        text = measure(args, Path(args.work_dir))
    else:  # the model, its checkpoints and the data take tens of GB at real width: removed afterwards
        with tempfile.TemporaryDirectory(prefix="launcher_run_") as tmp:
            text = measure(args, Path(tmp))
    emit_table(text, args.out)


@dataclass
class Run:
    """One launcher run and the train_step.py run beside it."""

    launcher: float  # median tokens/s of the kept steps
    rates: list[float]  # tokens/s of every step
    step: dict  # train_step.py's row for the fused path
    profiled: bool

    @property
    def ratio(self) -> float:
        return self.launcher / self.step["tok_s"]


def report(args: argparse.Namespace, s: train_step.StepShapes, pipe: dict, runs: list[Run],
           device: torch.device) -> str:
    """The median run by launcher / train_step (the lower of the middle two for an even count), and with
    ``--repeats`` every run's pair."""
    name = device_name(device)
    run = sorted(runs, key=lambda r: r.ratio)[(len(runs) - 1) // 2]
    launcher, rates, step = run.launcher, run.rates, run.step
    step_ms = s.batch * s.seq / launcher * 1e3
    needed = s.batch / (step_ms / 1e3)
    repeats = [] if len(runs) == 1 else [
        f"- {len(runs)} runs, each the launcher then train_step.py; the table is the median run's. Every run, "
        "launcher / train_step tokens/s: " + "; ".join(
            f"{r.launcher:,.0f} / {r.step['tok_s']:,.0f} = {r.ratio:.3f}" for r in runs)]
    return "\n".join([
        "# Stage-3 training through the launcher at real lengths",
        "",
        f"- device: {name}; torch {torch.__version__}; date {datetime.date.today().isoformat()}",
        f"- command: `python benchmarks/launcher_run.py --layers {args.layers} --batch {args.batch} "
        f"--steps {args.steps} --workers {args.workers}" + (f" --repeats {len(runs)}`" if len(runs) > 1 else "`"),
        f"- model: speech preset at LLaMA-7B width, {s.layers} layers, 4 full-MLP experts top-2 in every layer, "
        f"CLIP ViT-L/14-336, Whisper-small; launcher Uni_MoE/finetune_speech.sh (ZeRO-2, bf16, gradient "
        f"checkpointing, {args.workers} data workers), batch {s.batch}, accumulation 1",
        f"- samples: one 336 px image (576 tokens) + 30 s of speech (50 tokens) + text; {s.seq} tokens a "
        f"sequence; train_step.py on the same layers, batch, length and checkpointing, encoders stubbed",
        f"- launcher tokens/s per step: {', '.join(f'{r:,.0f}' for r in rates)} (median of the last "
        f"{len(rates) - len(rates) // 3 - 2 * run.profiled}{'; the last two were profiled' if run.profiled else ''})",
        *repeats,
        "",
        "| measure | value |",
        "|---|---|",
        f"| launcher tokens/s (median step) | {launcher:,.0f} |",
        f"| train_step.py tokens/s, same shapes | {step['tok_s']:,.0f} |",
        f"| launcher / train_step | **{launcher / step['tok_s']:.2f}** |",
        f"| train_step.py MFU | {step['mfu']:.1%} |",
        f"| launcher MFU (train_step's FLOPs per token) | {step['mfu'] * launcher / step['tok_s']:.1%} |",
        f"| launcher step ms / train_step step ms | {step_ms:.0f} / {step['ms']:.0f} |",
        f"| frozen encoders + connectors forward, ms per batch | {pipe['encoders_ms']:.1f} |",
        f"| one data worker, samples/s | {pipe['per_worker']:.1f} |",
        f"| samples/s the launcher consumes | {needed:.1f} |",
        "",
    ])


if __name__ == "__main__":
    main()
