"""The validation pass finds every kind of bad sample up front, names each one, and keeps the good ones;
silent audio is a warning, not an error."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from Uni_MoE.checkpoint.tiny import build_tiny
from Uni_MoE.config import UniMoEConfig
from Uni_MoE.data.synthetic import write_mp4
from Uni_MoE.data.tokenizer import load_tokenizer
from Uni_MoE.data.validate import ERROR, WARNING, DataValidationError, main, validate_files
from Uni_MoE.train.arguments import parse_args
from Uni_MoE.train.train import run

SAMPLES = Path(__file__).resolve().parents[1] / "data_sample" / "samples.json"
MAX_LENGTH = 256


def ask(value: str = "What is it?", answer: str | None = "red") -> list[dict[str, str]]:
    turns = [{"from": "human", "value": value}]
    return turns + ([{"from": "gpt", "value": answer}] if answer is not None else [])


def wav(path: Path, seconds: float, amplitude: float = 0.5) -> str:
    t = np.arange(int(seconds * 16000)) / 16000
    sf.write(path, (amplitude * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    return path.name


def huge_png(good_png: Path, path: Path, side: int = 9000) -> str:
    """A valid PNG whose header claims side x side pixels (a decompression bomb's header)."""
    data = bytearray(good_png.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", side, side)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    path.write_bytes(bytes(data))
    return path.name


# Each case: a record and the reason expected in its report line (None: the sample is good).
def make_cases(root: Path) -> list[tuple[dict, str | None]]:
    good_png = root / "good.png"
    shutil.copy(SAMPLES.parent / json.loads(SAMPLES.read_text())[0]["image"], good_png)
    png = good_png.read_bytes()
    (root / "empty.png").write_bytes(b"")
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "text.png").write_text("this is not an image\n")
    (root / "image.wav").write_bytes(png)
    (root / "image.mp4").write_bytes(png)
    sf.write(root / "zero.wav", np.zeros(0, np.float32), 16000)
    full_wav = (root / wav(root / "full.wav", 2.0)).read_bytes()
    (root / "truncated.wav").write_bytes(full_wav[: len(full_wav) // 2])
    write_mp4(root / "clip.mp4", [Image.new("RGB", (32, 32), (40 * i, 0, 0)) for i in range(6)], None)
    clip = (root / "clip.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(clip[: len(clip) // 2])
    return [
        ({"id": "good", "image": "good.png", "conversations": ask("<image>\nWhat colour?")}, None),
        ({"id": "speech", "voice": [wav(root / "ok.wav", 1.0)], "conversations": ask("<audio>\nWhat?")}, None),
        ({"id": "no-conv", "image": "good.png"}, "'conversations' must be a non-empty list"),
        ({"id": "bad-type", "image": 5, "conversations": ask()}, "field 'image' must be a string or a list"),
        ({"id": "bad-turn", "conversations": [{"from": "human", "value": 3}]}, "conversations[0] must be"),
        ({"id": "unknown", "images": ["good.png"], "conversations": ask()}, "unknown media key(s) ['images']"),
        ({"id": "missing", "image": "nowhere.png", "conversations": ask()}, "nowhere.png: file not found"),
        ({"id": "empty", "image": "empty.png", "conversations": ask()}, "empty.png: file is empty"),
        ({"id": "truncated", "image": "truncated.png", "conversations": ask()}, "truncated.png: not a readable image"),
        ({"id": "text", "image": "text.png", "conversations": ask()}, "text.png: not a readable image"),
        ({"id": "not-wav", "voice": ["image.wav"], "conversations": ask()}, "image.wav: has no audio stream"),
        ({"id": "clip", "video": "clip.mp4", "conversations": ask("<video>\nWhat colour?")}, None),
        ({"id": "frames", "video": ["good.png", "gone.png"], "conversations": ask()}, "gone.png: file not found"),
        ({"id": "cut-video", "video": "truncated.mp4", "conversations": ask()}, "truncated.mp4: not a readable media"),
        ({"id": "still", "video": "image.mp4", "conversations": ask()}, "image.mp4: is a still image (png_pipe)"),
        ({"id": "cut-wav", "voice": ["truncated.wav"], "conversations": ask()},
         "truncated.wav: truncated WAV: its header declares 64000 bytes of audio, the file holds 31978"),
        ({"id": "zero", "voice": ["zero.wav"], "conversations": ask()}, "zero.wav: audio has zero duration"),
        ({"id": "huge", "image": huge_png(good_png, root / "huge.png"), "conversations": ask()},
         "huge.png: resolution 9000x9000 exceeds"),
        ({"id": "long", "voice": [wav(root / "long.wav", 17.0)], "conversations": ask()},
         "long.wav: audio lasts 17.0 s (5 chunks of 4 s), more than the 4 chunks"),
        ({"id": "no-answer", "conversations": ask(answer=None)}, "must end with a gpt answer"),
        ({"id": "empty-answer", "conversations": ask(answer="  ")}, "answer (last gpt turn) is empty"),
        ({"id": "too-long", "conversations": ask(" ".join(["word"] * 400))}, f"more than model_max_length={MAX_LENGTH}"),
        ({"id": "silent", "voice": [wav(root / "silent.wav", 1.0, amplitude=0.0)], "conversations": ask()},
         "silent.wav: audio is silent"),
    ]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> tuple[Path, list[tuple[dict, str | None]]]:
    root = tmp_path_factory.mktemp("bad_data")
    cases = make_cases(root)
    path = root / "data.json"
    path.write_text(json.dumps([record for record, _ in cases]))
    return path, cases


@pytest.mark.timeout(120)
def test_every_bad_sample_is_reported_once_and_good_ones_kept(tiny, bad_data) -> None:
    path, cases = bad_data
    report = validate_files([path], load_tokenizer(tiny), UniMoEConfig.from_pretrained(tiny), path.parent,
                            MAX_LENGTH, show_progress=False)
    assert report.total == len(cases)
    by_index = {issue.index: issue for issue in report.issues}
    assert len(by_index) == len(report.issues), "one issue per bad sample"
    for index, (record, expected) in enumerate(cases):
        if expected is None:
            assert index not in by_index, f"{record['id']}: {by_index[index]}"
            continue
        issue = by_index[index]
        assert expected in issue.reason, f"{record['id']}: {issue.reason}"
        assert issue.file == str(path) and issue.id == record["id"]
        assert issue.severity == (WARNING if record["id"] == "silent" else ERROR)
    assert [s.id for s in report.samples] == ["good", "speech", "clip", "silent"]
    assert report.num_bad == len(cases) - 4
    assert report.summary() == f"{len(cases)} samples: 4 usable, {len(cases) - 4} bad, 1 warning(s)"


@pytest.mark.timeout(120)
def test_command_line_prints_the_report_and_fails(tiny, bad_data, tmp_path, capsys) -> None:
    path, cases = bad_data
    malformed = tmp_path / "broken.json"
    malformed.write_text('[{"conversations": [}')
    lines_file = tmp_path / "lines.jsonl"
    lines_file.write_text(json.dumps({"id": "ok", "conversations": ask()}) + '\n\n{"id": "cut", "conv\n'
                          + json.dumps({"id": "no-field"}) + "\n")
    json_report = tmp_path / "report.json"
    status = main([str(path), str(malformed), str(lines_file), "--data_root", str(path.parent),
                   "--model_name_or_path", str(tiny), "--model_max_length", str(MAX_LENGTH), "--report", str(json_report)])
    assert status == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"{len(cases) + 3} samples: 5 usable, {len(cases) - 2} bad, 1 warning(s), 1 unreadable file(s)"
    assert f"{lines_file} sample 1 (id None): error: malformed JSON on line 3 column 15: Unterminated string " \
        "starting at" in lines
    assert f"{lines_file} sample 2 (id no-field): error: 'conversations' must be a non-empty list" in lines
    assert f"{path} sample 6 (id missing): error: {path.parent / 'nowhere.png'}: file not found" in lines
    assert any(line.startswith(f"{malformed} sample -1 (id None): error: malformed JSON at line 1") for line in lines)
    assert len(json.loads(json_report.read_text())["issues"]) == len(lines) - 1


@pytest.mark.timeout(120)
def test_clean_data_passes_and_eval_data_needs_no_answer(tiny, tmp_path) -> None:
    assert main([str(SAMPLES), "--data_root", str(SAMPLES.parent), "--model_name_or_path", str(tiny)]) == 0
    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps([{"id": "q", "conversations": ask(answer=None)}]))
    assert main([str(questions), "--model_name_or_path", str(tiny), "--for_generation"]) == 0
    assert main([str(questions), "--model_name_or_path", str(tiny)]) == 1


def _train(tiny: Path, data: Path, out: Path, *extra: str) -> Path:
    argv = ["--stage", "3", "--model_name_or_path", str(tiny), "--num_experts", "2", "--expert_lora_r", "4",
            "--data_path", str(data), "--data_root", str(data.parent), "--output_dir", str(out),
            "--model_max_length", str(MAX_LENGTH), "--per_device_train_batch_size", "2", "--max_steps", "2",
            "--save_steps", "2", "--report_to", "none", "--disable_tqdm", "True", *extra]
    return run(*parse_args(argv)[:3])


@pytest.mark.timeout(120)
def test_training_stops_before_the_first_step_listing_every_bad_sample(tiny, bad_data, tmp_path) -> None:
    path, cases = bad_data
    with pytest.raises(DataValidationError) as caught:
        _train(tiny, path, tmp_path / "out")
    message = str(caught.value)
    for index, (record, expected) in enumerate(cases):
        if expected is not None and record["id"] != "silent":
            assert f"{path} sample {index} (id {record['id']}): error: " in message
    assert "--skip_bad_samples True" in message
    assert not list((tmp_path / "out").glob("checkpoint-*"))


@pytest.mark.timeout(300)
def test_skip_bad_samples_trains_on_the_rest_and_reports_counts(tiny, bad_data, tmp_path, caplog) -> None:
    path, cases = bad_data
    out = _train(tiny, path, tmp_path / "out", "--skip_bad_samples", "True")
    assert (out / "config.json").is_file()
    state = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    summary = f"training data: {len(cases)} samples: 4 usable, {len(cases) - 4} bad, 1 warning(s); the bad ones were skipped"
    assert summary in caplog.text
    assert f"skipping {path} sample 6 (id missing): error:" in caplog.text


@pytest.mark.timeout(60)
def test_media_the_model_cannot_encode_is_an_error(tiny, tmp_path) -> None:
    config = UniMoEConfig.from_pretrained(tiny)
    config.vision_config = None
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": "img", "image": "x.png", "conversations": ask()}]))
    report = validate_files([data], load_tokenizer(tiny), config, tmp_path, show_progress=False)
    assert [str(i) for i in report.issues] == [
        f"{data} sample 0 (id img): error: has image media but the model has no encoder for it"]


def _validate_as_rank(rank: int, tiny: Path, data: Path, out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=2)
    try:
        report = validate_files([data], load_tokenizer(tiny), UniMoEConfig.from_pretrained(tiny), data.parent,
                                MAX_LENGTH, show_progress=False)
        (out / f"rank{rank}.txt").write_text(report.format() + "\n" + ",".join(s.id for s in report.samples))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ranks_share_the_validation_and_agree(tiny, bad_data, tmp_path) -> None:
    import torch.multiprocessing as mp

    path, _ = bad_data
    single = validate_files([path], load_tokenizer(tiny), UniMoEConfig.from_pretrained(tiny), path.parent,
                            MAX_LENGTH, show_progress=False)
    mp.spawn(_validate_as_rank, args=(tiny, path, tmp_path), nprocs=2)
    expected = single.format() + "\n" + ",".join(s.id for s in single.samples)
    assert (tmp_path / "rank0.txt").read_text() == expected
    assert (tmp_path / "rank1.txt").read_text() == expected


@pytest.mark.timeout(120)
def test_training_checks_the_data_before_loading_the_model(tiny, bad_data, tmp_path, monkeypatch) -> None:
    from Uni_MoE.train import stages

    path, _ = bad_data
    monkeypatch.setattr(stages, "build_model", lambda *a, **k: pytest.fail("the model was built before the check"))
    with pytest.raises(DataValidationError, match=r"sample 6 \(id missing\): error: "):
        _train(tiny, path, tmp_path / "out")


@pytest.mark.timeout(120)
def test_an_unreadable_data_file_stops_training_even_when_skipping(tiny, bad_data, tmp_path) -> None:
    path, _ = bad_data
    gone = tmp_path / "typo.json"
    argv = ["--stage", "3", "--model_name_or_path", str(tiny), "--data_path", str(path), str(gone),
            "--data_root", str(path.parent), "--output_dir", str(tmp_path / "out"), "--skip_bad_samples", "True",
            "--report_to", "none", "--disable_tqdm", "True"]
    from Uni_MoE.train.train import main as train_main

    with pytest.raises(SystemExit) as stop:
        train_main(argv)
    assert stop.value.code.startswith(f"--data_path {gone}: cannot read data file (")
    assert "\n" not in stop.value.code
    assert not (tmp_path / "out").exists()


def test_training_names_a_model_folder_that_does_not_exist(tmp_path) -> None:
    from Uni_MoE.train.train import main as train_main

    with pytest.raises(SystemExit) as stop:
        train_main(["--stage", "1", "--model_name_or_path", str(tmp_path / "nope"), "--data_path", "d.json",
                    "--output_dir", str(tmp_path / "out"), "--report_to", "none"])
    assert stop.value.code == f"no such model folder: {tmp_path / 'nope'}"


@pytest.mark.timeout(120)
def test_progress_bar_reaches_the_end_and_the_model_folder_is_required(tiny, tmp_path, capsys) -> None:
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"id": str(i), "conversations": ask()} for i in range(3)]))
    assert main([str(data), "--model_name_or_path", str(tiny)]) == 0
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert bar.startswith("validating samples: 100%") and "3/3" in bar
    with pytest.raises(SystemExit) as stop:
        main([str(data), "--model_name_or_path", str(tmp_path / "nope")])
    assert stop.value.code == f"no such model folder: {tmp_path / 'nope'}"
    with pytest.raises(SystemExit):  # no default folder: one that exists only in a checkout's root would mislead
        main([str(data)])
    assert "--model_name_or_path" in capsys.readouterr().err
