"""One entry per eval ``--data_type``: how its records become prompts, how it decodes, how it scores.

Records are the original eval JSON as released (``question_id``/``id``, ``text``, ``conversations`` with
an empty last gpt turn, ``gt``, ``answer``, ``category`` ...); records without ``conversations`` get one
built from ``text``/``question``. The original's ``eval.py`` only chose decoding settings by data_type
(speech model: "vqa"/"mmbench" greedy with 512 new tokens, everything else sampled at T=0.2 with 1024) and
scored nothing; the scoring here follows each benchmark's own definition (``metrics.py``).

Fix of the original's audio ``eval.py``: its ``if "clothoaqa" ... if "clothov" ... else`` chain let the
final ``else`` overwrite the ClothoAQA settings, so ClothoAQA (and vqa, mmbench, video) actually ran
sampled at T=0.2 with 1024 tokens. Here clothoaqa gets the settings that code meant (4 beams, sampled at
T=0.9, 512 tokens). Types the original did not have (pope, seedbench, race, ...) decode greedily, as
LLaVA's scripts for those benchmarks do.
"""

from __future__ import annotations

import copy
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..data.schema import PLACEHOLDER_RE
from ..data.synthetic_tasks import synthetic_accuracy
from ..serve.generate import GenerationSettings
from . import metrics as M

SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
GREEDY = GenerationSettings(max_new_tokens=512)
SAMPLED = GenerationSettings(do_sample=True, temperature=0.2, max_new_tokens=1024)
OPTION_LINE = re.compile(r"^(\s*\(?)([A-Z])([.:)]\s*)(.*)$")


@dataclass
class TaskOptions:
    """Run-wide inputs some tasks need: external answer annotations, circular MMBench, file outputs."""

    annotations: dict[Any, list[str]] = field(default_factory=dict)
    circular: bool = True


@dataclass
class EvalItem:
    """One generation: the record fed to the model, its reference and what scoring needs."""

    record: dict[str, Any]
    reference: Any
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """A benchmark: ``prepare`` turns a record into items; ``score`` returns (metrics, per-item scores)."""

    name: str
    description: str
    settings: GenerationSettings
    prepare: Callable[[dict[str, Any], int, TaskOptions], list[EvalItem]]
    score: Callable[[list[EvalItem], list[str], TaskOptions], tuple[dict[str, Any], list[Any]]]
    notes: str = ""
    side_output: tuple[str, Callable[[list[EvalItem], list[str]], Any]] | None = None  # (file suffix, builder)
    scores_references: bool = True  # False: scored elsewhere, so items without a reference are expected


class TaskError(ValueError):
    """A record that lacks what its task needs; the message names the record."""


# ---------------------------------------------------------------- record helpers


def record_id(record: Mapping[str, Any], position: int) -> str:
    return str(record.get("question_id", record.get("id", record.get("index", position))))


def _unwrap(value: Any) -> Any:
    """The single element of a one-element list (MMBench1.1 stores ``answer``/``category`` as lists)."""
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def category_of(record: Mapping[str, Any]) -> str | None:
    value = record.get("category", record.get("question_type", record.get("question_type_id")))
    value = value[0] if isinstance(value, list) and value else value
    return None if value in (None, "", "default") else str(value)


def human_text(record: Mapping[str, Any]) -> str:
    """The question as written: the first human turn without placeholders, else ``text``/``question``."""
    convs = record.get("conversations")
    if convs:
        return PLACEHOLDER_RE.sub("", convs[0]["value"]).strip()
    return str(record.get("text", record.get("question", ""))).strip()


def with_question(record: Mapping[str, Any], question: str | None = None) -> dict[str, Any]:
    """A copy whose conversation is one human turn (``question`` if given, else the record's own)."""
    out = copy.deepcopy(dict(record))
    if question is None and out.get("conversations"):
        return out
    text = question if question is not None else human_text(record)
    if not text:
        raise TaskError(f"record {record_id(record, -1)}: no 'conversations', 'text' or 'question'")
    out["conversations"] = [{"from": "human", "value": text}, {"from": "gpt", "value": ""}]
    return out


def references(record: Mapping[str, Any], options: TaskOptions, keys: Sequence[str]) -> list[str] | None:
    """Reference answers from the first of ``keys`` present, else from the annotation file."""
    for key in keys:
        value = record.get(key)
        if value not in (None, "", []):
            values = value if isinstance(value, list) else [value]
            return [str(v["answer"]) if isinstance(v, Mapping) else str(v) for v in values]
    qid = record.get("question_id", record.get("id"))
    for key in (str(qid), (str(qid), human_text(record).split("\n")[0].strip().lower())):
        if key in options.annotations:
            return list(options.annotations[key])
    return None


# ---------------------------------------------------------------- multiple choice


def options_from_text(text: str) -> dict[str, str]:
    """Options written as lines ``A. text`` / ``(B) text`` / ``C:text``, consecutive from A."""
    found: dict[str, str] = {}
    for line in text.split("\n"):
        m = OPTION_LINE.match(line)
        if m and m.group(2) == chr(ord("A") + len(found)):
            found[m.group(2)] = m.group(4).strip()
    return found if len(found) >= 2 else {}


def options_of(record: Mapping[str, Any]) -> dict[str, str]:
    """Options from ``options`` (dict or list), ``choices`` (A-OKVQA), ``choice_a``.. (SEED-Bench),
    columns ``A``, ``B``.. (MMBench TSV) or, failing those, the option lines of the question text."""
    value = record.get("options", record.get("choices"))
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, list):
        return {chr(ord("A") + i): str(v) for i, v in enumerate(value)}
    seed = {L: record[f"choice_{L.lower()}"] for L in "ABCDEFGH" if record.get(f"choice_{L.lower()}") is not None}
    if seed:
        return {k: str(v) for k, v in seed.items()}
    cols = {}
    for L in "ABCDEFGH":
        if record.get(L) in (None, "") or record.get(L) != record.get(L):
            break
        cols[L] = str(record[L])
    return cols or options_from_text(human_text(record))


def answer_letter(record: Mapping[str, Any], options: Mapping[str, str]) -> str | None:
    """The correct option letter: ``answer``/``gt``/``label`` as a letter or option text, or an index."""
    if "correct_choice_idx" in record:
        return chr(ord("A") + int(record["correct_choice_idx"]))
    for key in ("answer", "gt", "label"):
        value = _unwrap(record.get(key))
        if isinstance(value, int):
            return chr(ord("A") + value)
        if isinstance(value, str) and value.strip():
            key_text = value.strip()
            if key_text.upper() in options and len(key_text) == 1:
                return key_text.upper()
            hit = [k for k, v in options.items() if v.strip().lower() == key_text.lower()]
            if hit:
                return hit[0]
    return None


def mc_prompt(record: Mapping[str, Any], options: Mapping[str, str]) -> dict[str, Any]:
    """The record with ``options`` shown: option lines in its text are rewritten in place (keeping
    their format), else the options and the letter instruction are appended to the question."""
    out = with_question(record)
    turn = out["conversations"][0]
    lines, written = turn["value"].split("\n"), 0
    for i, line in enumerate(lines):
        m = OPTION_LINE.match(line)
        if m and m.group(2) in options and m.group(2) == chr(ord("A") + written):
            lines[i] = f"{m.group(1)}{m.group(2)}{m.group(3)}{options[m.group(2)]}"
            written += 1
    if written == len(options):
        turn["value"] = "\n".join(lines)
    else:
        shown = "\n".join(f"{k}. {v}" for k, v in options.items())
        turn["value"] = f"{turn['value'].rstrip()}\n{shown}\n{LETTER_ANSWER}"
    return out


def prepare_mc(record: dict[str, Any], position: int, options: TaskOptions) -> list[EvalItem]:
    opts = options_of(record)
    if len(opts) < 2:
        raise TaskError(f"record {record_id(record, position)}: no options found (fields or 'A. ...' lines)")
    letter = answer_letter(record, opts)
    return [EvalItem(mc_prompt(record, opts), letter, {"options": opts, "category": category_of(record)})]


def score_mc(items: list[EvalItem], preds: list[str], options: TaskOptions) -> tuple[dict[str, Any], list[Any]]:
    hits = [None if it.reference is None else M.extract_choice(p, it.meta["options"]) == it.reference
            for it, p in zip(items, preds)]
    return _accuracy(hits, items, "accuracy"), hits


def _accuracy(hits: Sequence[Any], items: Sequence[EvalItem], name: str) -> dict[str, Any]:
    """Mean of the scored items overall and per category; counts of scored and unscored items."""
    scored = [(float(h), it.meta.get("category")) for h, it in zip(hits, items) if h is not None]
    out: dict[str, Any] = {"n": len(scored)}
    if len(scored) < len(items):
        out["n_without_reference"] = len(items) - len(scored)
    if scored:
        out[name] = sum(h for h, _ in scored) / len(scored)
        per: dict[str, list[float]] = defaultdict(list)
        for h, cat in scored:
            if cat is not None:
                per[cat].append(h)
        if len(per) > 1:
            out["per_category"] = {c: sum(v) / len(v) for c, v in sorted(per.items())}
    return out


# ---------------------------------------------------------------- open-ended QA


def prepare_open(keys: Sequence[str]) -> Callable[[dict[str, Any], int, TaskOptions], list[EvalItem]]:
    def prepare(record: dict[str, Any], position: int, options: TaskOptions) -> list[EvalItem]:
        return [EvalItem(with_question(record), references(record, options, keys),
                         {"category": category_of(record)})]
    return prepare


def score_vqa(evalai_tokenize: bool = False) -> Callable:
    def score(items: list[EvalItem], preds: list[str], options: TaskOptions) -> tuple[dict[str, Any], list[Any]]:
        hits = [None if not it.reference else M.vqa_soft_accuracy(p, it.reference, evalai_tokenize=evalai_tokenize)
                for it, p in zip(items, preds)]
        return _accuracy(hits, items, "accuracy"), hits
    return score


def score_exact(items: list[EvalItem], preds: list[str], options: TaskOptions) -> tuple[dict[str, Any], list[Any]]:
    hits = [None if not it.reference else M.exact_match_accuracy(p, it.reference) for it, p in zip(items, preds)]
    return _accuracy(hits, items, "accuracy"), hits


def score_clothoaqa(items: list[EvalItem], preds: list[str], options: TaskOptions) -> tuple[dict[str, Any], list[Any]]:
    """Yes/no questions: the reply's yes/no reading (POPE's rule) against the answer; others: exact match."""
    hits: list[Any] = []
    for it, p in zip(items, preds):
        refs = [M.normalize_vqa_answer(r) for r in it.reference or []]
        if not refs:
            hits.append(None)
        elif refs[0] in ("yes", "no"):
            it.meta["category"] = "yes_no"
            hits.append(float(M.pope_yes_no(p) == refs[0]))
        else:
            it.meta["category"] = "open"
            hits.append(M.exact_match_accuracy(p, it.reference))
    return _accuracy(hits, items, "accuracy"), hits


# ---------------------------------------------------------------- task-specific


def prepare_aokvqa(record: dict[str, Any], position: int, options: TaskOptions) -> list[EvalItem]:
    """Direct answer always; multiple choice too when the record has ``choices``."""
    question = human_text(record)
    base = {k: v for k, v in record.items() if k != "conversations"}
    items = [EvalItem(with_question(record), references(record, options, ("gt", "direct_answers")),
                      {"mode": "direct_answer"})]
    if record.get("choices"):
        stem = question.replace(SHORT_ANSWER, "").strip()
        opts = options_of(record)
        mc = mc_prompt(with_question(base, stem), opts)
        items.append(EvalItem(mc, answer_letter(record, opts), {"mode": "multiple_choice", "options": opts}))
    return items


def score_aokvqa(items: list[EvalItem], preds: list[str], options: TaskOptions) -> tuple[dict[str, Any], list[Any]]:
    hits: list[Any] = []
    for it, p in zip(items, preds):
        if it.reference in (None, []):
            hits.append(None)
        elif it.meta["mode"] == "direct_answer":
            hits.append(M.aokvqa_direct_answer_accuracy(p, it.reference))
        else:
            hits.append(float(M.extract_choice(p, it.meta["options"]) == it.reference))
    out: dict[str, Any] = {}
    for mode in ("direct_answer", "multiple_choice"):
        pick = [i for i, it in enumerate(items) if it.meta["mode"] == mode]
        if pick:
            out[mode] = _accuracy([hits[i] for i in pick], [items[i] for i in pick], "accuracy")
    return out, hits


def prepare_pope(record: dict[str, Any], position: int, options: TaskOptions) -> list[EvalItem]:
    refs = references(record, options, ("label", "answer", "gt"))
    return [EvalItem(with_question(record), refs[0] if refs else None, {"category": category_of(record)})]


def score_pope(items: list[EvalItem], preds: list[str], options: TaskOptions) -> tuple[dict[str, Any], list[Any]]:
    pairs = [(p, it.reference, it.meta.get("category")) for it, p in zip(items, preds) if it.reference is not None]
    hits = [None if it.reference is None else float(M.pope_yes_no(p) == it.reference.strip().lower())
            for it, p in zip(items, preds)]
    if not pairs:
        return {"n": 0, "n_without_reference": len(items)}, hits
    out: dict[str, Any] = dict(M.pope_metrics([p for p, _, _ in pairs], [r for _, r, _ in pairs]))
    cats = sorted({c for _, _, c in pairs if c is not None})
    if len(cats) > 1:
        out["per_category"] = {
            c: M.pope_metrics([p for p, _, k in pairs if k == c], [r for _, r, k in pairs if k == c])["f1"]
            for c in cats
        }
    return out, hits


def mmbench_index(record: Mapping[str, Any], position: int) -> int:
    """MMBench's question index: ``index``, else the number ending ``id`` ("MMBench1.1-241"), else position."""
    if "index" in record:
        return int(record["index"])
    m = re.search(r"(\d+)$", str(record.get("id", record.get("question_id", ""))))
    return int(m.group(1)) if m else position


def prepare_mmbench(record: dict[str, Any], position: int, options: TaskOptions) -> list[EvalItem]:
    """The question (and, with circular evaluation, its rotated copies: options ABCD, BCDA, ...)."""
    opts = options_of(record)
    if len(opts) < 2:
        raise TaskError(f"record {record_id(record, position)}: no options found (fields or 'A. ...' lines)")
    letter = answer_letter(record, opts)
    if letter is None:
        raise TaskError(f"record {record_id(record, position)}: no answer letter among {sorted(opts)}")
    question = {"index": mmbench_index(record, position), "options": opts, "answer": letter,
                "category": category_of(record)}
    copies = M.circular_shifts(question) if options.circular else [question]
    return [EvalItem(mc_prompt(record, c["options"]), c["answer"],
                     {"index": c["index"], "options": c["options"], "category": c["category"]})
            for c in copies]


def score_mmbench(items: list[EvalItem], preds: list[str], options: TaskOptions) -> tuple[dict[str, Any], list[Any]]:
    rows = [{"index": it.meta["index"], "options": it.meta["options"], "answer": it.reference, "prediction": p,
             "category": it.meta["category"]} for it, p in zip(items, preds)]
    hits = [float(M.extract_choice(p, it.meta["options"]) == it.reference) for it, p in zip(items, preds)]
    out = M.mmbench_circular_accuracy(rows)
    out["circular"] = options.circular
    return out, hits


def score_mmvet(items: list[EvalItem], preds: list[str], options: TaskOptions) -> tuple[dict[str, Any], list[Any]]:
    """Nothing to score here: MM-Vet's GPT-4 judge reads the file ``mmvet_judge_input`` makes."""
    return {"n": len(items), "scored": "no (needs the GPT-4 judge)"}, [None] * len(items)


def mmvet_judge_input(items: list[EvalItem], preds: list[str]) -> dict[str, str]:
    """MM-Vet's results file: {question id: answer}, the input of its GPT-4 evaluator."""
    return {str(it.meta["id"]): p for it, p in zip(items, preds)}


def prepare_mmvet(record: dict[str, Any], position: int, options: TaskOptions) -> list[EvalItem]:
    return [EvalItem(with_question(record), record.get("gt"), {"id": record_id(record, position)})]


def prepare_caption(record: dict[str, Any], position: int, options: TaskOptions) -> list[EvalItem]:
    refs = references(record, options, ("gt", "captions", "answer"))
    return [EvalItem(with_question(record), refs, {"id": record_id(record, position)})]


def score_caption(items: list[EvalItem], preds: list[str], options: TaskOptions) -> tuple[dict[str, Any], list[Any]]:
    keyed = [(f"{i}:{it.meta['id']}", p, it.reference) for i, (it, p) in enumerate(zip(items, preds)) if it.reference]
    out: dict[str, Any] = {"n": len(keyed)}
    if len(keyed) < len(items):
        out["n_without_reference"] = len(items) - len(keyed)
    if keyed:
        out.update(M.caption_metrics({k: p for k, p, _ in keyed}, {k: r for k, _, r in keyed}))
    return out, [None] * len(items)


def prepare_synthetic(record: dict[str, Any], position: int, options: TaskOptions) -> list[EvalItem]:
    if "task" not in record or "answer" not in record:
        raise TaskError(f"record {record_id(record, position)}: synthetic records need 'task' and 'answer'")
    return [EvalItem(with_question(record), str(record["answer"]), {"category": record["task"]})]


def score_synthetic(items: list[EvalItem], preds: list[str], options: TaskOptions) -> tuple[dict[str, Any], list[Any]]:
    """Per task: accuracy of the reply's first word against the answer, and chance (1 / #choices)."""
    per, hits = synthetic_accuracy([it.meta["category"] for it in items], [it.reference for it in items], preds)
    return {"n": len(hits), "accuracy": sum(hits) / len(hits), "per_task": per}, hits


# ---------------------------------------------------------------- registry

_VQA_KEYS = ("gt", "answers", "answer")
_OPEN_NOTE = "string match after VQA normalisation; the GPT-judged scores these benchmarks also report need a service"
TASKS: dict[str, Task] = {t.name: t for t in [
    Task("vqa", "VQAv2 / OK-VQA soft accuracy (min(#humans agreeing / 3, 1), leave-one-out)", GREEDY,
         prepare_open(_VQA_KEYS), score_vqa()),
    Task("textvqa", "TextVQA soft accuracy with the EvalAI answer processor", GREEDY,
         prepare_open(_VQA_KEYS), score_vqa(evalai_tokenize=True)),
    Task("aokvqa", "A-OKVQA direct-answer accuracy (min(#matches / 3, 1)) and multiple-choice accuracy", GREEDY,
         prepare_aokvqa, score_aokvqa),
    Task("pope", "POPE yes/no: accuracy, precision, recall, F1, yes-ratio", GREEDY, prepare_pope, score_pope),
    Task("mmbench", "MMBench (and MMBench-Audio, question as speech) CircularEval accuracy", GREEDY,
         prepare_mmbench, score_mmbench),
    Task("seedbench", "SEED-Bench multiple-choice accuracy", GREEDY, prepare_mc, score_mc),
    Task("mmvet", "MM-Vet: writes the GPT-4 judge's input file", GREEDY.with_overrides(max_new_tokens=1024),
         prepare_mmvet, score_mmvet,
         notes="MM-Vet is scored by a GPT-4 judge, an online service this evaluation cannot reach: "
               "give the *_mmvet_judge_input.json file to MM-Vet's evaluator",
         side_output=("_mmvet_judge_input.json", mmvet_judge_input), scores_references=False),
    Task("clothoaqa", "ClothoAQA accuracy (yes/no and open-ended)",
         GenerationSettings(do_sample=True, num_beams=4, temperature=0.9, max_new_tokens=512),
         prepare_open(("answer", "gt", "answers")), score_clothoaqa),
    Task("clothov1", "Clotho v1 captioning: BLEU, METEOR, ROUGE-L, CIDEr",
         GenerationSettings(do_sample=True, num_beams=5, temperature=1.0, length_penalty=1.0,
                            min_new_tokens=10, max_new_tokens=512),
         prepare_caption, score_caption),
    Task("race", "RACE as long speech: multiple-choice accuracy", GREEDY, prepare_mc, score_mc),
    Task("english_listening", "English high-school listening (long speech): multiple-choice accuracy", GREEDY,
         prepare_mc, score_mc),
    Task("msvd", "open-ended video QA (MSVD-QA, ActivityNet-QA; video + its audio) accuracy", SAMPLED,
         prepare_open(("answer", "gt", "answers")),
         score_exact, notes=_OPEN_NOTE),
    Task("synthetic", "the project's synthetic tasks: accuracy per task against chance",
         GREEDY.with_overrides(max_new_tokens=8), prepare_synthetic, score_synthetic),
]}
ALIASES = {
    "vqav2": "vqa", "okvqa": "vqa", "mmbench_audio": "mmbench", "seed": "seedbench", "seed-bench": "seedbench",
    "mm-vet": "mmvet", "clothov2": "clothov1", "english-listening": "english_listening", "ehsl": "english_listening",
    "activitynet_qa": "msvd", "activitynet-qa": "msvd", "anet": "msvd", "video": "msvd",
}


def get_task(data_type: str) -> Task:
    """The task for an original or new ``--data_type`` (case-insensitive; aliases such as clothov2)."""
    key = data_type.strip().lower()
    name = ALIASES.get(key, key)
    if name not in TASKS:
        known = sorted(set(TASKS) | set(ALIASES))
        raise KeyError(f"unknown --data_type {data_type!r}; known: {', '.join(known)}")
    task = TASKS[name]
    return task if name == key else replace(task, name=key)


def load_annotations(data: Any) -> dict[Any, list[str]]:
    """Reference answers keyed by question id from an annotation file: VQA's ``annotations`` list,
    TextVQA's ``data`` list (also keyed by (image_id, question)), a list of records, or {id: answers}."""
    out: dict[Any, list[str]] = {}

    def answers(a: Any) -> list[str]:
        a = a if isinstance(a, list) else [a]
        return [str(x["answer"]) if isinstance(x, Mapping) else str(x) for x in a]

    if isinstance(data, Mapping) and "annotations" in data:
        for ann in data["annotations"]:
            out[str(ann["question_id"])] = answers(ann["answers"])
    elif isinstance(data, Mapping) and "data" in data:
        for ann in data["data"]:
            out[str(ann["question_id"])] = answers(ann["answers"])
            out[(str(ann["image_id"]), str(ann["question"]).strip().lower())] = answers(ann["answers"])
    elif isinstance(data, list):
        for ann in data:
            out[str(ann.get("question_id", ann.get("id")))] = answers(ann.get("answers", ann.get("gt")))
    elif isinstance(data, Mapping):
        out = {str(k): answers(v) for k, v in data.items()}
    else:
        raise TaskError("annotation file: expected a JSON object or list")
    return out
