"""The demo's parts without a server: upload checks, the chat's conversation, decoding settings and the
routing recorder and plot."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("gradio")

from Uni_MoE.data import synthetic  # noqa: E402
from Uni_MoE.processing_uni_moe import UniMoEProcessor  # noqa: E402
from Uni_MoE.serve.demo_cache import CachedMediaProcessor  # noqa: E402
from Uni_MoE.serve.demo_chat import decoding_settings, upload_path, user_messages  # noqa: E402
from Uni_MoE.serve.demo_engine import Conversation  # noqa: E402
from Uni_MoE.serve.demo_media import RequestError, UploadError, UploadLimits, check_upload, has_soundtrack  # noqa: E402
from Uni_MoE.serve.demo_routing import ANSWER, RoutingRecorder, routing_figure  # noqa: E402

LIMITS = UploadLimits(max_upload_mb=0.1, max_audio_seconds=2.0, max_video_seconds=2.0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("uploads")
    rng = np.random.default_rng(0)
    synthetic.write_wav(d / "short.wav", synthetic.sound_wave(rng, "hum", 1.0))
    synthetic.write_wav(d / "long.wav", synthetic.sound_wave(rng, "hum", 3.0))  # 96 kB: under the size limit
    frames = synthetic.moving_shape_frames(rng, 32, "red")
    synthetic.write_mp4(d / "mute.mp4", frames, None)
    synthetic.write_mp4(d / "sound.mp4", frames, synthetic.sound_wave(rng, "beeps", 1.0))
    (d / "big.png").write_bytes(bytes(200_000))
    (d / "empty.wav").write_bytes(b"")
    (d / "junk.wav").write_bytes(b"RIFF" + bytes(range(256)) * 4)
    return d


def test_check_upload_passes_good_files(files):
    assert check_upload(files / "short.wav", "speech", LIMITS) == files / "short.wav"
    assert check_upload(files / "sound.mp4", "video", LIMITS) == files / "sound.mp4"


@pytest.mark.parametrize("name, modality, message", [
    ("short.wav", "image", "short.wav: unsupported image file type '.wav' (accepted: .bmp, .gif"),
    ("sound.mp4", "audio", "sound.mp4: unsupported sound file type '.mp4'"),
    ("empty.wav", "speech", "empty.wav: the speech recording file is empty or missing"),
    ("missing.wav", "audio", "missing.wav: the sound file is empty or missing"),
    ("big.png", "image", "big.png: 0.2 MB is larger than the 0.1 MB upload limit"),
    ("long.wav", "audio", "long.wav: the sound lasts 3.0 s, longer than the 2 s limit"),
    ("junk.wav", "speech", "junk.wav: not a readable media file"),
])
def test_check_upload_names_the_file_and_the_fault(files, name, modality, message):
    with pytest.raises(UploadError) as err:
        check_upload(files / name, modality, LIMITS)
    assert str(err.value).startswith(message)
    assert isinstance(err.value, RequestError)


def test_has_soundtrack(files):
    assert has_soundtrack(files / "sound.mp4") and not has_soundtrack(files / "mute.mp4")


def test_conversation_puts_one_placeholder_per_upload_in_prompt_order():
    uploads = {"video": ["v.mp4"], "speech": ["s.wav", "v.mp4"], "image": ["i.png"]}
    first = Conversation().with_question("  <audio>What happens?<image>  ", uploads)
    assert first.turns == [{"from": "human", "value": "<image>\n<speech>\n<speech>\n<video>\nWhat happens?"}]
    second = first.with_answer("A red shape moves.").with_question("And now?", {"audio": ["a.wav"]})
    assert [t["from"] for t in second.turns] == ["human", "gpt", "human"]
    assert second.turns[-1]["value"] == "<audio>\nAnd now?"
    sample = second.sample()
    assert (sample.images, sample.videos, sample.speech, sample.audio) == (["i.png"], ["v.mp4"],
                                                                          ["s.wav", "v.mp4"], ["a.wav"])
    assert first.media["audio"] == [] and len(first.turns) == 1  # earlier states are left as they were


def test_decoding_settings_accepts_the_ui_range_only():
    assert decoding_settings(0, 1) == (0.0, 1) and decoding_settings("0.7", 2048.0) == (0.7, 2048)
    for temperature, length, message in [(-0.1, 5, "temperature -0.1 is outside"), (0.2, 0, "max new tokens 0"),
                                         (0.2, 2.5, "max new tokens 2.5"), (None, 5, "must be numbers"),
                                         (float("nan"), 5, "temperature nan is outside")]:
        with pytest.raises(RequestError, match=message):
            decoding_settings(temperature, length)


def test_uploads_become_chat_entries_and_paths():
    assert upload_path(None, "image") is None
    assert upload_path({"path": "/cache/a.png", "orig_name": "a.png"}, "image") == "/cache/a.png"
    with pytest.raises(UploadError, match="the video upload arrived without a file"):
        upload_path({"url": "data:video/mp4;base64,AAAA"}, "video")
    entries = user_messages("Hi?", {"image": "/cache/a.png", "speech": None, "audio": "/cache/b.wav"})
    assert entries == [{"role": "user", "content": {"path": "/cache/a.png"}},
                       {"role": "user", "content": {"path": "/cache/b.wav"}}, {"role": "user", "content": "Hi?"}]
    assert user_messages("  ", {"image": None}) == []


class FakeMoE(nn.Module):
    """Stands in for an MoE layer: each call 'routes' to the experts it is given."""

    def forward(self, chosen: torch.Tensor) -> torch.Tensor:
        self.routing = chosen
        return chosen


def test_routing_recorder_counts_prompt_groups_and_answer_tokens():
    layers = [FakeMoE(), FakeMoE()]
    recorder = RoutingRecorder(layers)
    prompt = torch.tensor([[[0, 1], [2, 3], [2, 1], [0, 3]]])  # [B=1, S=4, k=2]
    steps = [torch.tensor([[[1, 2]]]), torch.tensor([[[1, 3]]])]
    with recorder.recording():
        for chosen in [prompt, *steps]:
            for layer in layers:
                layer(chosen)
    layers[0](prompt)  # after the block: not recorded
    counts = recorder.counts(["text", "image", "image", "text"], num_experts=4)
    assert list(counts) == ["text", "image", ANSWER]
    assert counts["text"].tolist() == [[2, 1, 0, 1]] * 2
    assert counts["image"].tolist() == [[0, 1, 2, 1]] * 2
    assert counts[ANSWER].tolist() == [[0, 2, 1, 1]] * 2

    with recorder.recording():  # a new recording starts from nothing
        layers[1](prompt)
    counts = recorder.counts(["text"] * 4, num_experts=4)
    assert counts["text"].tolist() == [[0, 0, 0, 0], [2, 2, 2, 2]] and counts[ANSWER].sum() == 0


def test_routing_figure_has_a_panel_per_group():
    table = np.arange(16).reshape(4, 4)
    one = routing_figure({ANSWER: table}, [0, 2, 4, 6], top_k=2)
    three = routing_figure({ANSWER: table, "text": table, "image": table}, [0, 2, 4, 6], top_k=2)
    assert one.mode == "RGB" and three.width > 2 * one.width and three.height == one.height
    pixels = np.asarray(three)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # a drawn heatmap, not a blank canvas


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from Uni_MoE.checkpoint.tiny import build_tiny
    from Uni_MoE.serve.demo_engine import DemoEngine

    return DemoEngine(build_tiny(tmp_path_factory.mktemp("model") / "tiny-moe", moe=True), limits=LIMITS)


def test_engine_hears_a_videos_soundtrack_as_speech(engine, files):
    checked = engine.check_uploads({"image": None, "video": str(files / "sound.mp4")})
    assert checked == {"video": [str(files / "sound.mp4")], "speech": [str(files / "sound.mp4")]}
    assert engine.check_uploads({"video": str(files / "mute.mp4")}) == {"video": [str(files / "mute.mp4")]}


def test_engine_refuses_media_it_has_no_encoder_for(engine, files, monkeypatch):
    monkeypatch.setattr(engine.config, "audio_config", None)
    assert "audio" not in engine.modalities
    with pytest.raises(UploadError, match="short.wav: this model has no audio encoder"):
        engine.check_uploads({"audio": str(files / "short.wav")})


def test_a_reply_whose_reader_leaves_stops_generating(engine):
    inputs = engine.inputs(Conversation().with_question("Tell me a long story.", {}), max_new_tokens=400)
    reply = engine.reply(inputs, temperature=0.0, max_new_tokens=400)
    pieces = iter(reply)
    next(pieces)  # the first piece is out: generation has started
    pieces.close()  # what gradio does when the browser tab goes away
    assert not reply.thread.is_alive() and reply.error is None
    answered = int(reply.routing[ANSWER][0].sum()) // engine.config.num_experts_per_tok
    assert 0 < answered < 50

    full = engine.reply(inputs, temperature=0.0, max_new_tokens=20)
    assert "".join(full) and int(full.routing[ANSWER][0].sum()) == 2 * 19  # every fed-back token, top-2


def test_media_are_decoded_once_while_a_chat_goes_on(engine, files, monkeypatch):
    calls = []
    decode_speech = UniMoEProcessor.speech

    def counted(self, path):
        calls.append(str(path))
        return decode_speech(self, path)

    monkeypatch.setattr(UniMoEProcessor, "speech", counted)
    monkeypatch.setattr(engine, "processor", CachedMediaProcessor.for_model(engine.config, engine.tokenizer, size=2))
    wav, video = str(files / "short.wav"), str(files / "sound.mp4")
    conversation = Conversation().with_question("Hi", engine.check_uploads({"speech": wav}))
    first = engine.inputs(conversation, 4)["input_features"]
    second = engine.inputs(conversation.with_answer("Yes.").with_question("And?", {}), 4)["input_features"]
    assert calls == [wav] and torch.equal(first, second)  # checked, then two turns: one decode
    engine.check_uploads({"video": video})  # its frames and its soundtrack push the wav out of the cache
    engine.inputs(conversation, 4)
    assert calls == [wav, video, wav]


def test_media_in_context_are_named_by_turn_and_can_be_dropped(engine, files):
    """An image turn, then a speech question: the speech turn's prompt still holds the image (what made the
    tiny model answer about the image); after forgetting, only the new recording reaches the model."""
    from Uni_MoE.serve.demo_chat import ChatState, forget_media, show_context
    from Uni_MoE.serve.demo_context import NOTHING, ContextMedium, media_in_context, without_media

    image = files / "shape.png"
    synthetic.random_shape_image(np.random.default_rng(1), 32, "red", "triangle").save(image)
    wav = str(files / "short.wav")
    chat = Conversation().with_question("What shape?", {"image": [str(image)]}).with_answer("a triangle")
    asked = chat.with_question("What animal is this?", {"speech": [wav]})
    assert media_in_context(asked) == [ContextMedium("image", "shape.png", 1), ContextMedium("speech", "short.wav", 2)]
    assert show_context(ChatState(asked)) == (
        "**In context:** image `shape.png` (turn 1); speech `short.wav` (turn 2). The next answer sees these "
        "too; press *Forget media* to ask about new uploads alone (the questions and answers so far stay).")
    ids = {m: engine.config.placeholder_token_ids()[m] for m in ("image", "speech")}
    window = engine.config.query_tokens_size  # a 1 s recording is one window of query tokens
    both = engine.inputs(asked, 4)
    assert {m: int((both["input_ids"] == i).sum()) for m, i in ids.items()} == {"image": 64, "speech": window}

    log, state, line = forget_media(ChatState(chat, [{"role": "user", "content": "What shape?"}]))
    assert line == NOTHING and state.conversation == without_media(chat)
    assert log[-1]["content"].startswith("Forgot 1 media file(s): shape.png.") and len(log) == 2
    assert [t["value"] for t in state.conversation.turns] == ["What shape?", "a triangle"]  # the text stays
    alone = engine.inputs(state.conversation.with_question("What animal is this?", {"speech": [wav]}), 4)
    assert {m: int((alone["input_ids"] == i).sum()) for m, i in ids.items()} == {"image": 0, "speech": window}
    assert "pixel_values" not in alone
    assert forget_media(None)[0][-1]["content"] == "No media in context to forget."
