"""Parameter names of the original Uni-MoE releases mapped to ours.

The original is a LLaVA fork: ``model.layers.L.*`` LLaMA weights, v1 experts
``mlp.experts.E.{gate,up,down}_proj.weight`` with router ``mlp.gate.weight``, v2 DeepSpeed-MoE
experts ``mlp.deepspeed_moe.experts.deepspeed_experts.<local>.*`` with router
``mlp.deepspeed_moe.gate.wg.weight``, connectors under ``model.mm_projector`` /
``model.mm_audio_aligner`` / ``model.query_tokens``. Ours stacks experts (``experts.gate_proj[E]``).
A name maps to a ``Target`` (our key, optional expert index), to a ``Drop`` (a known dead or
re-loaded weight, with the reason), or to None (unknown: an error in strict mode).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LM = "model.language_model"


@dataclass(frozen=True)
class Target:
    """Our state-dict key, and the expert index when the key is a stacked expert tensor."""

    key: str
    index: int | None = None


@dataclass(frozen=True)
class Drop:
    """A name deliberately not loaded, and why."""

    reason: str


@dataclass(frozen=True)
class Layout:
    """What the release is: which voice connector it has and whether its experts are DeepSpeed-MoE."""

    voice: str | None  # "speech" (Whisper), "audio" (BEATs) or None
    deepspeed_moe: bool = False


TOWER_RELOADED = Drop("encoder tower: reloaded from its own checkpoint, as the original does")
ROTARY = Drop("rotary inverse-frequency buffer, recomputed")
BASE_EXPERTS_IN_V2 = Drop("v2 builds experts from the Experts directory; the base's 4-expert MoE is unused")
DEAD_QUERY_TOKENS = Drop("query tokens of the speech code path, unused by the BEATs model")
UNUSED_TOKEN_TABLE = Drop("token table of the speech Q-former's Whisper decoder, unused (it reads query embeddings)")

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_PROJ = r"(gate|up|down)_proj"
_V1_EXPERT = re.compile(rf"mlp\.experts\.(\d+)\.{_PROJ}\.weight")
_V2_EXPERT = re.compile(rf"mlp\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.{_PROJ}(_lora_[AB])?\.weight")
_PLAIN_LAYER = re.compile(
    r"(self_attn\.[qkvo]_proj\.weight|input_layernorm\.weight|post_attention_layernorm\.weight"
    rf"|mlp\.{_PROJ}\.weight)"
)


def _layer_key(layer: str, rest: str, layout: Layout, local_to_global: int | None) -> Target | Drop | None:
    prefix = f"{LM}.layers.{layer}."
    if rest.endswith("rotary_emb.inv_freq"):
        return ROTARY
    if _PLAIN_LAYER.fullmatch(rest):
        return Target(prefix + rest)
    if rest == "mlp.gate.weight":
        return BASE_EXPERTS_IN_V2 if layout.deepspeed_moe else Target(prefix + "mlp.router.weight")
    if rest == "mlp.deepspeed_moe.gate.wg.weight":
        return Target(prefix + "mlp.router.weight")
    match = _V1_EXPERT.fullmatch(rest)
    if match:
        if layout.deepspeed_moe:
            return BASE_EXPERTS_IN_V2
        return Target(f"{prefix}mlp.experts.{match.group(2)}_proj", int(match.group(1)))
    match = _V2_EXPERT.fullmatch(rest)
    if match:
        index = int(match.group(1)) if local_to_global is None else local_to_global
        lora = match.group(3)
        name = f"{match.group(2)}_lora_{lora[-1]}" if lora else f"{match.group(2)}_proj"
        return Target(f"{prefix}mlp.experts.{name}", index)
    return None


def map_original_key(name: str, layout: Layout, local_to_global: int | None = None) -> Target | Drop | None:
    """Where the original parameter ``name`` goes in our model.

    ``local_to_global``: for a DeepSpeed expert file holding one expert under local index 0, the
    global expert it belongs to.
    """
    match = _LAYER.fullmatch(name)
    if match:
        return _layer_key(match.group(1), match.group(2), layout, local_to_global)
    if name == "model.embed_tokens.weight":
        return Target(f"{LM}.embed_tokens.weight")
    if name == "model.norm.weight":
        return Target(f"{LM}.norm.weight")
    if name == "lm_head.weight":
        return Target("lm_head.weight")
    if name.startswith(("model.vision_tower.", "model.audio_tower.")):
        return TOWER_RELOADED
    if re.fullmatch(r"model\.mm_projector\.\d+\.(weight|bias)", name):
        return Target(name)
    return _aligner_key(name, layout)


ALIGNER_PREFIXES = {
    "speech": (
        ("model.mm_audio_aligner.decoder.audio_decoder.", "model.speech_aligner.decoder."),
        ("model.mm_audio_aligner.projector.", "model.speech_aligner.projector."),
    ),
    "audio": (
        ("model.mm_audio_aligner.qformer.qformer.", "model.audio_aligner.qformer."),
        ("model.mm_audio_aligner.projector.", "model.audio_aligner.projector."),
    ),
}
QUERY_TOKENS = {
    "speech": {"model.query_tokens": Target("model.speech_aligner.query_tokens"),
               "model.mm_audio_aligner.decoder.audio_decoder.embed_tokens.weight": UNUSED_TOKEN_TABLE},
    "audio": {"model.query_tokens": DEAD_QUERY_TOKENS,
              "model.mm_audio_aligner.query_tokens": Target("model.audio_aligner.query_tokens")},
}


def _aligner_key(name: str, layout: Layout) -> Target | Drop | None:
    if layout.voice is None:
        return None
    if name in QUERY_TOKENS[layout.voice]:
        return QUERY_TOKENS[layout.voice][name]
    for old, new in ALIGNER_PREFIXES[layout.voice]:
        if name.startswith(old):
            return Target(new + name[len(old):])
    return None


def strip_trainer_prefix(state: dict) -> dict:
    """Undo PEFT wrapping in saved names as the original loader does: drop ``base_model.``, then one
    ``model.`` if any name starts with ``model.model.``."""
    state = {(k[len("base_model."):] if k.startswith("base_model.") else k): v for k, v in state.items()}
    if any(k.startswith("model.model.") for k in state):
        state = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in state.items()}
    return state


def is_router_lora(name: str) -> bool:
    """A LoRA tensor of a v1 router (``mlp.gate.lora_{A,B}[.default].weight``), saved in mlp_gates.bin
    by the releases whose routers had LoRA; the original loader never applies it."""
    return re.fullmatch(r"model\.layers\.\d+\.mlp\.gate\.lora_[AB](\.default)?\.weight", name) is not None
