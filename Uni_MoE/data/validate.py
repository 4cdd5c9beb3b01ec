"""Validation pass over training/eval JSON: every bad sample is found before a run starts.

``python -m Uni_MoE.data.validate data.json [more.json ...] --model_name_or_path checkpoint/tiny`` reads each
record the way training does (schema, media decoding, tokenisation with expanded placeholders) and prints
one line per problem: file, sample index, id and reason. The trainer runs the same pass before training.

Errors make a sample unusable: a missing or mistyped field, a media key the schema does not know, a media
file that is missing, empty, truncated, not what its extension says, of zero duration, of too high a
resolution or longer than ``max_audio_chunks`` allows, a modality the model has no encoder for, a training
conversation without an answer, more tokens than ``model_max_length``.

Warnings keep the sample: silent audio (peak below ``media.SILENCE_PEAK``) is valid input — a silent
clip is a fair question ("is anything playing?") — but is reported because it often means a broken export.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from ..config import UniMoEConfig
from ..modalities import MODALITY_NAMES
from ..model_folder import ModelFolderError, require_model_folder
from . import media
from .dataset import UniMoEDataset
from .schema import Sample, SampleError, parse_sample, read_records, resolve_media_path, unknown_media_keys

ERROR, WARNING = "error", "warning"
WHERE_PREFIX = re.compile(r"^(.*? )?sample \d+( \(id [^)]*\))?: ")


@dataclass
class Issue:
    """One problem of one sample."""

    file: str
    index: int
    id: str | None
    reason: str
    severity: str = ERROR

    def __str__(self) -> str:
        return f"{self.file} sample {self.index} (id {self.id}): {self.severity}: {self.reason}"


@dataclass
class ValidationReport:
    """The outcome of a validation pass: the usable samples (in file order) and every issue found."""

    total: int
    samples: list[Sample] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == ERROR]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == WARNING]

    @property
    def num_bad(self) -> int:
        """Records left out: those with at least one error."""
        return self.total - len(self.samples)

    def summary(self) -> str:
        unreadable = sum(i.index < 0 for i in self.errors)
        return (f"{self.total} samples: {len(self.samples)} usable, {self.num_bad} bad, {len(self.warnings)} warning(s)"
                + (f", {unreadable} unreadable file(s)" if unreadable else ""))

    def format(self) -> str:
        """Every issue on its own line, then the summary."""
        return "\n".join([str(i) for i in self.issues] + [self.summary()])

    def to_json(self) -> str:
        return json.dumps({"summary": self.summary(), "issues": [asdict(i) for i in self.issues]}, indent=1)


class DataValidationError(ValueError):
    """Training data has bad samples; the message is the full report."""


class _SampleChecker(Dataset):
    """Item j: the issues of sample j, found by loading it exactly as training does (picklable for workers)."""

    def __init__(self, dataset: UniMoEDataset, file_of: list[str]) -> None:
        self.dataset = dataset
        self.file_of = file_of

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, j: int) -> list[Issue]:
        sample = self.dataset.samples[j]

        def issue(reason: str, severity: str = ERROR) -> Issue:
            return Issue(self.file_of[j], sample.index, sample.id, reason, severity)

        config = self.dataset.config
        missing = [m for m in MODALITY_NAMES
                   if sample.media(m) and m not in config.enabled_modalities()]
        if missing:
            return [issue(f"has {'/'.join(missing)} media but the model has no encoder for it")]
        if not self.dataset.for_generation and not sample.conversations[-1]["value"].strip():
            return [issue("the conversation's answer (last gpt turn) is empty")]
        try:
            self.dataset[j]
        except ValueError as err:
            return [issue(issue_reason(err.__cause__ or err))]
        except Exception as err:  # noqa: BLE001 - a validation pass reports every failure instead of crashing
            return [issue(f"{type(err).__name__}: {issue_reason(err)}")]
        return [issue(f"{path}: audio is silent (peak below {media.SILENCE_PEAK}); kept", WARNING)
                for path in self._voice_files(sample) if media.is_silent(media.load_waveform(path))]

    def _voice_files(self, sample: Sample) -> list[Path]:
        return [resolve_media_path(p, self.dataset.data_root) for p in sample.speech + sample.audio]


def issue_reason(err: BaseException) -> str:
    """The error's message without the "<file> sample <i> (id <id>): " prefix the Issue already shows."""
    return WHERE_PREFIX.sub("", str(err), count=1)


def _identity(issues: list[Issue]) -> list[Issue]:
    return issues


def _parse_file(path: str | Path, voice_modality: str) -> tuple[list[Sample], list[Issue], int]:
    """The file's parseable samples, the issues of the others, and its record count."""
    samples, issues = [], []
    try:
        records = read_records(path)
    except SampleError as err:
        return [], [Issue(str(path), -1, None, str(err).removeprefix(f"{path}: "))], 0
    for index, record in enumerate(records):
        try:
            sample = parse_sample(record, index, voice_modality, str(path))
        except SampleError as err:
            reason = issue_reason(err)
            sid = record.get("id", record.get("question_id")) if isinstance(record, dict) else None
            issues.append(Issue(str(path), index, None if sid is None else str(sid), reason))
            continue
        unknown = unknown_media_keys(record)
        if unknown:
            issues.append(Issue(str(path), index, sample.id, f"unknown media key(s) {unknown}; the schema's are "
                                "image, video, voice, speech, audio"))
            continue
        samples.append(sample)
    return samples, issues, len(records)


def _check_shards(checker: _SampleChecker, num_workers: int, show_progress: bool) -> dict[int, list[Issue]]:
    """Issues of every sample; under torch.distributed each rank checks every world_size-th sample and the
    results are shared, so the pass costs one rank's share of the data."""
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    mine = list(range(rank, len(checker), world))
    loader = DataLoader(Subset(checker, mine), batch_size=None, num_workers=num_workers, collate_fn=_identity)
    found: dict[int, list[Issue]] = {}
    with tqdm(total=len(mine), desc="validating samples", disable=not show_progress) as bar:
        for j, issues in zip(mine, loader):
            found[j] = issues
            bar.update()
    if world > 1:
        every: list[dict[int, list[Issue]]] = [{} for _ in range(world)]
        dist.all_gather_object(every, found)
        found = {j: issues for part in every for j, issues in part.items()}
    return found


def check_samples(
    samples: list[Sample],
    sources: list[str],
    tokenizer: PreTrainedTokenizerBase,
    config: UniMoEConfig,
    data_root: str | Path | None = None,
    model_max_length: int | None = None,
    for_generation: bool = False,
    num_workers: int = 0,
    show_progress: bool = True,
) -> list[list[Issue]]:
    """The issues of each parsed sample (aligned with ``samples``; ``sources`` names each one's file), found by
    loading it as training or generation does; ``num_workers`` processes decode media in parallel (per rank,
    when torch.distributed is initialised: the ranks share the work)."""
    dataset = UniMoEDataset(samples, tokenizer, config, data_root, model_max_length, for_generation)
    found = _check_shards(_SampleChecker(dataset, sources), num_workers, show_progress)
    return [found[j] for j in range(len(samples))]


def validate_files(
    paths: list[str] | list[Path],
    tokenizer: PreTrainedTokenizerBase,
    config: UniMoEConfig,
    data_root: str | Path | None = None,
    model_max_length: int | None = None,
    for_generation: bool = False,
    num_workers: int = 0,
    show_progress: bool = True,
) -> ValidationReport:
    """Check every record of ``paths`` (see :func:`check_samples`). A file that cannot be read is an
    error of its own (sample -1)."""
    paths = [str(p) for p in paths]
    samples: list[Sample] = []
    file_of: list[str] = []
    report = ValidationReport(total=0)
    for path in paths:
        parsed, issues, count = _parse_file(path, config.voice_modality)
        samples += parsed
        file_of += [str(path)] * len(parsed)
        report.issues += issues
        report.total += count
    found = check_samples(samples, file_of, tokenizer, config, data_root, model_max_length, for_generation,
                          num_workers, show_progress)
    for sample, issues in zip(samples, found):
        report.issues += issues
        if not any(i.severity == ERROR for i in issues):
            report.samples.append(sample)
    report.issues.sort(key=lambda i: (paths.index(i.file), i.index))
    return report


def main(argv: list[str] | None = None) -> int:
    """Print the report; the exit status is 1 when any sample has an error."""
    from .tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(prog="python -m Uni_MoE.data.validate", description=__doc__.split("\n")[0])
    parser.add_argument("data_path", nargs="+", help="training/eval JSON or JSON-lines file(s)")
    parser.add_argument("--data_root", default=None, help="folder that relative media paths are under")
    parser.add_argument("--model_name_or_path", required=True,
                        help="model folder: its config (encoders, audio limits) and tokenizer are used")
    parser.add_argument("--model_max_length", type=int, default=2048)
    parser.add_argument("--for_generation", action="store_true", help="eval data: the answer turn is optional")
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--report", default=None, help="also write the report as JSON to this file")
    args = parser.parse_args(argv)
    try:
        folder = require_model_folder(args.model_name_or_path)
    except ModelFolderError as err:
        sys.exit(str(err))
    report = validate_files(
        args.data_path, load_tokenizer(folder), UniMoEConfig.from_pretrained(str(folder)),
        args.data_root, args.model_max_length, args.for_generation, args.num_workers,
    )
    print(report.format())
    if args.report:
        Path(args.report).write_text(report.to_json() + "\n")
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
