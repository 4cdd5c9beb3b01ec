"""The terminal chat: one-shot answers, multi-turn history, media flags."""

from __future__ import annotations

import json

import pytest
import torch

from Uni_MoE.checkpoint.loader import load_model
from Uni_MoE.checkpoint.tiny import build_tiny
from Uni_MoE.cli_args import release_parts
from Uni_MoE.data.dataset import UniMoEDataset
from Uni_MoE.data.schema import parse_sample
from Uni_MoE.data.synthetic import make_dataset
from Uni_MoE.modalities import MEDIA_INPUT_KEYS
from Uni_MoE.serve import cli
from Uni_MoE.serve.generate import generate_batch


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model_dir = build_tiny(root / "model", moe=False)
    records = json.loads(make_dataset(root / "data", 1, seed=1, split="test",
                                      tasks=["image_colour", "speech_word", "video_sound"]).read_text())
    media = {r["task"]: r for r in records}
    return model_dir, {
        "image": str(root / "data" / media["image_colour"]["image"]),
        "speech": str(root / "data" / media["speech_word"]["speech"][0]),
        "video": str(root / "data" / media["video_sound"]["video"]),
    }


def greedy_by_hand(model, tokenizer, record: dict, max_new_tokens: int) -> str:
    """Greedy decoding written out: a full forward pass per new token (no cache), argmax, stop at EOS."""
    item = UniMoEDataset([parse_sample(record, 0)], tokenizer, model.config, for_generation=True)[0]
    ids = item["input_ids"][None]
    embeds = model.model.embed_multimodal(ids, **{k: item[k] for k in MEDIA_INPUT_KEYS if k in item})
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(inputs_embeds=embeds).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
            embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor([[token]]))], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def test_one_shot_answer_is_the_greedy_reply(workspace, capsys):
    model_dir, media = workspace
    cli.main(["--model_path", str(model_dir), "--image", media["image"], "--question", "What colour?",
              "--max_new_tokens", "5"])
    printed = capsys.readouterr().out.strip()
    model, tokenizer = load_model(model_dir, "cpu")
    record = {"image": media["image"], "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}]}
    assert printed == greedy_by_hand(model, tokenizer, record, 5)


def test_chat_keeps_history_and_media(workspace, capsys, monkeypatch):
    model_dir, media = workspace
    answers = iter(["What word is said?", "Say it again.", "exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    seen = []

    def spy(model, tokenizer, records, settings, **kwargs):
        seen.append((records[0], settings))
        return generate_batch(model, tokenizer, records, settings, **kwargs)

    monkeypatch.setattr(cli, "generate_batch", spy)
    cli.main(["--model_path", str(model_dir), "--speech", media["speech"], "--video", media["video"],
              "--max_new_tokens", "4"])
    replies = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ASSISTANT:")]
    assert len(replies) == 2 and len(seen) == 2
    first, second = seen[0][0], seen[1][0]
    assert first["conversations"][0]["value"] == "<speech>\n<speech>\n<video>\nWhat word is said?"
    assert first["speech"] == [media["speech"], media["video"]]  # the video's soundtrack as speech
    assert second["conversations"][1]["value"] == replies[0].removeprefix("ASSISTANT: ").strip()
    assert second["conversations"][2]["value"] == "Say it again."
    assert seen[0][1].do_sample and seen[0][1].temperature == 0.2  # no image: sampled, as the original


def test_no_video_audio_leaves_the_soundtrack_out(workspace, monkeypatch):
    """The CLI run on a video with a soundtrack: heard as speech by default, left out with the flag."""
    model_dir, media = workspace
    seen = []

    def spy(model, tokenizer, records, settings, **kwargs):
        seen.append(records[0])
        return generate_batch(model, tokenizer, records, settings, **kwargs)

    monkeypatch.setattr(cli, "generate_batch", spy)
    argv = ["--model_path", str(model_dir), "--video", media["video"], "--question", "q", "--max_new_tokens", "2"]
    cli.main(argv)
    cli.main([*argv, "--no_video_audio"])
    with_track, without = seen
    assert with_track["speech"] == [media["video"]]
    assert with_track["conversations"][0]["value"] == "<speech>\n<video>\nq"
    assert "speech" not in without and without["conversations"][0]["value"] == "<video>\nq"


def test_original_release_arguments_map_to_the_converter():
    args = cli.build_parser().parse_args(["--model_path", "e2", "--model_base", "base", "--vision_tower", "clip",
                                          "--audio_tower", "BEATs_iter3_plus_AS2M.pt"])
    assert release_parts(args) == {"model_base": "base", "experts_dir": None, "clip_dir": "clip",
                                   "whisper_dir": None, "beats_path": "BEATs_iter3_plus_AS2M.pt"}
    args = cli.build_parser().parse_args(["--model_path", "e2", "--audio_tower", "whisper-small"])
    assert release_parts(args)["whisper_dir"] == "whisper-small" and release_parts(args)["beats_path"] is None


def _refused(argv: list[str], monkeypatch) -> str:
    """The one line the chat exits with; the model must not have been loaded."""
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    return stop.value.code


def test_model_folder_and_media_are_checked_before_the_model_loads(workspace, tmp_path, monkeypatch):
    model_dir, media = workspace
    assert _refused(["--model_path", str(tmp_path / "no-model"), "--question", "hi"], monkeypatch) \
        == f"no such model folder: {tmp_path / 'no-model'}"
    typo = str(tmp_path / "cat.pgn")
    assert _refused(["--model_path", str(model_dir), "--image", typo, "--question", "hi"], monkeypatch) \
        == f"--image {typo}: no such file"
    broken = tmp_path / "broken.png"
    broken.write_bytes(open(media["image"], "rb").read()[:60])
    line = _refused(["--model_path", str(model_dir), "--image", str(broken), "--question", "hi"], monkeypatch)
    assert line.startswith(f"--image {broken}: not a readable image") and "\n" not in line
    text_as_wav = tmp_path / "note.wav"
    text_as_wav.write_text("not audio")
    line = _refused(["--model_path", str(model_dir), "--speech", str(text_as_wav), "--question", "hi"], monkeypatch)
    assert line.startswith(f"--speech {text_as_wav}: ") and "\n" not in line
