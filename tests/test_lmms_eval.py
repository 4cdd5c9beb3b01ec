"""The lmms-eval plug-in: request handling here, and lmms-eval's own CLI on the repository's sample tasks,
its scores checked against our eval (generation) and a log-likelihood computed through the training path
(multiple choice)."""

import glob
import json
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import load_file
from PIL import Image

from Uni_MoE.checkpoint.loader import load_model
from Uni_MoE.checkpoint.tiny import build_tiny
from Uni_MoE.data.collate import collate
from Uni_MoE.data.conversation import IGNORE_INDEX, SYSTEM
from Uni_MoE.data.dataset import UniMoEDataset
from Uni_MoE.data.schema import parse_sample
from Uni_MoE.eval.runner import EvalConfig, run_eval
from Uni_MoE.integrations.lmms_inputs import continuation_logprobs, encode_prompts, sort_media, user_prompt
from Uni_MoE.processing_uni_moe import UniMoEProcessor
from Uni_MoE.serve.generate import video_frames_or_file

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "Uni_MoE" / "integrations" / "lmms_tasks"
DATA = REPO / "data_sample"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny(tmp_path_factory.mktemp("tiny") / "tiny")
    model, tokenizer = load_model(path, "cpu", "float32")
    return path, model, tokenizer, UniMoEProcessor.from_config(model.config, tokenizer)


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS / f"{name}.jsonl").read_text().splitlines()]


def _record(row: dict, answer: str = "") -> dict:
    """The task row as our eval's record: the question, media by schema key, an answer turn."""
    record = {"id": row["id"], "task": row["task"], "answer": row["answer"],
              "conversations": [{"from": "human", "value": row["question"]}, {"from": "gpt", "value": answer}]}
    if "image" in row:
        record["image"] = str(DATA / row["image"])
    if "audio" in row:
        record["voice"] = [str(DATA / row["audio"])]
    if "video" in row:
        record["video"] = video_frames_or_file(DATA / row["video"])
    return record


def test_media_are_sorted_by_what_lmms_eval_hands_over(tmp_path):
    (tmp_path / "frames").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "frames" / "0.png")
    img, sound = Image.new("RGB", (4, 4)), {"array": np.zeros(160, np.float32), "sampling_rate": 16000}
    media = sort_media([[img], sound, "x.mp4"])
    assert media == {"image": [img], "video": ["x.mp4"], "voice": [sound]}
    assert sort_media([str(tmp_path / "frames"), "talk.wav", "pic.jpg"]) == {
        "image": ["pic.jpg"], "video": [[str(tmp_path / "frames" / "0.png")]], "voice": ["talk.wav"]}
    with pytest.raises(ValueError, match="visual 0: cannot tell the modality of 'notes.txt'"):
        sort_media(["notes.txt"])
    with pytest.raises(ValueError, match="2 videos"):
        sort_media(["a.mp4", "b.mp4"])


def test_prompt_is_the_one_our_eval_builds(tiny):
    _, model, _, processor = tiny
    media = {"image": [Image.new("RGB", (4, 4))], "video": [], "voice": [{"array": np.zeros(16000)}]}
    prompt, items = user_prompt(processor, "What is it?", media, "speech")
    ours = parse_sample({"image": "a.png", "voice": ["b.wav"], "conversations": [
        {"from": "human", "value": "What is it?"}]}, 0, "speech")
    assert prompt == f"{SYSTEM} USER: {ours.conversations[0]['value']} ASSISTANT:"
    assert prompt.count("<image>") == prompt.count("<speech>") == 1 and "<audio>" not in prompt
    assert items["speech"] == media["voice"] and items["audio"] == []
    as_sound, items = user_prompt(processor, "<audio> what?", media, "audio")
    assert as_sound.count("<audio>") == 1 and items["audio"] == media["voice"]


def test_continuation_logprobs_match_the_training_labels(tiny):
    """Summed log-probabilities of answers after a prompt equal those of the same answers as training
    targets (the dataset's labels), batch of mixed lengths and media."""
    _, model, tokenizer, processor = tiny
    rows = _rows("sample_video_mc")[:2] + _rows("sample_image")[:1]
    answers = ["red", "green", "circle"]
    batch = encode_prompts(processor, [r["question"] for r in rows],
                           [[Image.open(DATA / r["image"])] if "image" in r else [str(DATA / r["video"])]
                            for r in rows], "speech", padding_side="right")
    got = continuation_logprobs(model, batch, [tokenizer(" " + a, add_special_tokens=False)["input_ids"]
                                               for a in answers], tokenizer.pad_token_id)
    expected = _label_logprobs(model, tokenizer, [_record(r, a) for r, a in zip(rows, answers)])
    np.testing.assert_allclose([lp for lp, _ in got], expected, rtol=1e-5, atol=1e-4)


def _label_logprobs(model, tokenizer, records: list[dict]) -> list[float]:
    """Sum of log p(answer token) over each record's answer tokens (its ``</s>`` left out), one record at a
    time through the training dataset: an oracle that shares no code with the plug-in's batching."""
    samples = [parse_sample(r, i, model.config.voice_modality) for i, r in enumerate(records)]
    dataset = UniMoEDataset(samples, tokenizer, model.config)
    out = []
    for i in range(len(dataset)):
        batch = collate([dataset[i]], tokenizer.pad_token_id)
        labels = batch.pop("labels")[0]
        for key in ("modality", "sample_index"):
            batch.pop(key)
        with torch.inference_mode():
            logprobs = torch.log_softmax(model(**batch).logits[0].float(), -1)
        positions = (labels != IGNORE_INDEX).nonzero().flatten()[:-1]  # drop the </s> target
        out.append(float(sum(logprobs[p - 1, labels[p]] for p in positions)))
    return out


def _lmms_eval_available() -> bool:
    if os.environ.get("CI"):
        return True  # CI installs it (scripts/test.sh): a missing install must fail, not skip
    try:
        import lmms_eval  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _lmms_eval_available(), reason="lmms-eval is not installed (pip install -e .[lmms])")
def test_lmms_eval_cli_scores_match_our_eval(tiny, tmp_path):
    path, model, tokenizer, _ = tiny
    pinned = re.search(r'^lmms = \["lmms-eval==([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert version("lmms-eval") == pinned, "scripts/test.sh installs another lmms-eval than the lmms extra"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"),
           "PYTHONPATH": str(REPO)}
    tasks = ["uni_moe_sample_image", "uni_moe_sample_speech", "uni_moe_sample_video_mc"]
    command = [sys.executable, "-m", "lmms_eval", "--model", "uni_moe",
               "--model_args", f"pretrained={path},device=cpu,dtype=float32,batch_size=8",
               "--tasks", ",".join(tasks), "--limit", "8", "--include_path", str(TASKS),
               "--output_path", str(tmp_path / "lmms"), "--log_samples"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(Path(glob.glob(str(tmp_path / "lmms" / "*" / "*_results.json"))[0]).read_text())
    logged = {t: [json.loads(line) for line in Path(glob.glob(str(tmp_path / "lmms" / "*" / f"*_samples_{t}.jsonl"))[0])
                  .read_text().splitlines()] for t in tasks}

    for task, name in (("uni_moe_sample_image", "sample_image"), ("uni_moe_sample_speech", "sample_speech")):
        rows = _rows(name)[:8]
        data = tmp_path / f"{name}.json"
        data.write_text(json.dumps([_record(r) for r in rows]))
        ours = run_eval(EvalConfig(model_path=str(path), data_path=str(data), data_type="synthetic",
                                   output=str(tmp_path / f"{name}_predictions.json"), batch_size=8, device="cpu",
                                   dtype="float32", overrides={"stop": ("\n\n",)}))
        predictions = [row["prediction"] for row in
                       json.loads((tmp_path / f"{name}_predictions.json").read_text())]
        by_doc = {s["doc_id"]: s for s in logged[task]}
        assert [by_doc[i]["filtered_resps"] for i in range(len(rows))] == predictions, task
        assert results["results"][task]["accuracy,none"] == pytest.approx(ours["metrics"]["accuracy"]), task

    rows = _rows("sample_video_mc")[:8]
    by_doc = {s["doc_id"]: s for s in logged["uni_moe_sample_video_mc"]}
    hits = []
    for i, row in enumerate(rows):
        expected = _label_logprobs(model, tokenizer, [_record(row, c) for c in row["choices"]])
        lmms_nll = [float(nll) for nll, _ in by_doc[i]["filtered_resps"]]
        np.testing.assert_allclose(lmms_nll, -np.array(expected), rtol=1e-5, atol=1e-4)
        hits.append(float(int(np.argmax(expected)) == row["choices"].index(row["answer"])))
    assert results["results"]["uni_moe_sample_video_mc"]["acc,none"] == pytest.approx(np.mean(hits))


def test_task_audio_is_read_as_lmms_eval_hands_it_over():
    task_utils = load_file("lmms_task_utils", TASKS / "utils.py")
    row = _rows("sample_speech")[0]
    (audio,) = task_utils.doc_to_visual(row)
    wave, rate = sf.read(DATA / row["audio"], dtype="float32")
    assert rate == audio["sampling_rate"] and np.array_equal(audio["array"], wave)
    assert task_utils.process_results({"answer": "Red"}, ["red, I think"]) == {"accuracy": 1.0}
