"""Test helpers shared by several test files: tiny fake original releases written with the original's
file and parameter names (v1 base + fine-tuned folders, encoder folders, the v2 Experts directory)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, WhisperConfig, WhisperForConditionalGeneration
from transformers.models.whisper.modeling_whisper import WhisperDecoder

from Uni_MoE.checkpoint.v2_experts import V2_EXPERT_FILES, V2_MLP_KEY

V, H, I, LAYERS, HEADS, Q = 64, 32, 48, 4, 4, 4
R, ALPHA = 4, 8  # LoRA rank / alpha -> scaling 2
LM = "model.language_model"


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape) * 0.2


def whisper_config() -> WhisperConfig:
    return WhisperConfig(
        vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=80,
        max_source_positions=20, max_target_positions=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1, begin_suppress_tokens=None, suppress_tokens=None,
    )


def make_encoders(root: Path) -> tuple[Path, Path]:
    """CLIP (full CLIPModel, as released) and Whisper (WhisperForConditionalGeneration) tiny folders."""
    torch.manual_seed(1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  image_size=16, patch_size=8)
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(root / "clip")
    WhisperForConditionalGeneration(whisper_config()).save_pretrained(root / "whisper")
    return root / "clip", root / "whisper"


def llava_config(clip: Path, whisper: Path, **extra) -> dict:
    return dict(
        model_type="llava", architectures=["LlavaLlamaForCausalLM"], vocab_size=V, hidden_size=H,
        intermediate_size=I, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
        max_position_embeddings=128, rms_norm_eps=1e-5, hidden_act="silu", pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False, mm_vision_tower=str(clip), mm_audio_tower=str(whisper),
        mm_projector_type="mlp2x_gelu", mm_hidden_size=16, mm_audio_hidden_size=16, mm_vision_select_layer=-2,
        mm_audio_select_layer=0, mm_query_tokens=True, query_tokens_size=Q, moe=True, num_experts=4,
        num_experts_per_tok=2, image_aspect_ratio="square", **extra,
    )


def aligner_state() -> dict[str, torch.Tensor]:
    """Speech aligner as the original names it: whole Whisper decoder, projector, query tokens."""
    decoder = WhisperDecoder(whisper_config()).state_dict()
    state = {f"model.mm_audio_aligner.decoder.audio_decoder.{k}": rand(*v.shape) for k, v in decoder.items()}
    state.update({"model.mm_audio_aligner.projector.weight": rand(H, 16),
                  "model.mm_audio_aligner.projector.bias": rand(H), "model.query_tokens": rand(1, Q, 16)})
    return state


def base_state(moe_layers: list[int], aligner: dict | None = None) -> dict[str, torch.Tensor]:
    """A v1 base checkpoint's tensors, towers and dead Whisper-subclass weights included."""
    s = {"model.embed_tokens.weight": rand(V, H), "model.norm.weight": 1 + rand(H), "lm_head.weight": rand(V, H),
         "model.mm_projector.0.weight": rand(H, 16), "model.mm_projector.0.bias": rand(H),
         "model.mm_projector.2.weight": rand(H, H), "model.mm_projector.2.bias": rand(H),
         "model.vision_tower.vision_tower.vision_model.post_layernorm.weight": rand(16),
         "model.audio_tower.encoder.layer_norm.weight": rand(16),
         "model.audio_tower.decoder.layer_norm.weight": rand(16)}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        s.update({f"{p}self_attn.{n}_proj.weight": rand(H, H) for n in "qkvo"})
        s.update({f"{p}input_layernorm.weight": 1 + rand(H), f"{p}post_attention_layernorm.weight": 1 + rand(H),
                  f"{p}self_attn.rotary_emb.inv_freq": torch.rand(H // HEADS // 2)})
        if layer in moe_layers:
            s[f"{p}mlp.gate.weight"] = rand(4, H)
            for e in range(4):
                s.update({f"{p}mlp.experts.{e}.gate_proj.weight": rand(I, H),
                          f"{p}mlp.experts.{e}.up_proj.weight": rand(I, H),
                          f"{p}mlp.experts.{e}.down_proj.weight": rand(H, I)})
        else:
            s.update({f"{p}mlp.gate_proj.weight": rand(I, H), f"{p}mlp.up_proj.weight": rand(I, H),
                      f"{p}mlp.down_proj.weight": rand(H, I)})
    s.update(aligner_state() if aligner is None else aligner)
    return s


def save_shards(folder: Path, state: dict[str, torch.Tensor], config: dict, n: int = 2) -> None:
    """pytorch_model-0000i-of-0000n.bin + index json + config.json, as the releases are."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(state)
    weight_map = {}
    for i in range(n):
        name = f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
        part = {k: state[k] for k in keys[i::n]}
        torch.save(part, folder / name)
        weight_map.update({k: name for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))


def save_adapter(folder: Path, modules: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT 0.4 adapter files; returns module -> (A, B)."""
    pairs, state = {}, {}
    for module in modules:
        out_dim, in_dim = (I, H) if module.endswith(("gate_proj", "up_proj")) else (H, I) if module.endswith(
            "down_proj") else (4, H) if module.endswith("mlp.gate") else (H, H)
        pairs[module] = (rand(R, in_dim), rand(out_dim, R))
        state[f"base_model.model.{module}.lora_A.weight"] = pairs[module][0]
        state[f"base_model.model.{module}.lora_B.weight"] = pairs[module][1]
    torch.save(state, folder / "adapter_model.bin")
    (folder / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", r=R, lora_alpha=ALPHA, lora_dropout=0.05, bias="none", fan_in_fan_out=False,
        task_type="CAUSAL_LM", target_modules=modules)))
    return pairs


def merged(weights: dict, pairs: dict) -> dict:
    """Original's merge_and_unload by hand: W + (alpha / r) B @ A."""
    out = dict(weights)
    for module, (a, b) in pairs.items():
        out[f"{module}.weight"] = out[f"{module}.weight"] + (ALPHA / R) * b @ a
    return out


def write_v1_release(
    root: Path, clip: Path, voice: Path, moe_layers: list[int], router_lora: bool, aligner=aligner_state
) -> dict:
    """Base + e2 folders; returns the original's final weights (original names), computed by hand."""
    torch.manual_seed(0)
    base = base_state(moe_layers, aligner())
    save_shards(root / "base", base, llava_config(clip, voice))
    e2 = root / "e2"
    e2.mkdir()
    (e2 / "config.json").write_text(json.dumps(llava_config(clip, voice)))
    modules = [f"model.layers.{l}.self_attn.{n}_proj" for l in range(LAYERS) for n in "qv"]
    modules += [f"model.layers.{l}.mlp.experts.1.up_proj" for l in moe_layers]
    modules += [f"model.layers.{l}.mlp.experts.3.down_proj" for l in moe_layers]
    dense = [l for l in range(LAYERS) if l not in moe_layers]
    modules += [f"model.layers.{l}.mlp.gate_proj" for l in dense]
    modules += [f"model.layers.{l}.mlp.gate" for l in moe_layers] if router_lora else []
    pairs = save_adapter(e2, modules)
    projector = {k: rand(*v.shape) for k, v in base.items() if "mm_projector" in k}
    torch.save({f"base_model.model.{k}": v for k, v in projector.items()}, e2 / "non_lora_trainables.bin")
    aligner = aligner()
    torch.save(aligner, e2 / "mm_audio_aligner.bin")
    gates = {f"model.layers.{l}.mlp.gate.weight": rand(4, H) for l in moe_layers}
    saved_gates = dict(gates)
    for l in moe_layers if router_lora else []:
        saved_gates[f"model.layers.{l}.mlp.gate.lora_A.default.weight"] = pairs[f"model.layers.{l}.mlp.gate"][0]
        saved_gates[f"model.layers.{l}.mlp.gate.lora_B.default.weight"] = pairs[f"model.layers.{l}.mlp.gate"][1]
    torch.save(saved_gates, e2 / "mlp_gates.bin")
    final = merged({**base, **projector}, pairs)
    final.update(aligner)
    final.update(gates)  # after the merge: any router LoRA delta is overwritten (the original's order)
    return final


PROJ = ("gate_proj", "up_proj", "down_proj")


def write_experts_dir(folder, config) -> dict[str, dict[str, torch.Tensor]]:
    """The six dense stage-2 MLP files of the original release, random, as torch pickles."""
    tc = config.text_config
    shapes = {"gate_proj": (tc.intermediate_size, tc.hidden_size), "up_proj": (tc.intermediate_size, tc.hidden_size),
              "down_proj": (tc.hidden_size, tc.intermediate_size)}
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for stem in dict.fromkeys(V2_EXPERT_FILES):
        files[stem] = {V2_MLP_KEY.format(layer=i, proj=p): torch.randn(shapes[p])
                       for i in range(tc.num_hidden_layers) for p in PROJ}
        torch.save(files[stem], folder / f"{stem}.bin")
    return files


def pope_by_hand(predictions: list[str], labels: list[str]) -> tuple[list[float], float]:
    """Per-answer hits and F1 ("yes" positive) written out from POPE's rule, as an oracle for the metric code:
    the text before the first period, commas dropped, split on spaces; "no" iff a word is No / no / not."""
    said = ["no" if {"No", "no", "not"} & set(p.split(".")[0].replace(",", "").split(" ")) else "yes"
            for p in predictions]
    hits = [float(s == label) for s, label in zip(said, labels)]
    tp = sum(s == "yes" and label == "yes" for s, label in zip(said, labels))
    predicted_yes, actual_yes = said.count("yes"), labels.count("yes")
    f1 = 2 * tp / (predicted_yes + actual_yes) if predicted_yes + actual_yes else 0.0
    return hits, f1


def load_file(name: str, path: Path):  # noqa: ANN201 (the module)
    """The Python file at ``path`` imported as module ``name`` (registered in sys.modules, where dataclasses
    look their module up)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def interpreter_env() -> dict[str, str]:
    """This environment for a child process that runs Triton kernels in the interpreter (on the CPU): the
    project first on the path, offline."""
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}


def run_in_triton_interpreter(code: str, timeout: int) -> str:
    """Run a Python snippet in a fresh process with ``TRITON_INTERPRET=1`` (Triton kernels on the CPU) and
    the project on the path; returns its stdout, failing with its output when it exits non-zero."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=interpreter_env(),
                            timeout=timeout, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def torchrun(processes: int) -> list[str]:
    """The start of a command that runs ``processes`` local ranks under torchrun. ``--standalone`` has its
    rendezvous bind a free port itself, so no port is picked beforehand that another process could take first."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]


def without_rank_vars(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """``env`` without the rank and port variables that an in-process test's one-rank world may have set, so a
    launched child starts its own world."""
    return {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
