"""Eval tasks: records in each benchmark's format become the right prompts, references and scores."""

from __future__ import annotations

import pytest

from Uni_MoE.eval.tasks import (
    LETTER_ANSWER,
    TaskError,
    TaskOptions,
    answer_letter,
    get_task,
    load_annotations,
    options_of,
)

NO_OPTIONS = TaskOptions()


def _human(item) -> str:
    return item.record["conversations"][0]["value"]


def test_data_types_and_aliases_resolve():
    assert get_task("clothov2").name == "clothov2"
    assert get_task("clothov2").settings == get_task("clothov1").settings
    assert get_task("ActivityNet-QA").prepare is get_task("msvd").prepare
    assert get_task("mmbench_audio").score is get_task("mmbench").score
    with pytest.raises(KeyError, match="unknown --data_type 'imagenet'.*aokvqa"):
        get_task("imagenet")


def test_decoding_follows_the_original_per_type():
    assert get_task("vqa").settings.do_sample is False and get_task("vqa").settings.max_new_tokens == 512
    caption = get_task("clothov1").settings
    assert (caption.num_beams, caption.min_new_tokens, caption.do_sample) == (5, 10, True)
    assert get_task("msvd").settings.temperature == 0.2 and get_task("msvd").settings.do_sample


def test_option_formats():
    assert options_of({"choices": ["x", "y"]}) == {"A": "x", "B": "y"}
    assert options_of({"choice_a": "p", "choice_b": "q", "choice_c": "r"}) == {"A": "p", "B": "q", "C": "r"}
    assert options_of({"A": "1", "B": "2", "C": float("nan")}) == {"A": "1", "B": "2"}
    text = {"text": "Q?\nOptions:\nA.red\nB.blue\nAnswer the question using a single word or phrase."}
    assert options_of(text) == {"A": "red", "B": "blue"}
    opts = {"A": "red", "B": "blue"}
    assert answer_letter({"answer": ["B"]}, opts) == "B"
    assert answer_letter({"answer": "blue"}, opts) == "B"
    assert answer_letter({"gt": 0}, opts) == "A"
    assert answer_letter({"correct_choice_idx": 1}, opts) == "B"


def test_seedbench_prompt_lists_options_and_scores_letters():
    task = get_task("seedbench")
    rec = {"question_id": 1, "image": "a.png", "question": "Which shape?", "choice_a": "circle",
           "choice_b": "square", "answer": "B", "question_type_id": 3}
    (item,) = task.prepare(rec, 0, NO_OPTIONS)
    assert _human(item) == f"Which shape?\nA. circle\nB. square\n{LETTER_ANSWER}"
    metrics, hits = task.score([item, item, item], ["B", "The answer is A.", "square"], NO_OPTIONS)
    assert hits == [True, False, True] and metrics["accuracy"] == pytest.approx(2 / 3)


def test_mmbench_circular_rotations_rewrite_the_option_lines():
    task = get_task("mmbench")
    text = "Look at the image.\nWhat colour?\nOptions:\nA.red\nB.blue\nC.green\nAnswer briefly."
    rec = {"id": "MMBench1.1-7", "image": ["7.jpg"], "category": ["colour"], "answer": ["C"],
           "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": ""}]}
    items = task.prepare(rec, 0, NO_OPTIONS)
    assert [it.reference for it in items] == ["C", "B", "A"]
    assert "A.blue\nB.green\nC.red\nAnswer briefly." in _human(items[1])
    assert [it.meta["index"] % 1_000_000 for it in items] == [7, 7, 7]  # copies: index + k * 1e6
    metrics, _ = task.score(items, ["C", "B", "green"], NO_OPTIONS)
    assert metrics["accuracy"] == 1.0
    metrics, _ = task.score(items, ["C", "B", "B"], NO_OPTIONS)
    assert metrics["accuracy"] == 0.0 and metrics["vanilla_accuracy"] == 1.0
    assert len(task.prepare(rec, 0, TaskOptions(circular=False))) == 1


def test_mmbench_without_answer_names_the_record():
    rec = {"id": "MMBench1.1-9", "options": ["a", "b"], "question": "Q?"}
    with pytest.raises(TaskError, match="MMBench1.1-9.*no answer letter"):
        get_task("mmbench").prepare(rec, 0, NO_OPTIONS)


def test_vqa_references_from_an_annotation_file():
    options = TaskOptions(annotations=load_annotations(
        {"annotations": [{"question_id": 5, "answers": [{"answer": "red"}] * 3 + [{"answer": "blue"}] * 7}]}))
    task = get_task("vqa")
    (item,) = task.prepare({"question_id": 5, "text": "What colour?\nAnswer briefly."}, 0, options)
    assert item.reference[:3] == ["red", "red", "red"]
    metrics, hits = task.score([item, item], ["Red.", "blue"], options)
    # leave-one-out over 10 humans: 3 "red" give min(2/3, 1) three times and 1 seven times
    assert hits[0] == pytest.approx(0.9) and hits[1] == pytest.approx(1.0)
    metrics, hits = task.score([item], ["green"], options)
    assert metrics["accuracy"] == 0.0


def test_aokvqa_gives_direct_answer_and_multiple_choice_items():
    rec = {"question_id": "q", "text": "What is it?\nAnswer the question using a single word or phrase.",
           "gt": ["cat"] * 10, "choices": ["dog", "cat"], "correct_choice_idx": 1}
    task = get_task("aokvqa")
    direct, mc = task.prepare(rec, 0, NO_OPTIONS)
    assert _human(direct).startswith("What is it?\nAnswer the question using")
    assert _human(mc) == f"What is it?\nA. dog\nB. cat\n{LETTER_ANSWER}"
    metrics, _ = task.score([direct, mc], ["cat", "A"], NO_OPTIONS)
    assert metrics["direct_answer"]["accuracy"] == 1.0 and metrics["multiple_choice"]["accuracy"] == 0.0


def test_pope_scores_yes_no_readings():
    task = get_task("pope")
    recs = [{"question_id": i, "text": "Is there a cat?", "label": lab, "category": "random"}
            for i, lab in enumerate(["yes", "no", "yes", "no"])]
    items = [task.prepare(r, i, NO_OPTIONS)[0] for i, r in enumerate(recs)]
    metrics, hits = task.score(items, ["Yes, there is.", "No.", "no", "yes"], NO_OPTIONS)
    assert hits == [1.0, 1.0, 0.0, 0.0]
    assert metrics["accuracy"] == 0.5 and metrics["precision"] == 0.5 and metrics["recall"] == 0.5


def test_clothoaqa_splits_yes_no_and_open_questions():
    task = get_task("clothoaqa")
    recs = [{"id": "a", "question": "Is it rain?", "answer": "yes"},
            {"id": "b", "question": "What?", "answer": "a dog"}]
    items = [task.prepare(r, i, NO_OPTIONS)[0] for i, r in enumerate(recs)]
    metrics, hits = task.score(items, ["Yes it is", "A dog."], NO_OPTIONS)
    assert hits == [1.0, 1.0]
    assert metrics["per_category"] == {"open": 1.0, "yes_no": 1.0}


def test_mmvet_writes_the_judge_input():
    task = get_task("mmvet")
    items = task.prepare({"id": "v1_3", "text": "What is x?", "gt": "3"}, 0, NO_OPTIONS)
    _, build = task.side_output
    assert build(items, ["x is 3"]) == {"v1_3": "x is 3"}


def test_record_without_a_question_is_named():
    with pytest.raises(TaskError, match="record 77"):
        get_task("msvd").prepare({"question_id": 77, "video": "v.mp4"}, 0, NO_OPTIONS)
