"""The gradio demo on the tiny model, served on loopback: its API through gradio_client (answers, history,
routing, every kind of bad request), 50 concurrent users, a full queue, and one real headless-Chromium
session (upload an image and a wav, ask, see the answer and the routing plot, survive a corrupt upload)."""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
httpx = pytest.importorskip("httpx")

from gradio_client.utils import QueueError, Status  # noqa: E402

from Uni_MoE.data import synthetic  # noqa: E402
from Uni_MoE.eval.distributed import free_port  # noqa: E402
from Uni_MoE.serve import demo  # noqa: E402
from Uni_MoE.serve.demo_engine import DemoEngine  # noqa: E402
from Uni_MoE.serve.demo_media import UploadLimits  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LIMITS = UploadLimits(max_upload_mb=1.0, max_audio_seconds=10.0, max_video_seconds=10.0)
MAX_NEW = 6


@dataclass
class Server:
    url: str
    engine: DemoEngine


def serve(app: gr.Blocks) -> str:
    """Start ``app`` on a free loopback port the way the command line does; its URL."""
    port = free_port()
    demo.launch(app, LIMITS, port=port, block=False)
    return f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """Good, oversized, over-long, mistyped and corrupt uploads, made on the spot."""
    d = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    files = {"image": d / "square.png", "wav": d / "tone.wav", "long_wav": d / "long.wav", "video": d / "clip.mp4",
             "long_video": d / "long.mp4", "huge": d / "huge.png", "broken_png": d / "broken.png",
             "broken_wav": d / "broken.wav", "broken_mp4": d / "broken.mp4", "empty_wav": d / "empty.wav",
             "txt": d / "notes.txt"}
    synthetic.random_shape_image(rng, 96, "red", "circle").save(files["image"])
    synthetic.write_wav(files["wav"], synthetic.sound_wave(rng, "hum", 1.5))
    synthetic.write_wav(files["long_wav"], synthetic.sound_wave(rng, "hum", 12.0))
    frames = synthetic.moving_shape_frames(rng, 64, "blue")
    synthetic.write_mp4(files["video"], frames, synthetic.sound_wave(rng, "beeps", 1.0))
    synthetic.write_mp4(files["long_video"], frames + frames[::-1], None, fps=1)  # 16 s
    Image.fromarray(rng.integers(0, 256, (700, 700, 3), dtype=np.uint8)).save(files["huge"])  # ~1.4 MB
    files["broken_png"].write_bytes(b"\x89PNG\r\n\x1a\n but the rest is not an image")
    files["broken_wav"].write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 20)
    files["broken_mp4"].write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(2000))
    files["empty_wav"].write_bytes(b"")
    files["txt"].write_text("not an image")
    return files


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    """The demo on the default tiny model (built on first use, as on a fresh machine), on loopback."""
    work = tmp_path_factory.mktemp("demo")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        model_dir = work / demo.ensure_model(demo.DEFAULT_MODEL)
    finally:
        os.chdir(cwd)
    engine = DemoEngine(model_dir, limits=LIMITS)
    app = demo.build_app(engine, temperature=0.0, max_new_tokens=MAX_NEW)
    yield Server(serve(app), engine)
    app.close()


def wait_for(condition, seconds: float = 60.0) -> None:
    """Poll ``condition`` until it holds; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the queue"
        time.sleep(0.1)


def client(server: Server) -> gradio_client.Client:
    """A new browser-like session (its own chat history)."""
    return gradio_client.Client(server.url, verbose=False)


def chat_args(question: str, image=None, speech=None, audio=None, video=None, temperature=0.0,
              max_new_tokens=MAX_NEW) -> tuple:
    f = gradio_client.handle_file
    files = [p and f(str(p)) for p in (image, speech, audio, video)]
    return (question, *files, temperature, max_new_tokens)


def ask(session: gradio_client.Client, question: str, **kwargs) -> tuple[list[dict], dict]:
    """One /chat call; (chat log, routing numbers). The API's outputs are the chat log, the routing plot,
    the routing numbers, then the cleared inputs (the session state is not part of the API)."""
    out = session.predict(*chat_args(question, **kwargs), api_name="/chat")
    return out[0], out[2]


def last_text(messages: list[dict]) -> str:
    content = messages[-1]["content"]
    parts = content if isinstance(content, list) else [content]
    return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in parts)


def test_cli_defaults_are_local_only():
    args = demo.parse_args([])
    assert (args.host, args.share, args.model) == ("127.0.0.1", False, "checkpoint/tiny-moe")
    assert args.queue_size >= 50
    args = demo.parse_args(["--host", "0.0.0.0", "--port", "9000", "--share", "--dtype", "bfloat16",
                            "--device", "cpu", "--max_upload_mb", "5"])
    assert (args.host, args.port, args.share, args.dtype, args.max_upload_mb) == ("0.0.0.0", 9000, True,
                                                                                  "bfloat16", 5.0)
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        demo.ensure_model("no-such-model")


def test_api_answers_with_routing_and_keeps_history(server, media):
    session = client(server)
    messages, routing = ask(session, "What do you see and hear?", image=media["image"], speech=media["wav"],
                            audio=media["wav"])
    assert [m["role"] for m in messages] == ["user"] * 4 + ["assistant"]  # 3 attachments, the question
    assert last_text(messages).strip()
    assert routing["moe_layers"] == [0, 1, 2, 3] and routing["num_experts"] == 4 and routing["top_k"] == 2
    counts = {g: np.asarray(c) for g, c in routing["counts"].items()}
    assert set(counts) == {"answer", "text", "image", "speech", "audio"}
    assert counts["image"].sum(axis=1).tolist() == [2 * 64] * 4  # 64 image tokens x top-2, every layer
    assert 0 < counts["answer"][0].sum() <= 2 * MAX_NEW

    messages, routing = ask(session, "Say more.")
    assert [m["role"] for m in messages][-2:] == ["user", "assistant"] and last_text(messages).strip()
    assert sum(m["role"] == "assistant" for m in messages) == 2  # one chat, both turns kept
    # the second prompt holds the first turn too: its media are routed again, in the same amounts
    assert np.asarray(routing["counts"]["image"]).sum(axis=1).tolist() == [2 * 64] * 4

    fresh, _ = ask(client(server), "Hello?")
    assert sum(m["role"] == "assistant" for m in fresh) == 1  # another session starts its own chat


def test_video_is_seen_and_its_soundtrack_heard(server, media):
    messages, routing = ask(client(server), "What happens in the video?", video=media["video"])
    assert last_text(messages).strip() and "error" not in routing
    counts = {g: np.asarray(c) for g, c in routing["counts"].items()}
    assert {"video", "speech"} <= set(counts) and counts["video"].sum() > 0 and counts["speech"].sum() > 0


def test_media_in_context_are_shown_and_can_be_forgotten(server, media):
    """After an image turn the image stays in the prompt of the next question; the context line says so, and
    after Forget media a speech question reaches the model without it (no image tokens are routed)."""
    session = client(server)
    ask(session, "What shape is it?", image=media["image"])
    assert session.predict(api_name="/context").startswith("**In context:** image `square.png` (turn 1).")
    _, routing = ask(session, "And what is said?", speech=media["wav"])
    assert {"image", "speech"} <= set(routing["counts"])  # both media in the second prompt
    messages, line = session.predict(api_name="/forget_media")
    assert line.startswith("**In context:** no media")
    assert last_text(messages).startswith("Forgot 2 media file(s): square.png, tone.wav.")
    messages, routing = ask(session, "What is said now?", speech=media["wav"])
    assert set(routing["counts"]) == {"answer", "text", "speech"} and last_text(messages).strip()
    assert session.predict(api_name="/context").startswith("**In context:** speech `tone.wav` (turn 3).")


def assert_refused(session: gradio_client.Client, expected: str, question: str = "And this?", **kwargs) -> list[dict]:
    """Ask; the turn must end with a 'Not answered' message containing ``expected``; the chat log."""
    messages, routing = ask(session, question, **kwargs)
    assert expected in routing["error"] and expected in last_text(messages)
    assert messages[-1]["metadata"]["title"] == "Not answered"
    return messages


def test_bad_uploads_get_a_message_and_the_chat_goes_on(server, media):
    session = client(server)
    bad = [(dict(image=media["broken_png"]), "broken.png: not a readable image"),
           (dict(image=media["txt"]), "notes.txt: unsupported image file type '.txt'"),
           (dict(speech=media["image"]), "square.png: unsupported speech recording file type '.png'"),
           (dict(speech=media["long_wav"]), "long.wav: the speech recording lasts 12.0 s"),
           (dict(audio=media["broken_wav"]), "broken.wav: not a readable"),
           (dict(audio=media["empty_wav"]), "empty.wav: the sound file is empty"),
           (dict(video=media["broken_mp4"]), "broken.mp4: not a readable"),
           (dict(video=media["long_video"]), "long.mp4: the video lasts 16.0 s, longer than the 10 s limit")]
    for kwargs, expected in bad:
        assert_refused(session, expected, **kwargs)
    messages, routing = ask(session, "What is this?", image=media["image"])
    assert last_text(messages).strip() and "error" not in routing
    assert sum(m["role"] == "assistant" for m in messages) == len(bad) + 1  # every turn kept in the log
    assert np.asarray(routing["counts"]["image"]).sum() == 4 * 2 * 64  # only the good image reached the model


def test_bad_settings_and_empty_turns_get_a_message(server):
    session = client(server)
    assert_refused(session, "max new tokens 0 is not a whole number", max_new_tokens=0)
    assert_refused(session, "temperature and max new tokens must be numbers", temperature="hot")
    assert_refused(session, "temperature 9.0 is outside 0..1.5", temperature=9.0)
    assert_refused(session, "exceeds the model's 1024-token context", max_new_tokens=2048)
    assert_refused(session, "type a question or attach a file", question=" ")
    messages, routing = ask(session, "<image> <video> What now?")  # typed placeholders ask for no media
    assert last_text(messages).strip() and set(routing["counts"]) == {"text", "answer"}


def test_uploads_over_the_size_limit_are_refused_at_the_door(server, media):
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        ask(client(server), "Too big?", image=media["huge"])
    with open(media["huge"], "rb") as f:  # a client that skips that check is stopped by the server
        response = httpx.post(server.url + "gradio_api/upload", files={"files": ("huge.png", f, "image/png")})
    assert response.status_code == 413 and "maximum allowed size" in response.text
    messages, _ = ask(client(server), "Still there?")
    assert last_text(messages).strip()


def test_api_cannot_make_the_demo_read_server_files(server):
    secret = Path(__file__)
    data = ["What is in it?", {"path": str(secret), "meta": {"_type": "gradio.FileData"}}, None, None, None, 0.0, 4]
    event = httpx.post(server.url + "gradio_api/call/chat", json={"data": data}).json()["event_id"]
    stream = httpx.get(f"{server.url}gradio_api/call/chat/{event}", timeout=60).text
    assert "event: error" in stream and "event: complete" not in stream
    assert "served on loopback" not in stream  # nothing of the file (this module's docstring) came back


@pytest.mark.slow
def test_fifty_concurrent_users_are_queued_then_all_answered(server):
    with ThreadPoolExecutor(16) as pool:
        sessions = list(pool.map(lambda _: client(server), range(50)))
    with server.engine.lock:  # the model is busy: every request has to wait its turn
        jobs = [s.submit(*chat_args(f"Question {i}?", max_new_tokens=3), api_name="/chat")
                for i, s in enumerate(sessions)]
        wait_for(lambda: sum(j.status().code == Status.IN_QUEUE for j in jobs) == 49)
        codes = [j.status().code for j in jobs]
        assert codes.count(Status.IN_QUEUE) == 49 and codes.count(Status.PROCESSING) == 1, codes
    for i, job in enumerate(jobs):
        messages = job.result(timeout=120)[0]
        assert messages[0]["content"][0]["text"] == f"Question {i}?" and messages[-1]["role"] == "assistant"
        assert messages[-1].get("metadata") is None and last_text(messages).strip()


@pytest.mark.slow
def test_a_full_queue_refuses_politely_and_the_demo_keeps_serving(server):
    app = demo.build_app(server.engine, temperature=0.0, max_new_tokens=3, queue_size=2)
    url = serve(app)
    try:
        sessions = [gradio_client.Client(url, verbose=False) for _ in range(6)]
        with server.engine.lock:
            jobs = [sessions[0].submit(*chat_args("Hi?", max_new_tokens=3), api_name="/chat")]
            wait_for(lambda: jobs[0].status().code == Status.PROCESSING)  # the model's one slot is taken
            jobs += [s.submit(*chat_args("Hi?", max_new_tokens=3), api_name="/chat") for s in sessions[1:]]
            wait_for(lambda: all(j.status().code in (Status.IN_QUEUE, Status.QUEUE_FULL, Status.FINISHED)
                                 for j in jobs[1:]))
        answered, refused = 0, 0
        for job in jobs:
            try:
                answered += bool(last_text(job.result(timeout=60)[0]).strip())
            except QueueError as err:
                assert "Queue is full" in str(err)
                refused += 1
        assert (answered, refused) == (3, 3)  # one running, two waiting, the rest told to retry
        messages = sessions[-1].predict(*chat_args("And now?", max_new_tokens=3), api_name="/chat")[0]
        assert last_text(messages).strip()
    finally:
        app.close()


@pytest.mark.slow
def test_browser_chat_shows_answer_plot_and_upload_errors(server, media, tmp_path):
    """A user's session: image and wav, answer and routing plot; an oversized image and a corrupt wav are
    refused with a message; the next question is answered. Screenshots: after the first answer, at the end."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (Debian package 'chromium'; scripts/setup_env.sh installs it)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is in the 'dev' extra")
    hosts: set[str] = set()
    shots = [tmp_path / "demo_first_answer.png", tmp_path / "demo_after_bad_upload.png"]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("request", lambda r: hosts.add(r.url.split("/")[2]) if "://" in r.url else None)
            page.goto(server.url)
            bot = page.locator('#chat [data-testid="bot"]')

            page.locator("#image input[type=file]").set_input_files(str(media["image"]))
            page.locator("#speech input[type=file]").set_input_files(str(media["wav"]))
            page.wait_for_selector("#image img")
            page.wait_for_selector("#speech audio", state="attached")
            page.locator("#question textarea").fill("What colour is the shape?")
            page.locator("#send").click()
            page.wait_for_selector("#routing-plot img", timeout=60_000)
            page.wait_for_function("() => !document.querySelector('#image img')")  # uploads cleared
            assert bot.count() == 1 and bot.last.inner_text().strip()
            chat = page.locator("#chat")
            assert "What colour is the shape?" in chat.inner_text()
            assert chat.locator("img").count() >= 1 and chat.locator("audio").count() == 1
            plot = page.locator("#routing-plot img")
            assert plot.evaluate("img => img.naturalWidth") > 300
            page.screenshot(path=str(shots[0]), full_page=True)

            page.locator("#image input[type=file]").set_input_files(str(media["huge"]))
            toast = page.get_by_text('exceed the maximum allowed size of 1.0 Mb: "huge.png"')
            toast.wait_for()  # refused in the page, never sent
            assert page.locator("#image img").count() == 0

            page.locator("#audio input[type=file]").set_input_files(str(media["broken_wav"]))
            page.locator("#question textarea").fill("And this sound?")
            page.locator("#send").click()
            page.wait_for_function("() => document.querySelector('#chat').innerText.includes('broken.wav')")
            assert "broken.wav: not a readable" in chat.inner_text() and bot.count() == 2

            first_plot = plot.get_attribute("src")
            page.locator("#question textarea").fill("Tell me more.")
            page.locator("#question textarea").press("Enter")
            page.wait_for_function("src => document.querySelector('#routing-plot img').src != src", arg=first_plot,
                                   timeout=60_000)  # the plot is replaced once the answer is complete
            assert bot.count() == 3 and bot.last.inner_text().strip()
            page.screenshot(path=str(shots[1]), full_page=True)
        finally:
            browser.close()
    assert all(Image.open(shot).size[0] == 1280 for shot in shots)
    assert hosts == {server.url.split("/")[2]}, f"the page reached outside the demo: {hosts}"
