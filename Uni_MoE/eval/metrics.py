"""Benchmark metrics as the benchmarks themselves define them.

Pure functions on strings and lists: no model code. Written here rather than imported because each
benchmark ships its scorer as a script rather than a library (VQA, TextVQA, POPE, MMBench, A-OKVQA);
captioning metrics come from ``pycocoevalcap``.

All scores are fractions in [0, 1] (CIDEr can exceed 1); ``summarize`` prints them x100.
"""

from __future__ import annotations

import re
import shutil
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, Literal

# ---------------------------------------------------------------------------
# VQA answer normalisation (VQA challenge evaluation, also used for OK-VQA and TextVQA)
# ---------------------------------------------------------------------------

# Contracted forms the VQA evaluator restores. Every form is reached from the spelling with its
# apostrophe dropped; forms with several apostrophes are reached from spellings with exactly one of
# them dropped (so "couldnt've" and "couldn'tve" map to "couldn't've", "couldntve" does not).
_CONTRACTED_FORMS = """
ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd how'll
how's isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've o'clock oughtn't shan't
should've shouldn't somebody'll somebody's someone'd someone'll someone's something'd something'll
that's there'd there're there's they'd they'll they're they've 'twas wasn't we've weren't what'll
what're what's what've when's where'd where's where've who'd who'll who's who've why'll why're why's
won't would've wouldn't y'all you'd you'll you're you've
couldn't've hadn't've he'd've it'd've mightn't've she'd've shouldn't've somebody'd've someone'd've
something'd've there'd've they'd've we'd've who'd've wouldn't've you'd've y'all'll y'all'd've 'ow's'at
""".split()


def _contraction_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for form in _CONTRACTED_FORMS:
        positions = [i for i, ch in enumerate(form) if ch == "'"]
        if len(positions) == 1:
            table[form.replace("'", "")] = form
        else:
            for i in positions:
                table[form[:i] + form[i + 1 :]] = form
    # The official table maps this one backwards; kept so scores stay comparable.
    table["somebody'd"] = "somebodyd"
    return table


_CONTRACTIONS = _contraction_table()
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# Apostrophes, colons and periods are not in this set: apostrophes stay, periods have their own rule.
_VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
                    ">", "<", "@", "`", ",", "?", "!")
_COMMA_IN_NUMBER = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def _vqa_punctuation(text: str) -> str:
    """Drop a mark that touches a space (or any mark, once a digit-comma-digit occurs); else make it a space."""
    glue = _COMMA_IN_NUMBER.search(text) is not None
    out = text
    for mark in _VQA_PUNCTUATION:
        if glue or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _vqa_digits_articles(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(ans: str, *, evalai_tokenize: bool = False) -> str:
    """Normalise an answer the way the VQA evaluator does before comparing strings.

    Steps: newlines/tabs to spaces, strip, punctuation rule (a mark next to a space is dropped,
    otherwise it becomes a space; if the text holds a digit-comma-digit, every mark is dropped, so
    "1,000" -> "1000"; a period is dropped unless a digit follows, so "3.5" stays), lowercase,
    number words to digits ("none" -> "0" as well), articles removed, contractions restored
    ("dont" -> "don't").

    ``evalai_tokenize`` adds the pre-step of the EvalAI/MMF answer processor that LLaVA's TextVQA
    evaluator uses: lowercase, delete commas and question marks, and split a possessive "'s" off its word.
    One deviation: the official period regex is applied with a replacement limit of 32 (``re.UNICODE``
    passed as ``count``); here every matching period is removed.
    """
    text = ans
    if evalai_tokenize:
        text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_digits_articles(_vqa_punctuation(text))


def vqa_soft_accuracy(prediction: str, answers: Sequence[str], *, evalai_tokenize: bool = False) -> float:
    """VQAv2 accuracy: mean over annotators i of min(1, #other annotators who gave the prediction / 3).

    With the usual 10 answers this is the "average over all 10-choose-9 subsets" definition.
    Both the prediction and the human answers are normalised (the official script only
    re-punctuates human answers because the released annotations are already normalised; the
    TextVQA evaluator normalises both). A single reference has no "other" annotators, so there the
    score is plain normalised exact match.
    """
    if not answers:
        raise ValueError("vqa_soft_accuracy needs at least one reference answer")
    pred = normalize_vqa_answer(prediction, evalai_tokenize=evalai_tokenize)
    refs = [normalize_vqa_answer(a, evalai_tokenize=evalai_tokenize) for a in answers]
    if len(refs) == 1:
        return float(pred == refs[0])
    matches = sum(ref == pred for ref in refs)
    # Leaving out annotator i removes one match exactly when annotator i gave the prediction.
    total = sum(min(1.0, (matches - (ref == pred)) / 3.0) for ref in refs)
    return total / len(refs)


def aokvqa_direct_answer_accuracy(prediction: str, direct_answers: Sequence[str]) -> float:
    """A-OKVQA direct-answer score as its official evaluator computes it: min(1, #matches / 3).

    Unlike VQAv2 there is no leave-one-out averaging. Strings are VQA-normalised before comparing
    (the official script compares raw strings and expects predictions already normalised).
    """
    pred = normalize_vqa_answer(prediction)
    matches = sum(normalize_vqa_answer(a) == pred for a in direct_answers)
    return min(1.0, matches / 3.0)


def exact_match_accuracy(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 if the VQA-normalised prediction equals any normalised reference, else 0.0.

    For open-ended QA scored by string match (MSVD-QA, ActivityNet-QA, ClothoAQA).
    """
    refs = [answers] if isinstance(answers, str) else list(answers)
    pred = normalize_vqa_answer(prediction)
    return float(any(normalize_vqa_answer(a) == pred for a in refs))


# ---------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------

_POPE_NEGATIONS = frozenset({"No", "no", "not"})


def pope_yes_no(answer: str) -> str:
    """Map a free-text answer to "yes"/"no" by POPE's own rule.

    Keep the text before the first period, delete commas, split on single spaces; the answer is "no"
    if any word is exactly "No", "no" or "not", otherwise "yes" (so "NO", "Not" and "isn't" count as yes).
    """
    first_sentence = answer.split(".", 1)[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if any(w in _POPE_NEGATIONS for w in words) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float | int]:
    """POPE accuracy, precision, recall, F1 and yes-ratio, with "yes" as the positive class.

    Predictions are mapped by ``pope_yes_no``; a label is negative iff it reads "no". Where a ratio
    has a zero denominator it is reported as 0.0 (the official script raises instead).
    """
    if len(predictions) != len(labels):
        raise ValueError(f"pope_metrics: {len(predictions)} predictions but {len(labels)} labels")
    if not predictions:
        raise ValueError("pope_metrics needs at least one prediction")
    tp = fp = tn = fn = 0
    for pred, label in zip(predictions, labels):
        says_yes = pope_yes_no(pred) == "yes"
        is_yes = label.strip().lower() != "no"
        if says_yes and is_yes:
            tp += 1
        elif says_yes:
            fp += 1
        elif is_yes:
            fn += 1
        else:
            tn += 1
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / len(predictions),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / len(predictions),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }


# ---------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------

_BARE_LETTER = re.compile(r"[(\[]?([A-Za-z])[)\]]?[.:,]?")
# A stated answer; a lowercase letter only counts in brackets or at the very end ("answer is a dog" does not).
_STATED_LETTER = re.compile(
    r"(?i:answer|option|choice)\s*(?:(?i:is|would be|should be)\s*)?:?\s*(?:(?i:option|choice)\s*)?"
    r"(?:[(\[]([A-Za-z])[)\]]|([A-Z])(?![A-Za-z])|([a-z])(?=[.)]?\s*$))"
)
_LEADING_LETTER = re.compile(r"\(([A-Z])\)|\[([A-Z])\]|([A-Z])[.:)](?!\d)")
_STANDALONE_CAPITAL = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])")
_NEXT_WORD = re.compile(r" +([a-z]+)")
_NOT_AN_ARTICLE_AFTER = frozenset({"and", "or", "nor", "vs", "versus"})


def _plain_words(text: str) -> str:
    """Lowercase, punctuation to spaces, collapsed whitespace: for comparing option texts."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _letter_tokens(text: str, valid: set[str]) -> set[str]:
    """Capital option letters standing alone; an "A" followed by a lowercase word is read as an article."""
    found = set()
    for m in _STANDALONE_CAPITAL.finditer(text):
        letter = m.group(1)
        if letter not in valid:
            continue
        nxt = _NEXT_WORD.match(text, m.end())
        if letter == "A" and nxt and nxt.group(1) not in _NOT_AN_ARTICLE_AFTER:
            continue
        found.add(letter)
    return found


def _text_choice(text: str, options: Mapping[str, str]) -> str | None:
    """The one option whose text the prediction equals or contains (longer texts shadow their parts)."""
    pred = _plain_words(text)
    texts = {k: _plain_words(str(v)) for k, v in options.items() if _plain_words(str(v))}
    equal = [k for k, t in texts.items() if t == pred]
    if len(equal) == 1:
        return equal[0]
    found = [k for k, t in texts.items() if f" {t} " in f" {pred} "]
    found = [k for k in found if not any(k != o and texts[k] in texts[o] for o in found)]
    return found[0] if len(found) == 1 else None


def extract_choice(prediction: str, options: Mapping[str, str]) -> str | None:
    """The option letter a free-text answer picks, or None when it picks none or several.

    Tried in order: the whole answer is an option's letter ("B", "(b)", "C."), or else a lone letter is
    read as option text, as MMBench's matcher does ("I" among A "I", B "II", C "III" picks A); a stated
    answer ("Answer: C", "The answer is (D)", "option B"); a leading labelled letter ("B. a cat", "(C) dog");
    exactly one capital option letter standing alone; the option text itself (case- and
    punctuation-insensitive).
    """
    letters = {str(k).strip().upper(): k for k in options}
    text = prediction.strip()
    if not text:
        return None
    bare = _BARE_LETTER.fullmatch(text)
    if bare and bare.group(1).upper() in letters:
        return letters[bare.group(1).upper()]
    if bare:  # a lone letter that labels no option may be an option's text ("I" among "I", "II", "III")
        return _text_choice(text, options)
    stated = {next(g for g in m.groups() if g).upper() for m in _STATED_LETTER.finditer(text)} & letters.keys()
    if len(stated) == 1:
        return letters[stated.pop()]
    if len(stated) > 1:
        return None
    leading = _LEADING_LETTER.match(text)
    if leading:
        letter = next(g for g in leading.groups() if g)
        if letter in letters:
            return letters[letter]
    standalone = _letter_tokens(text, set(letters))
    if len(standalone) == 1:
        return letters[standalone.pop()]
    if len(standalone) > 1:
        return None
    return _text_choice(text, options)


def _answer_letter(answer: str, options: Mapping[str, str]) -> str:
    """A ground-truth answer given as a letter or as option text, as its option letter."""
    key = answer.strip()
    if key in options:
        return key
    for k, v in options.items():
        if _plain_words(str(v)) == _plain_words(key):
            return k
    raise ValueError(f"answer {answer!r} is neither an option letter nor an option text of {dict(options)}")


def multiple_choice_accuracy(
    predictions: Sequence[str], options_list: Sequence[Mapping[str, str]], answers: Sequence[str]
) -> float:
    """Fraction of questions whose extracted choice is the answer; no extractable choice counts as wrong."""
    if not len(predictions) == len(options_list) == len(answers):
        raise ValueError(
            f"multiple_choice_accuracy: {len(predictions)} predictions, {len(options_list)} option sets, "
            f"{len(answers)} answers"
        )
    if not predictions:
        raise ValueError("multiple_choice_accuracy needs at least one prediction")
    hits = sum(
        extract_choice(pred, opts) == _answer_letter(ans, opts)
        for pred, opts, ans in zip(predictions, options_list, answers)
    )
    return hits / len(predictions)


# ---------------------------------------------------------------------------
# MMBench CircularEval
# ---------------------------------------------------------------------------

MMBENCH_COPY_STRIDE = 1_000_000
_OPTION_COLUMNS = [chr(c) for c in range(ord("A"), ord("Z") + 1)]


def _options_of(record: Mapping[str, Any]) -> dict[str, str]:
    """A record's options: its ``options`` dict, or MMBench's per-letter columns (A, B, ...)."""
    if "options" in record:
        return dict(record["options"])
    opts = {}
    for letter in _OPTION_COLUMNS:
        value = record.get(letter)
        if value is None or value != value:  # absent, None or NaN (empty TSV cell)
            break
        opts[letter] = value
    if not opts:
        raise ValueError(f"record {record.get('index')!r} has neither 'options' nor option columns A, B, ...")
    return opts


def circular_shifts(question: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The CircularEval copies of one question: options rotated one step per copy, answer relabelled.

    Copy k shows original option (i + k) mod n at letter i (ABCD, BCDA, CDAB, DABC) and gets index
    ``index + k * 1_000_000``, so ``index % 1_000_000`` groups the copies. Copy 0 is the original.
    """
    index = int(question["index"])
    if not 0 <= index < MMBENCH_COPY_STRIDE:
        raise ValueError(f"question index {index} must be in [0, {MMBENCH_COPY_STRIDE}) to group its copies")
    options = _options_of(question)
    letters = list(options)
    texts = [options[k] for k in letters]
    n = len(letters)
    answer_pos = letters.index(_answer_letter(question["answer"], options))
    copies = []
    for k in range(n):
        rotated = {letters[i]: texts[(i + k) % n] for i in range(n)}
        copy = dict(question)
        copy["index"] = index + k * MMBENCH_COPY_STRIDE
        copy["answer"] = letters[(answer_pos - k) % n]
        if "options" in question:
            copy["options"] = rotated
        else:
            copy.update(rotated)
        copies.append(copy)
    return copies


def mmbench_circular_accuracy(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """MMBench CircularEval: a question scores only if every one of its circular copies is answered right.

    Copies are grouped by ``index % 1_000_000``; a group's category is that of its original copy
    (the one whose index is below 1,000,000), or of its first record if the original is absent.
    Returns ``accuracy`` (circular), ``vanilla_accuracy`` (original copies alone), ``num_questions``
    and ``per_category`` (circular accuracy per ``category``, when records carry one).
    """
    if not records:
        raise ValueError("mmbench_circular_accuracy needs at least one record")
    groups: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for rec in records:
        groups[int(rec["index"]) % MMBENCH_COPY_STRIDE].append(rec)

    def is_hit(rec: Mapping[str, Any]) -> bool:
        opts = _options_of(rec)
        return extract_choice(str(rec["prediction"]), opts) == _answer_letter(str(rec["answer"]), opts)

    circular_hits: dict[int, bool] = {}
    vanilla_hits: list[bool] = []
    category_hits: dict[str, list[bool]] = defaultdict(list)
    for group_id, recs in groups.items():
        hit = all(is_hit(r) for r in recs)
        circular_hits[group_id] = hit
        original = next((r for r in recs if int(r["index"]) == group_id), None)
        if original is not None:
            vanilla_hits.append(is_hit(original))
        category = (original or recs[0]).get("category")
        if category is not None:
            category_hits[str(category)].append(hit)
    result: dict[str, Any] = {
        "accuracy": sum(circular_hits.values()) / len(circular_hits),
        "num_questions": len(circular_hits),
    }
    if vanilla_hits:
        result["vanilla_accuracy"] = sum(vanilla_hits) / len(vanilla_hits)
    if category_hits:
        result["per_category"] = {c: sum(h) / len(h) for c, h in sorted(category_hits.items())}
    return result


# ---------------------------------------------------------------------------
# Captioning (COCO caption evaluation through pycocoevalcap)
# ---------------------------------------------------------------------------


def _simple_tokenize(captions: Mapping[str, list[str]]) -> dict[str, list[str]]:
    return {k: [_plain_words(c) for c in caps] for k, caps in captions.items()}


def _ptb_tokenize(captions: Mapping[str, list[str]]) -> dict[str, list[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({k: [{"caption": c} for c in caps] for k, caps in captions.items()})


def caption_metrics(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    *,
    tokenizer: Literal["auto", "ptb", "simple"] = "auto",
    meteor: bool = True,
) -> dict[str, float | str]:
    """Corpus-level BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D) of one caption per id against its references.

    Scores come from ``pycocoevalcap`` exactly as the COCO caption evaluation computes them (BLEU with
    the "closest" reference length, CIDEr-D with document frequencies taken from the references, so
    it needs at least two ids to be non-zero). Tokenisation: "ptb" is the COCO default (Stanford PTB
    tokenizer, needs Java), "simple" lowercases and turns punctuation into spaces, "auto" uses PTB when
    Java is available and falls back otherwise. METEOR also needs Java; without it METEOR is left
    out and the reason is given under "notes". SPICE is not offered: it needs Stanford CoreNLP
    models that are downloaded on first use. The result also names the tokenizer used.
    """
    if set(predictions) != set(references):
        missing = sorted(set(predictions) ^ set(references), key=str)[:5]
        raise ValueError(f"caption_metrics: predictions and references cover different ids, e.g. {missing}")
    if not predictions:
        raise ValueError("caption_metrics needs at least one prediction")
    empty = [k for k, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"caption_metrics: no reference captions for ids {sorted(empty, key=str)[:5]}")

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    java = shutil.which("java") is not None
    notes = []
    used = "ptb" if tokenizer == "ptb" or (tokenizer == "auto" and java) else "simple"
    if tokenizer == "ptb" and not java:
        raise RuntimeError("the PTB tokenizer needs Java, which was not found on PATH")
    res_raw = {k: [v] for k, v in predictions.items()}
    gts_raw = {k: list(v) for k, v in references.items()}
    if used == "ptb":
        try:
            res, gts = _ptb_tokenize(res_raw), _ptb_tokenize(gts_raw)
        except OSError as err:
            if tokenizer == "ptb":
                raise
            notes.append(f"PTB tokenizer failed ({err}); used simple tokenisation")
            used = "simple"
    if used == "simple":
        res, gts = _simple_tokenize(res_raw), _simple_tokenize(gts_raw)

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores: dict[str, float | str] = {f"BLEU-{n}": float(b) for n, b in enumerate(bleu, start=1)}
    if meteor and java:
        from pycocoevalcap.meteor.meteor import Meteor

        try:
            scores["METEOR"] = float(Meteor().compute_score(gts, res)[0])
        except (OSError, ValueError) as err:
            notes.append(f"METEOR failed: {err}")
    elif meteor:
        notes.append("METEOR skipped: Java not found")
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    scores["tokenizer"] = used
    if notes:
        scores["notes"] = "; ".join(notes)
    return scores


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------


def _flatten(values: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows.extend(_flatten(value, prefix=f"{name}."))
        else:
            rows.append((name, value))
    return rows


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{100 * value:.2f}"


def summarize(metrics: Mapping[str, Mapping[str, Any]]) -> str:
    """A plain-text table (task, metric, value) of per-task metric dicts; floats are shown x100."""
    rows = [(task, name, _format_value(v)) for task, values in metrics.items() for name, v in _flatten(values)]
    header = ("task", "metric", "value (x100)")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), line]
    out += ["  ".join((r[0].ljust(widths[0]), r[1].ljust(widths[1]), r[2].rjust(widths[2]))) for r in rows]
    return "\n".join(out)
