"""Gradio chat demo: text questions about an image, a speech recording, a sound and a video (uploaded or
recorded), answers streamed token by token, multi-turn history, and a panel showing which experts each
MoE layer chose for the answer's and the prompt's tokens. Media stay in the conversation for the following
questions; a line under the chat names them, and *Forget media* drops them (keeping the text).

    python -m Uni_MoE.serve.demo                       # tiny random model, built on first use
    python -m Uni_MoE.serve.demo --model checkpoint/Uni-MoE-speech --device cuda --dtype bfloat16

It listens on 127.0.0.1 unless --host says otherwise, sends nothing outside (no analytics, no share
link unless --share), and answers one request at a time, queueing up to --queue_size more. Uploads over
--max_upload_mb are refused by the server before they are stored; recordings and videos over their
duration limits, files of the wrong kind and files that do not decode get a message in the chat.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import torch  # noqa: E402

from .demo_chat import MAX_NEW_TOKENS, MAX_TEMPERATURE, forget_media, make_chat, show_context  # noqa: E402
from .demo_context import NOTHING  # noqa: E402
from .demo_engine import DemoEngine  # noqa: E402
from .demo_media import LABELS, UploadLimits  # noqa: E402

DEFAULT_MODEL = "checkpoint/tiny-moe"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_QUEUE_SIZE = 64
LOCAL_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web fonts: the page loads nothing from outside
LOCAL_MONO_FONTS = ["ui-monospace", "monospace"]


def build_app(engine: DemoEngine, temperature: float = 0.2, max_new_tokens: int = 256,
              queue_size: int = DEFAULT_QUEUE_SIZE) -> gr.Blocks:
    """The Blocks app around ``engine``; inputs for media the model has no encoder for are hidden.

    One answer is generated at a time; up to ``queue_size`` further requests wait their turn and the
    rest are told the queue is full.
    """
    has = set(engine.modalities)
    limits = engine.limits
    with gr.Blocks(title="Uni-MoE") as app:
        gr.Markdown("## Uni-MoE\nAsk about an image, a speech recording, a sound or a video. "
                    f"Uploads up to {limits.max_upload_mb:g} MB; recordings up to "
                    f"{limits.max_audio_seconds:g} s; videos up to {limits.max_video_seconds:g} s.")
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", height=460, elem_id="chat")
                question = gr.Textbox(label="Question", placeholder="Type a question and press Enter",
                                      elem_id="question")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    forget = gr.Button("Forget media", elem_id="forget-media")
                    clear = gr.Button("Clear chat", elem_id="clear")
                context = gr.Markdown(NOTHING, elem_id="context")
            with gr.Column(scale=2):
                with gr.Row():
                    image = gr.Image(label=LABELS["image"].capitalize(), type="filepath",
                                     visible="image" in has, sources=["upload", "clipboard", "webcam"],
                                     elem_id="image")
                    video = gr.Video(label=LABELS["video"].capitalize(), visible="video" in has,
                                     sources=["upload", "webcam"], elem_id="video")
                speech = gr.Audio(label=LABELS["speech"].capitalize(), type="filepath", visible="speech" in has,
                                  sources=["upload", "microphone"], elem_id="speech")
                audio = gr.Audio(label=LABELS["audio"].capitalize(), type="filepath", visible="audio" in has,
                                 sources=["upload", "microphone"], elem_id="audio")
                with gr.Accordion("Decoding", open=False):
                    temp = gr.Slider(0.0, MAX_TEMPERATURE, value=temperature, step=0.05,
                                     label="Temperature (0 = greedy)")
                    length = gr.Slider(1, MAX_NEW_TOKENS, value=max_new_tokens, step=1, label="Max new tokens")
        with gr.Group():
            plot = gr.Image(label="Experts chosen per MoE layer for the last answer", type="pil",
                            interactive=False, elem_id="routing-plot")
            with gr.Accordion("Routing counts (JSON)", open=False):
                numbers = gr.JSON(label="Routing counts", show_label=False, elem_id="routing-counts")

        media = [image, speech, audio, video]
        gr.on([send.click, question.submit], make_chat(engine), inputs=[question, *media, temp, length, state],
              outputs=[chatbot, state, plot, numbers, question, *media], api_name="chat", preprocess=False,
              ).then(show_context, inputs=[state], outputs=[context], api_name="context")
        forget.click(forget_media, inputs=[state], outputs=[chatbot, state, context], api_name="forget_media")
        clear.click(lambda: (None, [], None, {}, NOTHING), outputs=[state, chatbot, plot, numbers, context],
                    api_name="clear")
    app.queue(default_concurrency_limit=1, max_size=queue_size)
    return app


def launch(app: gr.Blocks, limits: UploadLimits, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           block: bool = True) -> None:
    """Serve ``app`` with no server-side rendering, local fonts only, and gradio refusing any upload over
    the size limit before it is stored; ``block=False`` returns once the server is up."""
    app.launch(server_name=host, server_port=port, share=share, ssr_mode=False, quiet=not block,
               prevent_thread_lock=not block, max_file_size=int(limits.max_upload_mb * 2**20),
               theme=gr.themes.Default(font=LOCAL_FONTS, font_mono=LOCAL_MONO_FONTS))


def ensure_model(path: str) -> Path:
    """The model folder; the default tiny model is built there first if it is missing."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    if path != DEFAULT_MODEL:
        raise FileNotFoundError(f"{p}: no model here (expected config.json, weights and a tokenizer)")
    from ..checkpoint.tiny import build_tiny

    print(f"{p}: building the tiny random model (first use)")
    return build_tiny(p, moe=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint folder (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default: %(default)s)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio share link (off by default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device for the model (default: %(default)s)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="weights' dtype (default: %(default)s)")
    parser.add_argument("--max_upload_mb", type=float, default=UploadLimits.max_upload_mb,
                        help="largest accepted upload (default: %(default)s)")
    parser.add_argument("--max_audio_seconds", type=float, default=UploadLimits.max_audio_seconds,
                        help="longest accepted speech or sound (default: %(default)s)")
    parser.add_argument("--max_video_seconds", type=float, default=UploadLimits.max_video_seconds,
                        help="longest accepted video (default: %(default)s)")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="default of the UI slider")
    parser.add_argument("--temperature", type=float, default=0.2, help="default of the UI slider; 0 = greedy")
    parser.add_argument("--queue_size", type=int, default=DEFAULT_QUEUE_SIZE,
                        help="requests waiting beyond this are refused (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Load the model (building the tiny default on first use) and serve the demo until stopped."""
    args = parse_args(argv)
    limits = UploadLimits(args.max_upload_mb, args.max_audio_seconds, args.max_video_seconds)
    engine = DemoEngine(ensure_model(args.model), args.device, DTYPES[args.dtype], limits)
    launch(build_app(engine, args.temperature, args.max_new_tokens, args.queue_size), limits, args.host,
           args.port, args.share)


if __name__ == "__main__":
    main()
