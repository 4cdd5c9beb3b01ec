"""The demo's chat handler: take a question and its uploads, check them, stream the answer into the chat
log, then show where the answer's tokens were routed. Every failure the user can cause (a bad upload, an
over-long conversation, a failed generation) ends the turn with a message in the chat, never a crash.

The handler runs with gradio's preprocessing off: uploads arrive as the file records gradio has already
moved into its upload cache (so only files the user uploaded are reachable), and the demo, not gradio,
opens them, so an unreadable file reaches ``DemoEngine.check_uploads`` and its message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import gradio as gr
from PIL import Image

from .demo_context import context_note, media_in_context, without_media
from .demo_engine import PROMPT_ORDER, Conversation, DemoEngine
from .demo_media import RequestError, UploadError
from .demo_routing import routing_figure, routing_summary

log = logging.getLogger(__name__)
NOT_ANSWERED = "Not answered"
MAX_TEMPERATURE = 1.5
MAX_NEW_TOKENS = 2048


@dataclass
class ChatState:
    """One browser session's conversation (what the model sees) and chat log (what the user sees)."""

    conversation: Conversation = field(default_factory=Conversation)
    messages: list[dict[str, Any]] = field(default_factory=list)


def upload_path(payload: dict[str, Any] | None, modality: str) -> str | None:
    """The server-side path of one upload as gradio hands it over unprocessed (a file record, or None)."""
    if payload is None:
        return None
    path = payload.get("path") if isinstance(payload, dict) else None
    if not path:
        raise UploadError(f"the {modality} upload arrived without a file; upload it again")
    return str(path)


def decoding_settings(temperature: Any, max_new_tokens: Any) -> tuple[float, int]:
    """Temperature and answer length as numbers within the UI's bounds (API callers may send anything)."""
    try:
        temp, length = float(temperature), float(max_new_tokens)
    except (TypeError, ValueError) as err:
        raise RequestError(f"temperature and max new tokens must be numbers, got {temperature!r} and "
                           f"{max_new_tokens!r}") from err
    if not 0.0 <= temp <= MAX_TEMPERATURE:
        raise RequestError(f"temperature {temperature!r} is outside 0..{MAX_TEMPERATURE:g}")
    if not (1 <= length <= MAX_NEW_TOKENS and length.is_integer()):
        raise RequestError(f"max new tokens {max_new_tokens!r} is not a whole number in 1..{MAX_NEW_TOKENS}")
    return temp, int(length)


def user_messages(question: str, uploads: dict[str, str | None]) -> list[dict[str, Any]]:
    """Chat-log entries for a question and its attachments."""
    files = [{"role": "user", "content": {"path": p}} for p in uploads.values() if p]
    return files + ([{"role": "user", "content": question}] if question.strip() else [])


def error_message(text: str) -> dict[str, Any]:
    """A chat-log entry that tells the user why the turn was not answered."""
    return {"role": "assistant", "content": f"⚠️ {text}", "metadata": {"title": NOT_ANSWERED}}


def routing_panel(engine: DemoEngine, counts: dict) -> tuple[Image.Image | None, dict[str, Any]]:
    """The routing heatmap and its numbers for the API (both empty when nothing was recorded)."""
    if not counts:
        return None, {}
    k = engine.config.num_experts_per_tok
    summary = {"moe_layers": engine.moe_layer_ids, "num_experts": engine.config.num_experts, "top_k": k,
               "counts": routing_summary(counts)}
    return routing_figure(counts, engine.moe_layer_ids, k), summary


def show_context(state: ChatState | None) -> str:
    """The context line for the session's conversation (shown under the chat after every turn)."""
    return context_note(state.conversation if state else None)


def forget_media(state: ChatState | None) -> tuple[list[dict[str, Any]], ChatState, str]:
    """Drop every media file from the conversation (its text stays) and say so in the chat log; returns
    (chat log, state, context line)."""
    state = state or ChatState()
    dropped = media_in_context(state.conversation)
    note = (f"Forgot {len(dropped)} media file(s): {', '.join(m.name for m in dropped)}. The next answer sees "
            "only the text so far and new uploads." if dropped else "No media in context to forget.")
    messages = state.messages + [{"role": "assistant", "content": note, "metadata": {"title": "Context"}}]
    forgotten = ChatState(without_media(state.conversation), messages)
    return forgotten.messages, forgotten, show_context(forgotten)


def make_chat(engine: DemoEngine) -> Callable[..., Iterator[tuple]]:
    """The chat handler. It yields (chat log, state, routing plot, routing numbers, question, *uploads);
    the question box and the uploads are cleared once a turn is taken."""

    def chat(question: str | None, image: dict | None, speech: dict | None, audio: dict | None,
             video: dict | None, temperature: float, max_new_tokens: float,
             state: ChatState | None) -> Iterator[tuple]:
        state = state or ChatState()
        question = question if isinstance(question, str) else ""
        cleared = ("",) + (None,) * len(PROMPT_ORDER)
        payloads = {"image": image, "speech": speech, "audio": audio, "video": video}
        shown = list(state.messages)

        def refuse(text: str) -> tuple:
            refused = ChatState(state.conversation, shown + [error_message(text)])
            return (refused.messages, refused, gr.skip(), {"error": text}) + cleared

        try:
            uploads = {m: upload_path(p, m) for m, p in payloads.items()}
            shown += user_messages(question, uploads)
            temperature, max_new_tokens = decoding_settings(temperature, max_new_tokens)
            checked = engine.check_uploads(uploads)
            if not question.strip() and not checked:
                raise RequestError("type a question or attach a file")
            conversation = state.conversation.with_question(question, checked)
            inputs = engine.inputs(conversation, max_new_tokens)
        except RequestError as err:
            yield refuse(str(err))
            return
        except Exception as err:  # a fault of ours, not the user's: log it, tell the user, keep serving
            log.exception("preparing the model input failed")
            yield refuse(f"the input could not be prepared ({err.__class__.__name__}: {err})")
            return
        reply = engine.reply(inputs, temperature, max_new_tokens)
        answer = ""
        for piece in filter(None, reply):
            answer += piece
            yield (shown + [{"role": "assistant", "content": answer}], state, gr.skip(), gr.skip()) + cleared
        if reply.error is not None:
            log.error("generation failed", exc_info=reply.error)
            yield refuse(f"generation failed: {reply.error}")
            return
        state = ChatState(conversation.with_answer(answer), shown + [{"role": "assistant", "content": answer}])
        figure, summary = routing_panel(engine, reply.routing)
        yield (state.messages, state, figure, summary) + cleared

    return chat
