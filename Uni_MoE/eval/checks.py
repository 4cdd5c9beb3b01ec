"""Which eval generations can run, found before generation: each record parsed, its media files found, and
every file decoded (or header-checked) and the prompt tokenised by the validation pass of training data
(``Uni_MoE.data.validate``, ``--for_generation``). Bad ones stop the run with one line each, or are skipped
and reported; a generation that still fails while running is reported the same way.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from ..config import UniMoEConfig
from ..data.schema import MIN_BASE64_LEN, Sample, SampleError, parse_sample, resolve_media_path
from ..data.validate import ERROR, check_samples, issue_reason
from .tasks import EvalItem, Task, record_id

MISSING_MEDIA = "missing_media"
FAILED_CHECK = "failed_check"
FAILED_GENERATION = "failed_generation"
REASONS = {MISSING_MEDIA: "missing media", FAILED_CHECK: "failed the check before generation",
           FAILED_GENERATION: "failed during generation"}


@dataclass
class Skipped:
    """A generation left out: its position among the run's generations, record index and id, why, and the error."""

    n: int
    record: int
    id: str
    reason: str
    error: str

    def line(self, data_path: str) -> str:
        return f"{data_path} sample {self.record} (id {self.id}): {REASONS[self.reason]}: {self.error}"


def missing_media(sample: Sample, data_root: Path) -> list[str]:
    """The sample's media files that do not exist (a long string is an inline base64 image, not a file)."""
    frames = [f for v in sample.videos for f in (v if isinstance(v, list) else [v])]
    paths = [*sample.images, *frames, *sample.speech, *sample.audio]
    return [p for p in paths if len(p) < MIN_BASE64_LEN and not resolve_media_path(p, data_root).exists()]


def check_items(items: list[EvalItem], config: UniMoEConfig, tokenizer: PreTrainedTokenizerBase, data_path: str,
                data_root: Path, num_workers: int = 0, show_progress: bool = True,
                ) -> tuple[list[Sample | None], list[Skipped], dict[int, list[str]]]:
    """Each item's sample (None for a bad one), the bad ones, and the missing files of those missing media."""
    samples: list[Sample | None] = []
    skipped: list[Skipped] = []
    missing: dict[int, list[str]] = {}
    for n, item in enumerate(items):
        record = item.meta["record"]
        rid = record_id(item.meta["source"], record)
        try:
            sample = parse_sample(item.record, record, config.voice_modality, data_path)
        except SampleError as err:
            skipped.append(Skipped(n, record, rid, FAILED_CHECK, issue_reason(err)))
            samples.append(None)
            continue
        gone = missing_media(sample, data_root)
        if gone:
            missing[n] = gone
            skipped.append(Skipped(n, record, rid, MISSING_MEDIA, f"{gone} (under {data_root})"))
            sample = None
        samples.append(sample)
    present = [n for n, s in enumerate(samples) if s is not None]
    found = check_samples([samples[n] for n in present], [data_path] * len(present), tokenizer, config, data_root,
                          for_generation=True, num_workers=num_workers, show_progress=show_progress)
    for n, issues in zip(present, found):
        errors = [i for i in issues if i.severity == ERROR]
        if errors:
            item = items[n]
            skipped.append(Skipped(n, item.meta["record"], record_id(item.meta["source"], item.meta["record"]),
                                   FAILED_CHECK, "; ".join(i.reason for i in errors)))
            samples[n] = None
    skipped.sort(key=lambda s: s.n)
    return samples, skipped, missing


def refuse_bad_samples(skipped: list[Skipped], data_path: str, total: int) -> None:
    """Raise SampleError listing every bad sample once (circular copies of a record share a line)."""
    lines = list(dict.fromkeys(s.line(data_path) for s in skipped))
    raise SampleError(f"{data_path}: {len(skipped)} of {total} generations cannot run:\n" + "\n".join(lines)
                      + "\npass --skip_bad_samples to evaluate the rest (the skipped ones are listed in the metrics "
                      "file)")


def missing_references(task: Task, items: list[EvalItem]) -> list[str]:
    """Ids of the generations that will have no reference answer to be scored against."""
    if not task.scores_references:
        return []
    return [record_id(it.meta["source"], it.meta["record"]) for it in items if it.reference in (None, "", [])]


def skipped_report(skipped: list[Skipped], missing: dict[int, list[str]]) -> dict[str, Any]:
    """The metrics file's account of what was left out: counts by reason and each sample with its error;
    ``skipped_missing_media`` keeps the earlier form ({count, samples: [{id, missing}]}) for missing files."""
    out: dict[str, Any] = {}
    if not skipped:
        return out
    out["skipped"] = {"count": len(skipped), "by_reason": dict(Counter(s.reason for s in skipped)),
                      "samples": [asdict(s) for s in skipped]}
    gone = [{"id": s.id, "missing": missing[s.n]} for s in skipped if s.n in missing]
    if gone:
        out["skipped_missing_media"] = {"count": len(gone), "samples": gone}
    return out


def summary_line(skipped: list[Skipped], total: int) -> str:
    """"skipped 3 of 60 generations: 1 missing media, 2 failed the check before generation"."""
    counts = Counter(s.reason for s in skipped)
    return f"skipped {len(skipped)} of {total} generations: " + ", ".join(
        f"{counts[r]} {REASONS[r]}" for r in REASONS if counts[r])
