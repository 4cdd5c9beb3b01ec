"""Nothing lost in evaluation: bad media found before the model loads, a generation failing mid-run recorded
while the run goes on, a killed run continued without regenerating what it finished, and every mistake a user
can make at the command line reported in one line naming its cause."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from Uni_MoE.checkpoint.tiny import build_tiny
from Uni_MoE.data import synthetic as syn
from Uni_MoE.eval import runner
from Uni_MoE.eval.__main__ import cli, main
from Uni_MoE.eval.journal import Journal, JournalError, journal_path

ROOT = Path(__file__).resolve().parents[1]
DECODING = ["--max_new_tokens", "4", "--min_new_tokens", "4", "--num_beams", "1", "--do_sample", "False"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("model") / "tiny", moe=True)


def _question(i: int, media: str) -> dict:
    return {"question_id": f"q{i}", "conversations": [{"from": "human", "value": f"What is {media} {i}?"},
                                                      {"from": "gpt", "value": ""}], "gt": ["red"]}


def mixed_set(folder: Path) -> Path:
    """Nine good samples (image, speech, video file) and three bad: a truncated WAV, a corrupt PNG and a
    zero-byte MP4, in that order among them."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(3):
        syn.random_shape_image(rng, 32, "red", "circle").save(folder / f"img{i}.png")
        syn.write_wav(folder / f"say{i}.wav", syn.sound_wave(rng, "beeps", 1.0))
        frames = [Image.new("RGB", (32, 32), (80 * i, 0, 0)) for _ in range(4)]
        syn.write_mp4(folder / f"clip{i}.mp4", frames, None)
        records += [{**_question(3 * i, "image"), "image": f"img{i}.png"},
                    {**_question(3 * i + 1, "speech"), "voice": [f"say{i}.wav"]},
                    {**_question(3 * i + 2, "video"), "video": f"clip{i}.mp4"}]
    full = (folder / "say0.wav").read_bytes()
    (folder / "cut.wav").write_bytes(full[: len(full) // 3])
    png = (folder / "img0.png").read_bytes()
    (folder / "broken.png").write_bytes(png[:40] + bytes(len(png) - 40))
    (folder / "empty.mp4").write_bytes(b"")
    records.insert(2, {**_question(100, "speech"), "voice": ["cut.wav"]})
    records.insert(6, {**_question(101, "image"), "image": "broken.png"})
    records.insert(10, {**_question(102, "video"), "video": "empty.mp4"})
    path = folder / "mixed.json"
    path.write_text(json.dumps(records))
    return path


def test_bad_media_stop_the_run_before_the_model_loads_naming_each(model, tmp_path, monkeypatch):
    data = mixed_set(tmp_path / "data")
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as stop:
        cli(["--model_path", str(model), "--data_path", str(data), "--data_type", "vqa", *DECODING,
             "--output", str(tmp_path / "out" / "p.json")])
    lines = str(stop.value.code).splitlines()
    assert lines[0] == f"{data}: 3 of 12 generations cannot run:"
    assert lines[1].startswith(f"{data} sample 2 (id q100): failed the check before generation: ")
    assert "cut.wav" in lines[1] and "broken.png" in lines[2] and "empty.mp4" in lines[3]
    assert lines[2].startswith(f"{data} sample 6 (id q101)") and lines[3].startswith(f"{data} sample 10 (id q102)")
    assert "--skip_bad_samples" in lines[4] and len(lines) == 5
    assert not (tmp_path / "out").exists()


def test_with_skip_every_good_sample_is_scored_and_the_bad_ones_named(model, tmp_path, capsys):
    data = mixed_set(tmp_path / "data")
    out = tmp_path / "p.json"
    main(["--model_path", str(model), "--data_path", str(data), "--data_type", "vqa", *DECODING, "--batch_size", "4",
          "--output", str(out), "--skip_bad_samples"])
    rows = json.loads(out.read_text())
    metrics = json.loads((tmp_path / "p_metrics.json").read_text())
    good = [f"q{i}" for i in range(9)]
    assert [r["id"] for r in rows] == good
    assert all(r["score"] is not None and r["reference"] == ["red"] for r in rows)
    assert metrics["metrics"]["n"] == 9 and metrics["num_generations"] == 9 and metrics["num_records"] == 12
    skipped = metrics["skipped"]
    assert skipped["count"] == 3 and skipped["by_reason"] == {"failed_check": 3}
    assert [(s["id"], s["record"]) for s in skipped["samples"]] == [("q100", 2), ("q101", 6), ("q102", 10)]
    assert ["cut.wav" in skipped["samples"][0]["error"], "broken.png" in skipped["samples"][1]["error"],
            "empty.mp4" in skipped["samples"][2]["error"]] == [True] * 3
    printed = capsys.readouterr().out
    assert "skipped 3 of 12 generations: 3 failed the check before generation" in printed
    assert f"{data} sample 10 (id q102)" in printed
    assert not journal_path(out).exists()  # the final files replace the partial one


def test_a_sample_failing_mid_run_is_recorded_and_the_run_goes_on(model, tmp_path, monkeypatch):
    """The image of sample 5 is truncated after the check passed (a file changing under a running job): that
    generation fails in the data pipeline, is recorded with its error, and all the others are answered."""
    data = mixed_set(tmp_path / "data")
    records = [r for r in json.loads(data.read_text()) if not r["question_id"].startswith("q10")]
    data.write_text(json.dumps(records))
    real_check = runner.check_items

    def check_then_truncate(*args, **kwargs):
        found = real_check(*args, **kwargs)
        (data.parent / "img1.png").write_bytes(b"\x89PNG\r\n")
        return found

    monkeypatch.setattr(runner, "check_items", check_then_truncate)
    out = tmp_path / "p.json"
    main(["--model_path", str(model), "--data_path", str(data), "--data_type", "vqa", *DECODING,
          "--batch_size", "4", "--output", str(out)])
    rows = json.loads(out.read_text())
    metrics = json.loads((tmp_path / "p_metrics.json").read_text())
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(9) if i != 3]
    (failed,) = metrics["skipped"]["samples"]
    assert (failed["id"], failed["record"], failed["reason"]) == ("q3", 3, "failed_generation")
    assert "img1.png" in failed["error"]


def _journal_lines(path: Path) -> list[dict]:
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines()[1:] if line.endswith("}")]


@pytest.mark.slow
def test_killed_run_continues_to_the_same_predictions_without_regenerating(model, tmp_path, monkeypatch):
    from Uni_MoE.eval.fixtures import write_benchmark_files

    files = write_benchmark_files(tmp_path / "bench", n=12, data_types=["pope"])
    data = files["pope"]["data"]
    argv = ["--model_path", str(model), "--data_path", str(data), "--data_type", "pope", "--batch_size", "2",
            "--max_new_tokens", "12", "--min_new_tokens", "12", "--num_beams", "1", "--do_sample", "False"]
    whole = tmp_path / "whole.json"
    main([*argv, "--output", str(whole)])

    out = tmp_path / "killed.json"
    proc = subprocess.Popen([sys.executable, "-m", "Uni_MoE.eval", *argv, "--output", str(out)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while len(_journal_lines(journal_path(out))) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = _journal_lines(journal_path(out))
    assert not out.exists() and 4 <= len(kept) < 12, "killed after some batches, before the end"

    generated: list[int] = []
    real = runner.iter_replies

    def counting(model_, tokenizer, dataset, *args, **kwargs):
        for index, reply in real(model_, tokenizer, dataset, *args, **kwargs):
            generated.append(dataset.samples[index].index)
            yield index, reply

    monkeypatch.setattr(runner, "iter_replies", counting)
    main([*argv, "--output", str(out)])
    done_before = {row["n"] for row in kept}
    assert sorted(generated) == [n for n in range(12) if n not in done_before]  # pope: record n is generation n
    assert out.read_text() == whole.read_text()
    metrics = json.loads(out.with_name("killed_metrics.json").read_text())
    assert metrics["resumed"] == {"done_before": len(kept), "generated": 12 - len(kept)}
    assert metrics["metrics"] == json.loads(whole.with_name("whole_metrics.json").read_text())["metrics"]


def test_partial_file_refuses_other_settings_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "p.partial.jsonl"
    settings = {"model_path": "/m", "data_type": "vqa", "generation": {"stop": ("x",)}}
    journal = Journal(path, settings, ["a", "b", "c"])
    journal.record([{"n": 0, "id": "a", "prediction": "yes"}, {"n": 1, "id": "b", "error": "ValueError: x"}])
    with open(path, "a") as f:
        f.write('{"n": 2, "id": "c", "predi')  # a kill in the middle of a write
    again = Journal(path, settings, ["a", "b", "c"])
    assert again.done == {0: "yes"} and again.resumed == 1  # the failed one is tried again
    assert path.read_text().endswith('"error": "ValueError: x"}\n')
    with pytest.raises(JournalError, match=r"p.partial.jsonl was written with other settings \(data_type: 'vqa', "
                                           r"now 'pope'\); pass --overwrite"):
        Journal(path, {**settings, "data_type": "pope"}, ["a", "b", "c"])
    with pytest.raises(JournalError, match="generation 0 is id a, the data now has z; the data file changed"):
        Journal(path, settings, ["z", "b", "c"])
    assert Journal(path, settings, ["a"]).done == {0: "yes"}  # a smaller --limit keeps what it covers
    assert Journal(path, {**settings, "data_type": "pope"}, ["a"], overwrite=True).done == {}


def test_missing_references_are_named_before_the_model_loads(model, tmp_path, capsys, monkeypatch):
    from Uni_MoE.eval.fixtures import write_benchmark_files

    files = write_benchmark_files(tmp_path / "bench", n=2, data_types=["vqa"])

    def no_model(*args, **kwargs):
        raise RuntimeError("stop before loading")

    monkeypatch.setattr(runner, "load_model", no_model)
    with pytest.raises(RuntimeError, match="stop before loading"):
        main(["--model_path", str(model), "--data_path", str(files["vqa"]["data"]), "--data_type", "vqa",
              "--output", str(tmp_path / "o.json")])
    err = capsys.readouterr().err
    assert f"warning: {files['vqa']['data']}: 2 of 2 generations have no reference answer and will not be " \
           "scored (ids " in err
    assert "pass them with --annotation_file" in err


def test_eval_names_a_model_folder_that_does_not_exist(tmp_path):
    with pytest.raises(SystemExit) as stop:
        cli(["--model_path", str(tmp_path / "nope"), "--data_path", "x.json", "--data_type", "vqa",
             "--output", str(tmp_path / "o.json")])
    assert stop.value.code == f"no such model folder: {tmp_path / 'nope'}"
