"""Run one benchmark end to end: read the eval JSON, generate in batches, score, write two JSON files.

Predictions file: one record per generation with its id, prompt, prediction, reference and score.
Metrics file: the task's metrics, the decoding settings and counts; a summary table is printed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..data.conversation import render_prompt
from ..data.dataset import UniMoEDataset
from ..data import schema
from ..data.schema import MEDIA_KEYS, Sample, SampleError, parse_sample, resolve_media_path
from ..serve.generate import GenerationSettings, iter_replies, load_model
from . import metrics as M
from .distributed import RankInfo, init_expert_parallel
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
    batch_size: int = 8
    num_workers: int = 0
    limit: int | None = None
    circular: bool = True
    seed: int = 0
    device: str | None = None
    dtype: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    enable_deepspeed_moe: bool = False
    eval_ep_size: int = 1
    skip_missing_media: bool = False
    release: dict[str, Any] = field(default_factory=dict)  # an original release's other folders


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON (UTF-8, indented) through a temporary file, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """A JSON list or JSON-lines file of eval records, read as training data is; any bad record stops the
    run with the file named (eval has no sample to skip to)."""
    records = schema.read_records(path)
    for index, record in enumerate(records):
        if isinstance(record, SampleError):
            raise SampleError(f"{path}: {record}")
        if not isinstance(record, dict):
            raise SampleError(f"{path}: expected a list of JSON objects (record {index} is {type(record).__name__})")
    return records


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
        if not isinstance(p, str) or len(p) >= 200:
            return p
        if Path(p).exists():
            return str(Path(p).resolve())
        under = data_root / p.lstrip("/")
        return str(under.resolve()) if under.exists() else p

    return {k: fix(v) if k in MEDIA_KEYS else v for k, v in record.items()}


def missing_media(sample: Sample, data_root: Path) -> list[str]:
    """The sample's media files that do not exist (a long string is an inline base64 image, not a file)."""
    frames = [f for v in sample.videos for f in (v if isinstance(v, list) else [v])]
    paths = [*sample.images, *frames, *sample.speech, *sample.audio]
    return [p for p in paths if len(p) < 200 and not resolve_media_path(p, data_root).exists()]


def drop_missing_media(items: list[EvalItem], samples: list[Sample], data_root: Path, data_path: str,
                       skip: bool) -> tuple[list[EvalItem], list[Sample], list[dict[str, Any]]]:
    """Items whose media all exist; the others raise an error naming the first, or are skipped and listed."""
    kept_items, kept_samples, skipped = [], [], []
    for item, sample in zip(items, samples):
        missing = missing_media(sample, data_root)
        if not missing:
            kept_items.append(item)
            kept_samples.append(replace(sample, index=len(kept_samples)))
        elif skip:
            skipped.append({"id": sample.id, "missing": missing})
        else:
            raise SampleError(f"{data_path} sample {sample.index} (id {sample.id}): missing media {missing} "
                              f"(under {data_root}; --skip_missing_media skips such samples)")
    return kept_items, kept_samples, skipped


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
            item.meta["source"] = record
        items += prepared
    return items


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Generate and score ``cfg.data_path`` as ``cfg.data_type``; returns the metrics file's content."""
    task = get_task(cfg.data_type)
    settings: GenerationSettings = task.settings.with_overrides(**cfg.overrides)
    data_root = Path(cfg.data_root) if cfg.data_root else Path(cfg.data_path).resolve().parent
    annotations = read_annotations(cfg.annotation_file) if cfg.annotation_file else {}
    options = TaskOptions(annotations=annotations, circular=cfg.circular)

    records = read_records(cfg.data_path)[: cfg.limit]
    items = prepare_items(task, records, data_root, options, cfg.data_path)
    # media paths are checked before the model loads; whether `voice` is speech or sound comes after
    samples = [parse_sample(it.record, n, "speech", cfg.data_path) for n, it in enumerate(items)]
    items, samples, skipped = drop_missing_media(items, samples, data_root, cfg.data_path, cfg.skip_missing_media)

    ranks, ep_size, device = RankInfo(), None, cfg.device
    if cfg.enable_deepspeed_moe:
        ranks, ep_size = init_expert_parallel(cfg.eval_ep_size), cfg.eval_ep_size
        device = device or ranks.device()
    model, tokenizer = load_model(cfg.model_path, device, cfg.dtype, ep_size, cfg.release)
    voice = model.config.voice_modality
    samples = [parse_sample(it.record, n, voice, cfg.data_path) for n, it in enumerate(items)]
    dataset = UniMoEDataset(samples, tokenizer, model.config, data_root, for_generation=True)
    torch.manual_seed(cfg.seed)
    predictions = [""] * len(items)
    for n, reply in iter_replies(model, tokenizer, dataset, settings, cfg.batch_size, cfg.num_workers,
                                 progress=ranks.is_main and task.name, synced_gpus=ranks.world_size > 1):
        predictions[n] = reply

    metrics, scores = task.score(items, predictions, options)
    rows = [prediction_row(it, render_prompt(s.conversations), p, sc, i)
            for i, (it, s, p, sc) in enumerate(zip(items, samples, predictions, scores))]
    result: dict[str, Any] = {
        "task": task.name, "description": task.description, "data_path": str(cfg.data_path),
        "model_path": str(cfg.model_path), "num_records": len(records), "num_generations": len(items),
        "generation": settings.as_dict(), "metrics": metrics,
    }
    if skipped:
        result["skipped_missing_media"] = {"count": len(skipped), "samples": skipped}
    if cfg.enable_deepspeed_moe:
        result["expert_parallel"] = {"ep_size": cfg.eval_ep_size, "world_size": ranks.world_size}
    if task.notes:
        result["notes"] = task.notes
    if ranks.is_main:
        write_outputs(cfg, task, result, rows, items, predictions)
    return result


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
