"""Run one benchmark end to end: read the eval JSON, check it, generate in batches, score, write two JSON files.

Predictions file: one record per generation with its id, prompt, prediction, reference and score.
Metrics file: the task's metrics, the decoding settings, counts and what was skipped and why; a summary table
is printed. While it runs, replies accumulate in a partial file (``journal.py``) that a rerun continues.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ..checkpoint.loader import config_and_tokenizer, load_model
from ..config import UniMoEConfig
from ..data.conversation import render_prompt
from ..data.dataset import UniMoEDataset
from ..data.schema import MEDIA_KEYS, MIN_BASE64_LEN, Sample, SampleError, read_records
from ..model_folder import require_model_folder
from ..serve.generate import GenerationSettings, default_batch_size, iter_replies
from . import metrics as M
from .checks import (FAILED_GENERATION, Skipped, check_items, missing_references, refuse_bad_samples,
                     skipped_report, summary_line)
from .distributed import RankInfo, end_expert_parallel, init_expert_parallel
from .journal import Journal, journal_path
from .resilient import Generate, replies_or_errors
from .tasks import EvalItem, Task, TaskError, TaskOptions, get_task, load_annotations, record_id


@dataclass
class EvalConfig:
    """What one evaluation run needs; ``overrides`` replace fields of the task's decoding settings."""

    model_path: str
    data_path: str
    data_type: str
    output: str
    metrics_output: str | None = None
    data_root: str | None = None
    annotation_file: str | None = None
    batch_size: int | None = None  # None: the device's default (serve.generate.default_batch_size)
    num_workers: int = 0
    limit: int | None = None
    circular: bool = True
    seed: int = 0
    device: str | None = None
    dtype: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    enable_deepspeed_moe: bool = False
    eval_ep_size: int = 1
    skip_bad_samples: bool = False  # skip (and report) generations whose record or media fail the check
    overwrite: bool = False  # start over instead of continuing the output's partial file
    refill_rows: bool = False  # a finished row takes the next waiting sample (serve/refill.py)
    release: dict[str, Any] = field(default_factory=dict)  # an original release's other folders


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON (UTF-8, indented) through a temporary file, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_annotations(path: str | Path) -> dict[Any, list[str]]:
    """Reference answers from an annotation file (VQA / TextVQA JSON); errors name the file."""
    try:
        return load_annotations(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError, KeyError, TaskError) as err:
        raise SampleError(f"{path}: cannot read the annotation file ({err!r})") from err


def rebase_media(record: dict[str, Any], data_root: Path) -> dict[str, Any]:
    """Media paths that do not exist as written are looked up under ``data_root``, a leading "/" too:
    the original's eval files hold paths such as "/coco_images/x.jpg" that it joined to a folder. Found
    paths become absolute, so no later step joins them to ``data_root`` a second time."""
    def fix(p: Any) -> Any:
        if isinstance(p, list):
            return [fix(q) for q in p]
        if not isinstance(p, str) or len(p) >= MIN_BASE64_LEN:
            return p
        if Path(p).exists():
            return str(Path(p).resolve())
        under = data_root / p.lstrip("/")
        return str(under.resolve()) if under.exists() else p

    return {k: fix(v) if k in MEDIA_KEYS else v for k, v in record.items()}


def prediction_row(item: EvalItem, prompt: str, prediction: str, score: Any, position: int) -> dict[str, Any]:
    row: dict[str, Any] = {"id": record_id(item.meta.get("source", {}), position)}
    for key in ("index", "mode", "category"):
        if item.meta.get(key) is not None:
            row[key] = item.meta[key]
    row.update(prompt=prompt, prediction=prediction, reference=item.reference, score=score)
    return row


def default_metrics_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.stem + "_metrics.json")


def prepare_items(task: Task, records: list[dict[str, Any]], data_root: Path, options: TaskOptions,
                  data_path: str) -> list[EvalItem]:
    """The task's generations for every record (media paths rebased); errors name the record."""
    items: list[EvalItem] = []
    for i, record in enumerate(records):
        try:
            prepared = task.prepare(rebase_media(record, data_root), i, options)
        except (TaskError, ValueError, KeyError) as err:
            raise TaskError(f"{data_path} sample {i} (id {record_id(record, i)}): {err}") from err
        for item in prepared:
            item.meta.update(source=record, record=i)
        items += prepared
    return items


def _settings_key(cfg: EvalConfig, task: Task, settings: GenerationSettings) -> dict[str, Any]:
    """What a partial predictions file must have been written with for a rerun to continue it."""
    return {"model_path": str(Path(cfg.model_path).resolve()), "data_path": str(Path(cfg.data_path).resolve()),
            "data_type": task.name, "generation": settings.as_dict(), "seed": cfg.seed}


def _share(value: Any, ranks: RankInfo) -> Any:
    """Rank 0's ``value`` on every rank (expert-parallel ranks must run the same generations)."""
    if ranks.world_size == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Generate and score ``cfg.data_path`` as ``cfg.data_type``; returns the metrics file's content.

    Before the model loads: the model folder, the records, the references and every media file are checked
    (bad samples stop the run, or are skipped with ``skip_bad_samples``). Replies go to the partial file as
    each batch finishes, and a rerun continues it; a generation that fails is recorded and the run goes on.
    """
    require_model_folder(cfg.model_path)
    task = get_task(cfg.data_type)
    settings: GenerationSettings = task.settings.with_overrides(**cfg.overrides)
    data_root = Path(cfg.data_root) if cfg.data_root else Path(cfg.data_path).resolve().parent
    annotations = read_annotations(cfg.annotation_file) if cfg.annotation_file else {}
    options = TaskOptions(annotations=annotations, circular=cfg.circular)
    records = read_records(cfg.data_path, strict=True)[: cfg.limit]
    items = prepare_items(task, records, data_root, options, cfg.data_path)
    unreferenced = missing_references(task, items)
    if unreferenced:
        _warn_unreferenced(cfg, unreferenced, len(items))
    ids = [record_id(it.meta["source"], it.meta["record"]) for it in items]

    early = config_and_tokenizer(cfg.model_path)
    checked = _check(cfg, items, data_root, *early) if early else None
    ranks, ep_size, device = RankInfo(), None, cfg.device
    if cfg.enable_deepspeed_moe:
        ranks, ep_size = init_expert_parallel(cfg.eval_ep_size), cfg.eval_ep_size
        device = device or ranks.device()
    journal = Journal(journal_path(cfg.output), _settings_key(cfg, task, settings), ids, cfg.overwrite) \
        if ranks.is_main else None
    model, tokenizer = load_model(cfg.model_path, device, cfg.dtype, ep_size, cfg.release)
    samples, skipped, missing = checked or _check(cfg, items, data_root, model.config, tokenizer)
    done: dict[int, str] = _share(journal.done if journal else None, ranks)
    todo = [n for n, s in enumerate(samples) if s is not None and n not in done]
    if done and ranks.is_main:
        print(f"{journal.path}: {len(done)} of {len(items)} generations already done; generating {len(todo)}",
              file=sys.stderr)

    batch_size = cfg.batch_size or default_batch_size(model.device)

    def generate(batch: list[Sample]) -> Iterator[tuple[int, str]]:
        dataset = UniMoEDataset(batch, tokenizer, model.config, data_root, for_generation=True)
        return iter_replies(model, tokenizer, dataset, settings, batch_size, cfg.num_workers,
                            progress=ranks.is_main and task.name, synced_gpus=ranks.world_size > 1,
                            refill_rows=cfg.refill_rows)

    torch.manual_seed(cfg.seed)
    resumed = len(done)
    started = time.perf_counter()
    failed = _generate_into(done, journal, generate, samples, todo, items, ids, batch_size)
    seconds = time.perf_counter() - started
    skipped += failed
    generated = len(done) - resumed

    kept = sorted(n for n in done if samples[n] is not None)  # a file gone bad since is skipped, not scored
    kept_items, predictions = [items[n] for n in kept], [done[n] for n in kept]
    metrics, scores = task.score(kept_items, predictions, options)
    rows = [prediction_row(items[n], render_prompt(samples[n].conversations), done[n], sc, i)
            for i, (n, sc) in enumerate(zip(kept, scores))]
    result: dict[str, Any] = {
        "task": task.name, "description": task.description, "data_path": str(cfg.data_path),
        "model_path": str(cfg.model_path), "num_records": len(records), "num_generations": len(kept),
        "generation": settings.as_dict(), "metrics": metrics,
        "throughput": {"batch_size": batch_size, "refill_rows": cfg.refill_rows,
                       "generation_seconds": round(seconds, 3),
                       "samples_per_second": round(generated / seconds, 3) if seconds > 0 else None},
    }
    skipped.sort(key=lambda s: s.n)
    result.update(skipped_report(skipped, missing))
    if unreferenced:
        result["without_reference"] = {"count": len(unreferenced), "ids": unreferenced}
    if resumed:
        result["resumed"] = {"done_before": resumed, "generated": generated}
    if cfg.enable_deepspeed_moe:
        result["expert_parallel"] = {"ep_size": cfg.eval_ep_size, "world_size": ranks.world_size}
    if task.notes:
        result["notes"] = task.notes
    if ranks.is_main:
        write_outputs(cfg, task, result, rows, kept_items, predictions)
        if skipped:
            print(summary_line(skipped, len(items)))
            for line in dict.fromkeys(s.line(cfg.data_path) for s in skipped):
                print(f"  {line}")
        journal.remove()
    end_expert_parallel(ranks)
    return result


def _warn_unreferenced(cfg: EvalConfig, unreferenced: list[str], total: int) -> None:
    """Name, before anything is generated, the generations that no reference answer will score."""
    shown = ", ".join(unreferenced[:5]) + (" ..." if len(unreferenced) > 5 else "")
    hint = "" if cfg.annotation_file else "; if its answers are kept apart, pass them with --annotation_file"
    print(f"warning: {cfg.data_path}: {len(unreferenced)} of {total} generations have no reference answer "
          f"and will not be scored (ids {shown}){hint}", file=sys.stderr)


def _generate_into(done: dict[int, str], journal: Journal | None, generate: Generate, samples: list[Sample | None],
                   todo: list[int], items: list[EvalItem], ids: list[str], batch_size: int) -> list[Skipped]:
    """Generate ``todo`` into ``done``, appending each batch's replies (and errors) to the journal as it
    finishes; returns the generations that failed."""
    failed: list[Skipped] = []
    rows: list[dict[str, Any]] = []
    for n, reply, error in replies_or_errors(generate, samples, todo, batch_size):
        if error is None:
            done[n] = reply
            rows.append({"n": n, "id": ids[n], "prediction": reply})
        else:
            failed.append(Skipped(n, items[n].meta["record"], ids[n], FAILED_GENERATION, error))
            rows.append({"n": n, "id": ids[n], "error": error})
        if journal and len(rows) >= batch_size:
            journal.record(rows)
            rows = []
    if journal:
        journal.record(rows)
    return failed


def _check(cfg: EvalConfig, items: list[EvalItem], data_root: Path, config: UniMoEConfig,
           tokenizer: PreTrainedTokenizerBase) -> tuple[list[Sample | None], list[Skipped], dict[int, list[str]]]:
    """Every generation's sample checked (media decoded, prompt tokenised); bad ones raise unless skipped."""
    samples, skipped, missing = check_items(items, config, tokenizer, cfg.data_path, data_root, cfg.num_workers)
    if skipped and not cfg.skip_bad_samples:
        refuse_bad_samples(skipped, cfg.data_path, len(items))
    if skipped:
        print(summary_line(skipped, len(items)) + " (listed at the end and in the metrics file)", file=sys.stderr)
    return samples, skipped, missing


def write_outputs(cfg: EvalConfig, task: Task, result: dict[str, Any], rows: list[dict[str, Any]],
                  items: list[EvalItem], predictions: list[str]) -> None:
    """The predictions file, the task's side file if any, the metrics file, and the summary table."""
    write_json(cfg.output, rows)
    if task.side_output is not None:
        suffix, build = task.side_output
        side = Path(cfg.output).with_name(Path(cfg.output).stem + suffix)
        result["side_output"] = str(write_json(side, build(items, predictions)))
    write_json(cfg.metrics_output or default_metrics_path(cfg.output), result)
    print(M.summarize({task.name: result["metrics"]}))
    if task.notes:
        print(f"note: {task.notes}")
