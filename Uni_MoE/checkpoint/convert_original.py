"""Convert an original Uni-MoE release (base + fine-tuned folders, v2 Experts directory, encoder
folders) into a UniMoEForCausalLM, applying the pieces in the original loader's order.

    python -m Uni_MoE.checkpoint.convert_original --base checkpoint/Uni-MoE-speech-base \\
        --finetuned checkpoint/Uni-MoE-speech-e2 --clip checkpoint/clip-vit-large-patch14-336 \\
        --whisper checkpoint/whisper-small --out checkpoint/uni-moe-speech-e2

Order (v1, ``load_all_pretrained_model``): base shards -> non_lora_trainables.bin -> PEFT LoRA merge
-> mm_audio_aligner.bin -> mlp_gates.bin. Order (v2, ``load_all_pretrained_model_dp``): base shards
(without the base's experts) -> per-expert LoRA ``{i}_mlp_experts.bin`` and expert bases from the
Experts directory -> non_lora_trainables.bin -> mlp_gates.bin -> PEFT merge -> mm_audio_aligner.bin.
Each LoRA delta is added in float32 to the weights written before the merge point, then cast once.
Encoders always come from their own checkpoints. checkpoint/README.md describes the layouts.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPVisionModel, WhisperModel
from transformers.initialization import no_init_weights

from ..config import UniMoEConfig
from ..modalities import PLACEHOLDERS
from ..model.encoders.beats import PREDICTOR_PREFIX, load_beats_checkpoint
from ..model.uni_moe import UniMoEForCausalLM
from .io import checkpoint_keys, iter_state_dicts, load_state_dict
from .original_config import build_config, is_deepspeed_moe, moe_layers_from_keys, read_original_config
from .original_keys import LM, Drop, Layout, Target, is_router_lora, map_original_key, strip_trainer_prefix
from .peft_adapter import find_adapter_file, read_adapter
from .state_writer import ConversionError, StateWriter
from .v2_experts import V2_EXPERT_FILES

logger = logging.getLogger(__name__)

VOCAB_KEYS = (f"{LM}.embed_tokens.weight", "lm_head.weight")
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.model", "tokenizer.json")


class _Conversion:
    """One conversion: the model being filled, the release's layout, and the tally of dropped names."""

    def __init__(self, model: UniMoEForCausalLM, layout: Layout) -> None:
        self.model = model
        self.layout = layout
        text_vocab = model.config.text_config.vocab_size - len(PLACEHOLDERS)
        self.writer = StateWriter(model, vocab_rows={key: text_vocab for key in VOCAB_KEYS})
        self.dropped: Counter[str] = Counter()

    def target(self, name: str, local_to_global: int | None = None) -> Target | Drop | None:
        return map_original_key(name, self.layout, local_to_global)

    def apply(self, state: dict[str, torch.Tensor], source: str, local_to_global: int | None = None) -> None:
        """Write every tensor of an original-layout state dict; unknown names are recorded."""
        for name, value in state.items():
            target = self.target(name, local_to_global)
            if isinstance(target, Drop):
                self.dropped[target.reason] += 1
            elif target is None:
                self.writer.unmatched.append(f"{source}: {name} {tuple(value.shape)}: no mapping to this model")
            else:
                self.writer.write(target, value, f"{source}: {name}")

    def apply_file(self, path: Path, strip_prefix: bool = False) -> None:
        state = load_state_dict(path)
        self.apply(strip_trainer_prefix(state) if strip_prefix else state, path.name)

    def apply_base(self, base_dir: Path) -> None:
        """Stream the base shards, reading only the tensors this model uses."""
        for name in checkpoint_keys(base_dir):
            target = self.target(name)
            if isinstance(target, Drop):
                self.dropped[target.reason] += 1
        for path, state in iter_state_dicts(base_dir, keep=lambda n: not isinstance(self.target(n), Drop)):
            self.apply(state, path.name)

    def stage_lora(self, folder: Path) -> None:
        """Stage each PEFT LoRA delta ``(alpha/r) B @ A`` for the weight it adapts (merge_and_unload's
        sum, taken in float32 as that weight is written, until ``writer.end_merge``)."""
        adapter = read_adapter(folder)
        self.writer.unmatched += adapter.unmatched
        self.writer.mismatched += adapter.mismatched
        for module in adapter.pairs:
            target = self.target(f"{module}.weight")
            source = f"{adapter.path.name}: {module}"
            if isinstance(target, Target):
                self.writer.stage_delta(target, partial(adapter.delta, module), adapter.delta_shape(module), source)
            else:
                self.writer.unmatched.append(f"{source}: LoRA for a module this model does not have")

    def apply_gates(self, path: Path) -> None:
        """Routers from mlp_gates.bin. Router LoRA tensors saved there are skipped, as the original loader
        skips them; the router keeps the bare trained weight even when the adapter merged a delta into it."""
        state = strip_trainer_prefix(load_state_dict(path))
        lora = [k for k in state if is_router_lora(k)]
        if lora:
            logger.info("%s: %d router LoRA tensors not applied (original loader order)", path.name, len(lora))
            self.dropped["router LoRA in mlp_gates.bin (the original overwrites the router after merging)"] += len(lora)
        self.apply({k: v for k, v in state.items() if k not in lora}, path.name)

    def apply_v2_experts(self, finetuned_dir: Path, experts_dir: Path, num_experts: int) -> None:
        """Expert i = its LoRA ``{i}_mlp_experts.bin`` + its frozen base MLP from the Experts directory
        (global expert -> file map of the original; the base file wins where both hold a name)."""
        if num_experts != len(V2_EXPERT_FILES):
            raise ValueError(f"v2 releases have {len(V2_EXPERT_FILES)} experts; the config says {num_experts}")
        for i in range(num_experts):
            path = finetuned_dir / f"{i}_mlp_experts.bin"
            self.apply(strip_trainer_prefix(load_state_dict(path, mmap=True)), path.name, local_to_global=i)
        for stem in dict.fromkeys(V2_EXPERT_FILES):
            path = experts_dir / f"{stem}.bin"
            state = load_state_dict(path, mmap=True)
            renamed = {k: _as_v2_expert(k) for k in state}
            for key in (k for k, new in renamed.items() if new is None):
                self.writer.unmatched.append(f"{path.name}: {key} {tuple(state[key].shape)}: not an MLP weight")
            for i in (i for i, s in enumerate(V2_EXPERT_FILES) if s == stem):
                mlp = {new: state[k] for k, new in renamed.items() if new is not None}
                self.apply(mlp, f"{path.name} (expert {i})", local_to_global=i)

    def apply_encoders(self, clip_dir: Path | None, whisper_dir: Path | None, beats: dict | None) -> None:
        """CLIP vision, Whisper encoder, BEATs (its state dict, classifier dropped) from their own
        checkpoints; the Whisper decoder fills the speech Q-former's decoder only where the release did
        not (the original builds it from Whisper)."""
        dtype = self.model.dtype
        if clip_dir is not None:
            clip = CLIPVisionModel.from_pretrained(str(clip_dir), dtype=dtype)
            self._write_module(clip.state_dict(), "model.vision_tower.", clip_dir.name)
        if whisper_dir is not None and self.model.model.speech_encoder is not None:
            whisper = WhisperModel.from_pretrained(str(whisper_dir), dtype=dtype)
            self._write_module(whisper.encoder.state_dict(), "model.speech_encoder.", whisper_dir.name)
            prefix = "model.speech_aligner.decoder."
            todo = {t.key for t in self.writer.missing(prefix)}
            decoder = {k: v for k, v in whisper.decoder.state_dict().items() if prefix + k in todo}
            self._write_module(decoder, prefix, f"{whisper_dir.name} decoder")
        if beats is not None:
            features = {k: v for k, v in beats.items() if not k.startswith(PREDICTOR_PREFIX)}
            self._write_module(features, "model.audio_encoder.", "BEATs checkpoint")

    def _write_module(self, state: dict[str, torch.Tensor], prefix: str, source: str) -> None:
        for key, value in state.items():
            self.writer.write(Target(prefix + key), value, f"{source}: {key}")

    def finish(self, strict: bool) -> None:
        """Raise (strict) or warn about every unmatched, mis-shaped or missing key; zero what is missing."""
        for reason, count in sorted(self.dropped.items()):
            logger.info("not loaded (%d tensors): %s", count, reason)
        problems = self.writer.problems()
        if problems and strict:
            raise ConversionError(
                f"{len(problems)} problem(s) converting the checkpoint:\n  " + "\n  ".join(problems)
            )
        for line in problems:
            logger.warning("%s", line)
        with torch.no_grad():
            for t in self.writer.missing():
                (self.writer.state[t.key] if t.index is None else self.writer.state[t.key][t.index]).zero_()


def _as_v2_expert(name: str) -> str | None:
    """An Experts-directory name (dense ``model.layers.L.mlp.X_proj.weight``) as a DeepSpeed expert's;
    None for anything else."""
    match = re.fullmatch(r"(model\.layers\.\d+)\.mlp\.((?:gate|up|down)_proj\.weight)", name)
    return f"{match.group(1)}.mlp.deepspeed_moe.experts.deepspeed_experts.0.{match.group(2)}" if match else None


def _resolve(given: str | Path | None, raw: dict[str, Any], key: str, want_file: bool) -> Path | None:
    """An encoder path: the argument, else the config's own path when it exists on this machine."""
    if given is not None:
        path = Path(given)
        if not path.exists():
            raise FileNotFoundError(f"{path} not found ({key})")
        return path
    named = raw.get(key)
    if named and Path(named).exists() and Path(named).is_file() == want_file:
        return Path(named)
    return None


def _towers(raw: dict[str, Any], clip_dir, whisper_dir, beats_path) -> tuple[Path | None, Path | None, Path | None]:
    clip = _resolve(clip_dir, raw, "mm_vision_tower", want_file=False)
    audio_tower = str(raw.get("mm_audio_tower") or "")
    is_beats = beats_path is not None or audio_tower.endswith(".pt")
    whisper = None if is_beats else _resolve(whisper_dir, raw, "mm_audio_tower", want_file=False)
    beats = _resolve(beats_path, raw, "mm_audio_tower", want_file=True) if is_beats else None
    needs = [("mm_vision_tower", clip, "--clip / clip_dir"),
             ("mm_audio_tower", beats if is_beats else whisper, "--beats / beats_path" if is_beats else "--whisper / whisper_dir")]
    for key, found, arg in needs:
        if raw.get(key) and found is None:
            raise FileNotFoundError(f"the release uses {key}={raw[key]!r}, which is not on disk; pass {arg}")
    return clip, whisper, beats


def _config_path(base_dir: Path, finetuned_dir: Path | None, v2: bool) -> Path:
    if v2:
        swapped = base_dir / "8config.json"
        return swapped if swapped.is_file() else base_dir / "config.json"
    return (finetuned_dir or base_dir) / "config.json"


def _build_model(config: UniMoEConfig, dtype: torch.dtype) -> UniMoEForCausalLM:
    with no_init_weights():
        model = UniMoEForCausalLM._from_config(config, dtype=dtype)
    return model.eval()


def convert_original(
    base_dir: str | Path,
    finetuned_dir: str | Path | None = None,
    experts_dir: str | Path | None = None,
    clip_dir: str | Path | None = None,
    whisper_dir: str | Path | None = None,
    beats_path: str | Path | None = None,
    out_dir: str | Path | None = None,
    strict: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    config_overrides: dict[str, Any] | None = None,
) -> UniMoEForCausalLM:
    """Build our model from an original release; save it (and its tokenizer) to ``out_dir`` if given.

    ``experts_dir`` makes it a v2/8e conversion (needs ``finetuned_dir`` with ``{i}_mlp_experts.bin``).
    Encoder paths default to the config's ``mm_vision_tower``/``mm_audio_tower`` when those exist.
    ``strict``: raise ConversionError listing every unmatched, mis-shaped or missing key; otherwise
    warn and zero the missing ones. ``config_overrides`` replaces UniMoEConfig fields (e.g. the
    BLIP-2 Q-Former geometry, which the original fixes in code).
    """
    base_dir = Path(base_dir)
    finetuned = Path(finetuned_dir) if finetuned_dir is not None else None
    v2 = experts_dir is not None
    raw = read_original_config(_config_path(base_dir, finetuned, v2))
    if v2 != is_deepspeed_moe(raw):
        raise ValueError(
            "the v2/8e release needs experts_dir and its 8-expert config (8config.json)" if v2 else
            f"{_config_path(base_dir, finetuned, v2)} is a v2/8e config; pass experts_dir (the Experts directory)"
        )
    if v2 and finetuned is None:
        raise ValueError("a v2/8e conversion needs finetuned_dir (the e2 folder with {i}_mlp_experts.bin)")
    clip, whisper, beats_file = _towers(raw, clip_dir, whisper_dir, beats_path)
    beats_cfg, beats = load_beats_checkpoint(beats_file) if beats_file else (None, None)
    moe_layers = None if v2 else moe_layers_from_keys(checkpoint_keys(base_dir))
    config = build_config(raw, moe_layers, clip, whisper, beats_cfg and beats_cfg.to_dict(), config_overrides)
    conv = _Conversion(_build_model(config, dtype), Layout(config.voice_modality if raw.get("mm_audio_tower") else None, v2))

    _stage_optional_lora(conv, finetuned)
    conv.apply_base(base_dir)
    if finetuned is None:
        for name in ("mm_projector.bin", "mm_audio_aligner.bin"):
            if (base_dir / name).is_file():
                conv.apply_file(base_dir / name)
    elif v2:
        conv.apply_v2_experts(finetuned, Path(experts_dir), config.num_experts)
        _apply_optional(conv, finetuned, "non_lora_trainables.bin", strip_prefix=True)
        _apply_optional(conv, finetuned, "mlp_gates.bin")
        _apply_optional(conv, finetuned, "fm_adapter.bin")
        conv.writer.end_merge()
        _apply_optional(conv, finetuned, "mm_audio_aligner.bin")
    else:
        _apply_optional(conv, finetuned, "non_lora_trainables.bin", strip_prefix=True)
        conv.writer.end_merge()
        _apply_optional(conv, finetuned, "mm_audio_aligner.bin")
        _apply_optional(conv, finetuned, "mlp_gates.bin")
    conv.apply_encoders(clip, whisper, beats)
    conv.finish(strict)
    if out_dir is not None:
        save_converted(conv.model, Path(out_dir), [d for d in (base_dir, finetuned) if d is not None])
    return conv.model


def _apply_optional(conv: _Conversion, folder: Path, name: str, strip_prefix: bool = False) -> None:
    path = folder / name
    if not path.is_file():
        logger.info("%s: no %s", folder, name)
    elif name == "mlp_gates.bin":
        conv.apply_gates(path)
    else:
        conv.apply_file(path, strip_prefix=strip_prefix)


def _stage_optional_lora(conv: _Conversion, folder: Path | None) -> None:
    if folder is None:
        return
    if find_adapter_file(folder) is None:
        logger.info("%s: no LoRA adapter", folder)
    else:
        conv.stage_lora(folder)


def save_converted(model: UniMoEForCausalLM, out_dir: Path, tokenizer_dirs: list[Path]) -> None:
    """save_pretrained the model and its processor: the release's tokenizer with the placeholder tokens added
    (checked against the model's placeholder ids before anything is written)."""
    from ..data.tokenizer import load_tokenizer
    from ..processing_uni_moe import UniMoEProcessor

    folder = next((d for d in tokenizer_dirs if any((d / f).is_file() for f in TOKENIZER_FILES)), None)
    tokenizer = load_tokenizer(folder) if folder is not None else None
    if tokenizer is not None:
        expected = model.config.placeholder_token_ids()
        got = {m: tokenizer.convert_tokens_to_ids(t) for m, t in PLACEHOLDERS.items()}
        if got != expected:
            raise ValueError(f"{folder}: tokenizer placeholder ids {got} differ from the model's {expected}")
    model.save_pretrained(out_dir)
    if tokenizer is None:
        logger.warning("no tokenizer found in %s; copy the release's tokenizer files to %s", tokenizer_dirs, out_dir)
    else:
        UniMoEProcessor.from_config(model.config, tokenizer).save_pretrained(out_dir)


def load_original(
    base_dir: str | Path, finetuned_dir: str | Path | None = None, **kwargs: Any
) -> UniMoEForCausalLM:
    """Load an original release directly (converted in memory, nothing written); same arguments as
    convert_original."""
    kwargs.pop("out_dir", None)
    return convert_original(base_dir, finetuned_dir, **kwargs)


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="base release folder (e.g. Uni-MoE-speech-base)")
    parser.add_argument("--finetuned", help="fine-tuned folder with the LoRA adapter (e.g. Uni-MoE-speech-e2)")
    parser.add_argument("--experts", help="v2/8e: the Experts directory (mlp_*.bin)")
    parser.add_argument("--clip", help="clip-vit-large-patch14-336 folder")
    parser.add_argument("--whisper", help="whisper-small folder (speech releases)")
    parser.add_argument("--beats", help="BEATs_iter3_plus_AS2M.pt (audio releases)")
    parser.add_argument("--out", required=True, help="output folder for the converted model")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--no-strict", action="store_true", help="warn about unmatched/missing keys instead of failing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    convert_original(
        args.base, args.finetuned, args.experts, args.clip, args.whisper, args.beats, args.out,
        strict=not args.no_strict, dtype=DTYPES[args.dtype],
    )
    print(f"converted model written to {args.out}")


if __name__ == "__main__":
    main()
