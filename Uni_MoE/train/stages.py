"""The three training stages as short recipes over shared parts: which model each builds, which
parameters it trains (by name), and what it exports.

Stage 1, alignment: the connectors (speech Q-former decoder + query tokens + projector, audio Q-former +
  query tokens + projector, image projector) train; everything else is frozen.
Stage 2, single-modality expert: PEFT LoRA on every LLM linear layer (attention and MLP) plus the
  projectors; the LoRA is merged and each layer's MLP is written out as an expert base for stage 3.
Stage 3, MoE tuning: a dense base plus stage-2 MLPs as expert bases; routers, each expert's built-in
  LoRA, PEFT LoRA on attention (and on the MLPs of layers left dense) and the projectors train; encoders,
  Q-formers and expert bases stay frozen.
Every stage's final output is a plain ``save_pretrained`` folder: PEFT LoRA is merged before saving.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..checkpoint.io import load_state_dict
from ..checkpoint.loader import load_checkpoint
from ..checkpoint.v2_experts import load_v2_expert_bases
from ..config import UniMoEConfig
from ..model.moe.deepspeed_backend import DeepSpeedMoELayer, init_deepspeed_comm, local_layout_state_dict
from ..model.uni_moe import UniMoEForCausalLM
from ..processing_uni_moe import UniMoEProcessor
from .arguments import ModelArguments, TrainingArguments
from .lora_linear import fuse_lora

logger = logging.getLogger(__name__)

EXPERT_MLPS_FILE = "expert_mlps.safetensors"
ADAPTER_DIR = "adapter"
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

# Parameter groups by name (names as in UniMoEForCausalLM, after PEFT injection). An aligner is a voice
# connector: query tokens, Q-former and projector (the original's mm_audio_aligner).
GROUPS: dict[str, str] = {
    "mm_projector": r"^model\.mm_projector\.",
    "speech_aligner": r"^model\.speech_aligner\.",
    "audio_aligner": r"^model\.audio_aligner\.",
    "aligner_projectors": r"^model\.(speech|audio)_aligner\.projector\.",
    "routers": r"\.mlp\.(router|moe\.deepspeed_moe\.gate\.wg)\.weight$",
    "expert_lora": r"\.mlp\.(experts|moe\.deepspeed_moe\.experts\.deepspeed_experts\.\d+)\.(gate|up|down)_lora_[AB]$",
    "peft_lora": r"\.lora_[AB]\.",
    "llm": r"^(model\.language_model\.|lm_head\.)",
    "lm_head": r"^lm_head\.",
}
# Stage 1's connector files (named as the original's) and the modules each holds.
CONNECTOR_FILES: dict[str, tuple[str, ...]] = {
    "mm_projector": ("mm_projector.",),
    "mm_audio_aligner": ("speech_aligner.", "audio_aligner."),
}
DENSE_OVERRIDES = ("mm_projector_type", "mm_vision_select_layer", "mm_vision_select_feature")


@dataclass
class Recipe:
    """What a stage trains: parameter groups (keys of GROUPS) and, if any, PEFT LoRA target modules."""

    stage: int
    groups: list[str]
    lora_targets: list[str] = field(default_factory=list)

    def trains(self, name: str) -> bool:
        return any(re.search(GROUPS[g], name) for g in self.groups)


def llm_linear_names(model: UniMoEForCausalLM) -> list[str]:
    """Full names of the LLM's nn.Linear layers (attention, and MLPs of dense layers), routers excluded.

    MoE experts are stacked nn.Parameters, not nn.Linear, so they are never PEFT targets; nor is the
    DeepSpeed-MoE gate (``.mlp.moe.``)."""
    return [
        name
        for name, module in model.named_modules()
        if name.startswith("model.language_model.") and isinstance(module, nn.Linear)
        and ".mlp.router" not in name and ".mlp.moe." not in name
    ]


def _flag(value: bool | None, default: bool) -> bool:
    return default if value is None else value


def make_recipe(model: UniMoEForCausalLM, model_args: ModelArguments, train_args: TrainingArguments) -> Recipe:
    """The stage's trainable groups, honouring the original's ``--tune_*`` and ``--llm_lora_enable`` flags."""
    stage = model_args.stage
    full_llm = model_args.train_full_llm
    if full_llm and stage == 3:
        raise ValueError("--train_full_llm applies to stages 1 and 2; stage 3 keeps the expert bases frozen")
    groups: list[str] = []
    if _flag(model_args.tune_mm_mlp_adapter, True):
        groups.append("mm_projector")
    if _flag(model_args.tune_mm_audio_aligner, stage == 1):
        groups += ["speech_aligner", "audio_aligner"]
    elif _flag(model_args.tune_mm_audio_projector, True):
        groups.append("aligner_projectors")
    if stage == 3:
        if not model.moe_mlps():
            raise ValueError(f"stage 3 needs a MoE model, but {model_args.model_name_or_path} built none")
        groups += ["routers", "expert_lora"]
    lora = _flag(train_args.llm_lora_enable, stage > 1) and not full_llm
    if full_llm:
        groups.append("llm")
    elif model_args.train_lm_head:
        groups.append("lm_head")
    if lora:
        groups.append("peft_lora")
    return Recipe(stage, groups, llm_linear_names(model) if lora else [])


def apply_moe_recompute(model: UniMoEForCausalLM, train_args: TrainingArguments) -> bool:
    """``--moe_recompute``: the experts recompute their gate/up activations in backward; ignored (with a
    warning) under gradient checkpointing, which recomputes every layer anyway. Returns whether it is on."""
    if not train_args.moe_recompute:
        return False
    if train_args.gradient_checkpointing:
        logger.warning("--moe_recompute is ignored under --gradient_checkpointing, which recomputes every layer")
        return False
    model.moe_recompute_enable()
    return True


def apply_recipe(model: UniMoEForCausalLM, recipe: Recipe, train_args: TrainingArguments) -> list[str]:
    """Inject PEFT LoRA (if the recipe has targets) and set ``requires_grad`` by name; returns the trained names."""
    model.requires_grad_(False)
    if recipe.lora_targets:
        config = LoraConfig(
            r=train_args.lora_r,
            lora_alpha=train_args.lora_alpha,
            lora_dropout=train_args.lora_dropout,
            bias="none",
            target_modules=recipe.lora_targets,
        )
        inject_adapter_in_model(config, model)
        fuse_lora(model)
        model.lora_config = config
    trained = []
    for name, param in model.named_parameters():
        param.requires_grad = recipe.trains(name)
        if param.requires_grad:
            trained.append(name)
    if not trained:
        raise ValueError(f"stage {recipe.stage} trains nothing (groups {recipe.groups})")
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    logger.warning(
        "stage %d trains %s: %d tensors, %.2fM of %.2fM parameters",
        recipe.stage, ", ".join(recipe.groups), len(trained), n_train / 1e6, n_all / 1e6,
    )
    return trained


# ---------------------------------------------------------------- building each stage's model


def _overrides(model_args: ModelArguments) -> dict:
    return {k: getattr(model_args, k) for k in DENSE_OVERRIDES if getattr(model_args, k) is not None}


def _moe_overrides(model_args: ModelArguments, config: UniMoEConfig) -> dict:
    out = {"expert_lora_r": model_args.expert_lora_r, "expert_lora_alpha": model_args.expert_lora_alpha}
    if model_args.num_experts is not None:
        out["num_experts"] = model_args.num_experts
    if model_args.num_experts_per_tok is not None:
        out["num_experts_per_tok"] = model_args.num_experts_per_tok
    if model_args.aux_balance_loss_coef is not None:
        out["aux_balance_loss_coef"] = model_args.aux_balance_loss_coef
    layers = model_args.moe_layers
    if layers is not None:
        out["moe_layers"] = [int(i) for i in layers.split(",")] if layers[:1].isdigit() else layers
    elif not config.moe_layer_indices():
        out["moe_layers"] = "all"
    return out


def _backend_overrides(model_args: ModelArguments, config: UniMoEConfig) -> dict:
    """``--enable_deepspeed_moe``: DeepSpeed-MoE experts over ``--ep_size`` ranks (default: the config's)."""
    if not model_args.enable_deepspeed_moe:
        return {}
    if model_args.stage != 3:
        raise ValueError("--enable_deepspeed_moe applies to stage 3 (the MoE stage)")
    if not torch.distributed.is_initialized():  # the layers create their expert-parallel groups when built
        init_deepspeed_comm()
    return {"moe_backend": "deepspeed", "ep_size": model_args.ep_size or config.ep_size}


def build_model(model_args: ModelArguments) -> UniMoEForCausalLM:
    """The model a stage starts from: the checkpoint itself (stages 1, 2), or a MoE model made from a dense
    base and stage-2 MLPs (stage 3; a checkpoint that already is MoE is continued as it is); in stage 3
    ``--mlp_dir`` then replaces the expert bases with the original v2 Experts files."""
    path = model_args.model_name_or_path
    config = UniMoEConfig.from_pretrained(path)
    backend = _backend_overrides(model_args, config)
    if model_args.stage in (1, 2):
        if config.moe_layer_indices():
            raise ValueError(f"stage {model_args.stage} trains a dense model, but {path} has MoE layers")
        return load_checkpoint(path, **_overrides(model_args))
    if config.moe_layer_indices() and model_args.expert_dirs:
        raise ValueError(f"--expert_dirs needs a dense base, but {path} already has MoE layers")
    if config.moe_layer_indices():
        model = load_checkpoint(path, ep_size=backend.get("ep_size"), **_overrides(model_args))
    else:
        overrides = {**_overrides(model_args), **_moe_overrides(model_args, config), **backend}
        model = upcycle(path, model_args.expert_dirs, overrides)
    if model_args.mlp_dir:
        load_v2_expert_bases(model, model_args.mlp_dir)
    return model


def upcycle(base: str, expert_dirs: list[str], overrides: dict) -> UniMoEForCausalLM:
    """A MoE model: every weight from the dense ``base`` except the MoE layers, whose expert bases are the
    MLPs of ``expert_dirs`` in order (cycled when there are fewer dirs than experts)."""
    model, info = UniMoEForCausalLM.from_pretrained(base, output_loading_info=True, **overrides)
    unexpected_missing = [k for k in info["missing_keys"] if not re.search(r"\.mlp\.(router|experts|moe)\.", k)]
    if unexpected_missing:
        raise KeyError(f"{base}: weights missing for {unexpected_missing[:5]} (of {len(unexpected_missing)})")
    dirs = list(expert_dirs) or [base]
    if not expert_dirs:
        logger.warning("no --expert_dirs: every expert starts from the base MLP of %s", base)
    layers = model.config.moe_layer_indices()
    bases = model.config.num_experts if model.config.expert_type == "mlp" else 1
    if len(dirs) < bases:
        logger.warning("%d expert dirs for %d experts: cycling them (expert j uses dir j mod %d)",
                       len(dirs), bases, len(dirs))
    elif len(dirs) > bases:
        logger.warning("%d expert dirs for %d expert bases: the last %d are unused", len(dirs), bases,
                       len(dirs) - bases)
    mlps = [read_dense_mlps(d, layers) for d in dirs[:bases]]
    std = getattr(model.config.text_config, "initializer_range", 0.02)
    for layer, moe in zip(layers, model.moe_mlps()):
        # initialised here: the checkpoint has no router or expert LoRA, and loading does not promise to
        per_base = [mlps[j % len(mlps)][layer] for j in range(bases)]
        if isinstance(moe, DeepSpeedMoELayer):
            moe.reset_parameters(std)
            moe.load_dense_mlps(per_base)
            continue
        with torch.no_grad():
            moe.router.weight.normal_(0.0, std)
        moe.experts.reset_parameters(std)
        moe.experts.load_dense_mlps(per_base)
    return model


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = folder / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{folder}: no {EXPERT_MLPS_FILE}, model.safetensors or its index")
    return [single]


def read_dense_mlps(folder: str | Path, layers: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """Per layer, the dense MLP state dict (``gate_proj.weight`` ...) of a stage-2 output (or any dense
    checkpoint): from its ``expert_mlps.safetensors`` when present, else from its model weights."""
    folder = Path(folder)
    own = folder / EXPERT_MLPS_FILE
    files, prefix = ([own], "layers.{}.") if own.exists() else (_weight_files(folder), "model.language_model.layers.{}.mlp.")
    wanted = {prefix.format(i) + f"{p}.weight": (i, f"{p}.weight") for i in layers for p in MLP_PROJECTIONS}
    out: dict[int, dict[str, torch.Tensor]] = {i: {} for i in layers}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in wanted.keys() & set(f.keys()):
                layer, name = wanted[key]
                out[layer][name] = f.get_tensor(key)
    missing = [k for k, (i, n) in wanted.items() if n not in out[i]]
    if missing:
        raise KeyError(f"{folder}: no dense MLP weight {missing[0]} ({len(missing)} missing); is it a dense checkpoint?")
    return out


def load_connector_weights(model: UniMoEForCausalLM, path: str, kind: str) -> int:
    """Load a stage-1 connector file of ``kind`` (a CONNECTOR_FILES key: ``mm_projector`` for
    ``--pretrain_mm_mlp_adapter``, ``mm_audio_aligner`` for ``--pretrain_audio_aligner``, speech and sound
    aligners alike); keys may carry any prefix before the connector's module name."""
    state = load_state_dict(path)
    anchors = CONNECTOR_FILES[kind]
    own = dict(model.named_parameters())
    mapped = {}
    for key, value in state.items():
        anchor = next((a for a in anchors if a in key), None)
        if anchor is not None:
            mapped["model." + anchor + key.split(anchor, 1)[1]] = value
    unknown = [k for k in mapped if k not in own]
    if not mapped or unknown:
        raise KeyError(
            f"{path}: keys do not fit this model's {'/'.join(anchors)} (unmatched: {(unknown or list(state))[:3]}); "
            "weights of the original release go through the checkpoint converter first"
        )
    with torch.no_grad():
        for key, value in mapped.items():
            own[key].copy_(value)
    return len(mapped)


# ---------------------------------------------------------------- export


def merge_lora(model: nn.Module) -> int:
    """Merge every PEFT LoRA layer into its base nn.Linear and put the plain layer back; returns the count."""
    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
            merged += 1
    for attr in ("peft_config", "lora_config"):
        if hasattr(model, attr):
            delattr(model, attr)
    return merged


def save_adapter(model: nn.Module, out: Path) -> None:
    """PEFT-style ``adapter_model.safetensors`` + ``adapter_config.json`` of the (unmerged) LoRA, in a
    subfolder: an adapter config beside the weights would make ``from_pretrained`` load the folder as one."""
    config: LoraConfig | None = getattr(model, "lora_config", None)
    if config is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    state = {
        "base_model.model." + name.replace(".default.", "."): p.detach().contiguous().cpu()
        for name, p in model.named_parameters()
        if re.search(GROUPS["peft_lora"], name)
    }
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(out))


def save_expert_mlps(model: UniMoEForCausalLM, out: Path) -> None:
    """Each dense layer's (merged) MLP as ``layers.{i}.{gate,up,down}_proj.weight``: stage 3's expert bases."""
    state = {}
    for i, layer in enumerate(model.model.language_model.layers):
        for p in MLP_PROJECTIONS:
            proj = getattr(layer.mlp, p, None)
            if isinstance(proj, nn.Linear):
                state[f"layers.{i}.{p}.weight"] = proj.weight.detach().contiguous().cpu()
    save_file(state, str(out / EXPERT_MLPS_FILE), metadata={"format": "pt"})


def save_connectors(model: UniMoEForCausalLM, out: Path) -> None:
    """Stage 1's connector weights on their own, for ``--pretrain_mm_mlp_adapter`` / ``--pretrain_audio_aligner``."""
    for kind, modules in CONNECTOR_FILES.items():
        prefixes = tuple(f"model.{m}" for m in modules)
        state = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if n.startswith(prefixes)}
        if state:
            save_file(state, str(out / f"{kind}.safetensors"), metadata={"format": "pt"})


def save_local_layout(model: UniMoEForCausalLM, out: Path, state: dict[str, torch.Tensor]) -> None:
    """``save_pretrained`` in the local backend's layout and config, which loads anywhere; expert-parallel
    runs load it back with ``from_pretrained_expert_parallel``."""
    backend = model.config.moe_backend
    model.config.moe_backend = "local"
    try:
        model.save_pretrained(out, state_dict=state)
    finally:
        model.config.moe_backend = backend


def export(model: UniMoEForCausalLM, stage: int, out: str | Path, tokenizer=None, is_main: bool = True) -> Path:
    """Write the stage's final output: adapter files (``adapter/``), then the LoRA-merged model as a plain
    ``save_pretrained`` folder (+ stage 1's connector files, stage 2's expert MLPs)."""
    out = Path(out)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_adapter(model, out / ADAPTER_DIR)
    merge_lora(model)
    state = local_layout_state_dict(model)  # a collective under expert parallelism: every rank joins
    if not is_main:
        return out
    save_local_layout(model, out, state)
    if tokenizer is not None:
        UniMoEProcessor.from_config(model.config, tokenizer).save_pretrained(out)
    if stage == 1:
        save_connectors(model, out)
    if stage == 2:
        save_expert_mlps(model, out)
    return out
