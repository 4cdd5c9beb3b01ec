"""Benchmark metrics against values worked out by hand from each benchmark's definition."""

import shutil

import pytest

from Uni_MoE.eval import metrics
from Uni_MoE.eval.metrics import (
    aokvqa_direct_answer_accuracy,
    caption_metrics,
    circular_shifts,
    exact_match_accuracy,
    extract_choice,
    mmbench_circular_accuracy,
    multiple_choice_accuracy,
    normalize_vqa_answer,
    pope_metrics,
    pope_yes_no,
    summarize,
    vqa_soft_accuracy,
)

HAS_JAVA = shutil.which("java") is not None


# --- VQA normalisation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("two", "2"),  # number word -> digit
        ("none", "0"),  # the official map also sends "none" to 0
        ("a dog", "dog"),  # article dropped
        ("The Cat!", "cat"),  # "!" touches no space -> becomes a space; "the" dropped
        ("Yes.", "yes"),  # period not followed by a digit is removed
        ("it is 5.", "it is 5"),
        ("3.5", "3.5"),  # period before a digit is kept
        ("dont", "don't"),  # contraction restored
        ("couldnt've", "couldn't've"),  # one of two apostrophes missing
        ("couldntve", "couldntve"),  # both missing: not in the official table
        ("whats", "what's"),
        ("man's", "man's"),  # apostrophes are not punctuation for VQA
        ("1,000", "1000"),  # digit-comma-digit: every mark is deleted, not spaced
        ("1,000 (approx)", "1000 approx"),  # ...including the brackets elsewhere in the text
        ("hello, world", "hello world"),  # "," followed by a space -> deleted
        ("red-white", "red white"),  # "-" touching no space -> space
        ("black - white", "black white"),
        ("\tyes\n", "yes"),  # tabs/newlines
        ("  Two  Dogs ", "2 dogs"),
    ],
)
def test_normalize_vqa_answer(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_normalize_evalai_variant_splits_possessive_and_drops_commas():
    # EvalAI pre-step: lowercase, delete "," and "?", "'s" -> " 's"; then the VQA steps.
    assert normalize_vqa_answer("Man's hat?", evalai_tokenize=True) == "man 's hat"
    assert normalize_vqa_answer("1,000", evalai_tokenize=True) == "1000"


# --- VQA soft accuracy --------------------------------------------------------------------------


def _answers(n_match: int, match: str = "2", other: str = "3") -> list[str]:
    return [match] * n_match + [other] * (10 - n_match)


@pytest.mark.parametrize(
    ("n_match", "expected"),
    [
        # Leave annotator i out, score min(1, matches among the other 9 / 3), average over the 10.
        (0, 0.0),
        # 1 match: its own subset has 0 -> 0; the 9 others have 1 -> 1/3. (0 + 9/3) / 10 = 0.3
        (1, 0.3),
        # 2 matches: their subsets have 1 -> 1/3 each; 8 others have 2 -> 2/3. (2/3 + 16/3) / 10 = 0.6
        (2, 0.6),
        # 3 matches: their subsets have 2 -> 2/3; 7 others have 3 -> 1. (3 * 2/3 + 7) / 10 = 0.9
        (3, 0.9),
        # 4 matches: their subsets have 3 -> 1; the others have 4 -> 1. 10 / 10 = 1
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_vqa_soft_accuracy_leave_one_out(n_match, expected):
    assert vqa_soft_accuracy("two", _answers(n_match)) == pytest.approx(expected)


def test_vqa_soft_accuracy_normalises_references():
    # "Two", "2 " and "two." all normalise to "2": 3 matches -> 0.9 as above.
    answers = ["Two", "2 ", "two."] + ["3"] * 7
    assert vqa_soft_accuracy("2", answers) == pytest.approx(0.9)


def test_vqa_soft_accuracy_other_answer_counts():
    # 5 direct answers, 2 match: matching subsets have 1 -> 1/3; 3 others have 2 -> 2/3.
    # (2 * 1/3 + 3 * 2/3) / 5 = (8/3) / 5 = 8/15
    assert vqa_soft_accuracy("cat", ["cat", "cat", "dog", "dog", "dog"]) == pytest.approx(8 / 15)
    assert vqa_soft_accuracy("A cat.", ["cat"]) == 1.0
    with pytest.raises(ValueError):
        vqa_soft_accuracy("cat", [])


def test_aokvqa_direct_answer_has_no_leave_one_out():
    # A-OKVQA: min(1, matches / 3) over the 10 direct answers: 2 matches -> 2/3, 3 -> 1.
    assert aokvqa_direct_answer_accuracy("dog", ["dog"] * 2 + ["cat"] * 8) == pytest.approx(2 / 3)
    assert aokvqa_direct_answer_accuracy("dog", ["dog"] * 3 + ["cat"] * 7) == 1.0


def test_exact_match_accuracy():
    assert exact_match_accuracy("Two.", ["2"]) == 1.0
    assert exact_match_accuracy("a dog", "dog") == 1.0
    assert exact_match_accuracy("cat", ["dog", "bird"]) == 0.0


# --- POPE ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Yes, there is a dog.", "yes"),
        ("No, there is not.", "no"),  # "No," -> comma deleted -> "No"
        ("There is no cat in the image.", "no"),
        ("Not at all", "yes"),  # only "No", "no", "not" count
        ("NO", "yes"),
        ("There isn't a dog", "yes"),
        ("I see a cat. There is no dog", "yes"),  # only the first sentence is read
    ],
)
def test_pope_yes_no_follows_official_rule(answer, expected):
    assert pope_yes_no(answer) == expected


def test_pope_metrics_hand_computed():
    predictions = [
        "Yes, there is a dog.",  # yes, label yes -> TP
        "No, there is not.",  # no,  label no  -> TN
        "There is no cat.",  # no,  label yes -> FN
        "yes",  # yes, label no  -> FP
        "Not at all",  # yes, label no  -> FP
        "I see a cat. There is no dog",  # yes, label yes -> TP
    ]
    labels = ["yes", "no", "yes", "no", "no", "yes"]
    m = pope_metrics(predictions, labels)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 2, 1, 1)
    assert m["accuracy"] == pytest.approx(3 / 6)  # (TP + TN) / 6
    assert m["precision"] == pytest.approx(2 / 4)  # TP / (TP + FP)
    assert m["recall"] == pytest.approx(2 / 3)  # TP / (TP + FN)
    # F1 = 2 * 1/2 * 2/3 / (1/2 + 2/3) = (2/3) / (7/6) = 4/7
    assert m["f1"] == pytest.approx(4 / 7)
    assert m["yes_ratio"] == pytest.approx(4 / 6)  # 4 of 6 answers read as yes


def test_pope_metrics_degenerate_and_bad_input():
    m = pope_metrics(["no", "no"], ["no", "no"])  # no positive predictions at all
    assert m["accuracy"] == 1.0 and m["precision"] == 0.0 and m["f1"] == 0.0
    with pytest.raises(ValueError):
        pope_metrics(["yes"], ["yes", "no"])


# --- multiple choice ----------------------------------------------------------------------------

OPTIONS = {"A": "a dog", "B": "cat", "C": "black cat", "D": "fish"}


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("A", "A"),
        ("(B)", "B"),
        ("B.", "B"),
        ("b", "B"),
        ("Answer: C", "C"),
        ("The answer is D", "D"),
        ("The answer is D.", "D"),
        ("the answer is (b)", "B"),
        ("The correct option is B, a cat.", "B"),
        ("Option B", "B"),
        ("B. cat", "B"),
        ("(C) black cat", "C"),
        ("D: fish", "D"),
        ("I think it is C because of the fur.", "C"),
        ("I'm sure it is D", "D"),
        ("It is A", "A"),
        ("A cat is on the sofa.", "B"),  # leading "A" is an article; text "cat" picks B
        ("Cat", "B"),  # option text, case-insensitive
        ("There is a black cat.", "C"),  # "black cat" shadows its part "cat"
        ("The answer is a dog", "A"),  # lowercase "a" before a word is not a letter
        ("A or B", None),  # ambiguous
        ("Maybe A, maybe B", None),
        ("Answer: A. Actually the answer is B", None),
        ("The answer is E", None),  # not an option
        ("hmm", None),
        ("", None),
    ],
)
def test_extract_choice(prediction, expected):
    assert extract_choice(prediction, OPTIONS) == expected


@pytest.mark.parametrize("prediction, expected", [("I", "A"), ("(I)", "A"), ("II", "B"), ("III.", "C"), ("V", None)])
def test_lone_letter_that_is_an_option_text(prediction, expected):
    """MMBench's matcher: a reply naming no option letter is matched by option text ("i" is in "i" only)."""
    assert extract_choice(prediction, {"A": "I", "B": "II", "C": "III"}) == expected


def test_multiple_choice_accuracy():
    options = [OPTIONS, OPTIONS, {"A": "red", "B": "blue"}, {"A": "yes", "B": "no"}]
    predictions = ["B", "The answer is D", "blue", "I cannot tell"]
    answers = ["B", "C", "blue", "A"]  # an answer may also be given as the option text
    # right, wrong, right, unextractable -> 2 / 4
    assert multiple_choice_accuracy(predictions, options, answers) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        multiple_choice_accuracy(["A"], [OPTIONS], ["zebra"])


# --- MMBench CircularEval -----------------------------------------------------------------------


def test_circular_shifts_rotate_options_and_relabel_answer():
    q = {"index": 7, "question": "Which animal?", "options": {"A": "cat", "B": "dog", "C": "bird", "D": "fish"},
         "answer": "B", "category": "cp"}
    copies = circular_shifts(q)
    assert [c["index"] for c in copies] == [7, 1_000_007, 2_000_007, 3_000_007]
    assert copies[0]["options"] == q["options"] and copies[0]["answer"] == "B"
    # ABCD -> BCDA: "dog" moves from B to A
    assert copies[1]["options"] == {"A": "dog", "B": "bird", "C": "fish", "D": "cat"}
    assert copies[1]["answer"] == "A"
    assert copies[2]["options"] == {"A": "bird", "B": "fish", "C": "cat", "D": "dog"}
    assert copies[2]["answer"] == "D"
    assert copies[3]["options"] == {"A": "fish", "B": "cat", "C": "dog", "D": "bird"}
    assert copies[3]["answer"] == "C"
    assert all(c["options"][c["answer"]] == "dog" for c in copies)
    assert all(c["question"] == q["question"] and c["category"] == "cp" for c in copies)


def test_circular_shifts_mmbench_letter_columns():
    q = {"index": 3, "A": "x", "B": "y", "C": None, "answer": "A"}  # MMBench TSV: empty cells end the options
    copies = circular_shifts(q)
    assert len(copies) == 2
    assert (copies[1]["A"], copies[1]["B"], copies[1]["answer"]) == ("y", "x", "B")


def test_mmbench_circular_accuracy_needs_every_copy_right():
    q1 = {"index": 1, "options": {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}, "answer": "C", "category": "cp"}
    q2 = {"index": 2, "options": {"A": "red", "B": "green", "C": "blue", "D": "white"}, "answer": "A", "category": "lr"}
    records = []
    for copy in circular_shifts(q1):  # right in all 4 copies, answered once by text, else by letter
        pred = copy["options"][copy["answer"]] if copy["index"] == 1 else f"The answer is {copy['answer']}."
        records.append({**copy, "prediction": pred})
    for copy in circular_shifts(q2):  # right in 3 of 4 copies: the third copy gets a wrong letter
        wrong = "B" if copy["answer"] != "B" else "C"
        records.append({**copy, "prediction": wrong if copy["index"] == 2_000_002 else copy["answer"]})
    result = mmbench_circular_accuracy(records)
    assert result["num_questions"] == 2
    assert result["accuracy"] == pytest.approx(1 / 2)  # q1 counts, q2 does not
    assert result["vanilla_accuracy"] == pytest.approx(1.0)  # both originals (copy 0) are right
    assert result["per_category"] == {"cp": 1.0, "lr": 0.0}


# --- captioning ---------------------------------------------------------------------------------

REFS = {
    "1": ["a man is riding a horse on the beach"],
    "2": ["two dogs play with a red ball in the park"],
    "3": ["a plate of food with rice and vegetables"],
}


def test_caption_identical_and_unrelated():
    same = caption_metrics({k: v[0] for k, v in REFS.items()}, REFS, tokenizer="simple", meteor=False)
    assert same["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert same["ROUGE-L"] == pytest.approx(1.0)
    unrelated = {"1": "zebra giraffe elephant walking", "2": "computer keyboard monitor desk", "3": "snowy peaks"}
    other = caption_metrics(unrelated, REFS, tokenizer="simple", meteor=False)
    assert other["BLEU-4"] < 1e-6 and other["CIDEr"] == pytest.approx(0.0)
    assert same["tokenizer"] == "simple"


def test_caption_cider_ordering():
    partial = {"1": "a man riding a horse", "2": "two dogs in the park", "3": "a plate of rice"}
    unrelated = {"1": "a red bus", "2": "a kitchen sink", "3": "two men"}
    exact = {k: v[0] for k, v in REFS.items()}
    cider = [caption_metrics(p, REFS, tokenizer="simple", meteor=False)["CIDEr"] for p in (exact, partial, unrelated)]
    assert cider[0] > cider[1] > cider[2]


def test_caption_bleu_hand_computed():
    # hyp "the cat sat on the mat", ref "the cat is on the mat", both 6 words -> brevity penalty 1.
    # unigrams: the x2 (ref has 2), cat, on, mat match; sat does not -> p1 = 5/6
    # bigrams: "the cat", "on the", "the mat" of 5 -> p2 = 3/5;  trigrams: "on the mat" of 4 -> p3 = 1/4
    # BLEU-1 = 5/6; BLEU-2 = sqrt(5/6 * 3/5) = sqrt(1/2); BLEU-3 = (5/6 * 3/5 * 1/4)^(1/3) = (1/8)^(1/3) = 1/2
    m = caption_metrics({"x": "The cat sat on the mat."}, {"x": ["the cat is on the mat"]}, tokenizer="simple",
                        meteor=False)
    assert m["BLEU-1"] == pytest.approx(5 / 6, rel=1e-6)
    assert m["BLEU-2"] == pytest.approx(0.5**0.5, rel=1e-6)
    assert m["BLEU-3"] == pytest.approx(0.5, rel=1e-6)


@pytest.mark.skipif(not HAS_JAVA, reason="the PTB tokenizer needs Java")
def test_caption_ptb_tokenizer_strips_punctuation():
    m = caption_metrics({"x": "The cat sat on the mat."}, {"x": ["the cat is on the mat"]}, tokenizer="ptb",
                        meteor=False)
    assert m["tokenizer"] == "ptb"
    assert m["BLEU-1"] == pytest.approx(5 / 6, rel=1e-6)


def test_caption_without_java_skips_meteor(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    m = caption_metrics({k: v[0] for k, v in REFS.items()}, REFS)
    assert "METEOR" not in m and "Java" in m["notes"]
    assert m["tokenizer"] == "simple"


def test_caption_rejects_mismatched_ids():
    with pytest.raises(ValueError, match="different ids"):
        caption_metrics({"1": "a cat"}, {"2": ["a cat"]}, tokenizer="simple")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_JAVA, reason="METEOR needs Java")
def test_caption_meteor():
    # Identical captions: every word aligned in one chunk, so only a tiny fragmentation penalty remains.
    same = caption_metrics({k: v[0] for k, v in REFS.items()}, REFS)
    assert same["METEOR"] > 0.9


# --- report -------------------------------------------------------------------------------------


def test_summarize_table():
    table = summarize({"pope": {"f1": 0.8543, "tp": 12}, "mmbench": {"accuracy": 0.5, "per_category": {"cp": 1.0}}})
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["task", "metric"]
    assert any(line.split() == ["pope", "f1", "85.43"] for line in lines)
    assert any(line.split() == ["pope", "tp", "12"] for line in lines)
    assert any(line.split() == ["mmbench", "per_category.cp", "100.00"] for line in lines)
