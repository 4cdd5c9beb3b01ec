"""Checkpoint loading for the v2 / expert-parallel edition.

- ``load_v2_expert_bases``: the original v2 Experts directory (``--mlp_dir``: six dense stage-2 MLP
  files, ``model.layers.L.mlp.{gate,up,down}_proj.weight``) into the frozen expert bases of a model,
  with the original's global expert -> file map; under expert parallelism each rank reads only the
  files of the experts it holds.
- ``from_pretrained_expert_parallel``: one of our checkpoints (local layout) into a model whose MoE
  layers are DeepSpeed-MoE layers, each rank keeping its experts. transformers' ``from_pretrained``
  sets parameters by name and so cannot split stacked experts across ranks; ``load_state_dict``
  runs the layers' own hooks, which do.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import UniMoEConfig
from ..model.moe import MoELayer
from ..model.moe.deepspeed_backend import BASE_NAMES, DeepSpeedMoELayer
from ..model.uni_moe import UniMoEForCausalLM
from .io import iter_state_dicts, load_state_dict

V2_EXPERT_FILES = ("mlp_audiocap", "mlp_basev", "mlp_base", "mlp_base1", "mlp_base4", "mlp_base7", "mlp_base", "mlp_base7")
V2_MLP_KEY = "model.layers.{layer}.mlp.{proj}.weight"


def moe_mlps_by_index(model: nn.Module) -> dict[int, MoELayer | DeepSpeedMoELayer]:
    """Decoder-layer index -> MoE MLP module, for either backend."""
    found = {}
    for name, module in model.named_modules():
        match = re.search(r"layers\.(\d+)\.mlp$", name)
        if match and isinstance(module, (MoELayer, DeepSpeedMoELayer)):
            found[int(match.group(1))] = module
    return found


def _expert_bases(layer: MoELayer | DeepSpeedMoELayer, expert: int) -> dict[str, torch.Tensor] | None:
    """Views of global expert ``expert``'s base weights, by projection name; None if not on this rank."""
    if isinstance(layer, DeepSpeedMoELayer):
        local = layer.local_expert(expert)
        return None if local is None else {p: getattr(local, p)[0] for p in BASE_NAMES}
    if layer.experts.expert_type != "mlp":
        raise ValueError("v2 experts each have their own base MLP; this model has expert_type="
                         f"{layer.experts.expert_type!r}")
    return {p: getattr(layer.experts, p)[expert] for p in BASE_NAMES}


@torch.no_grad()
def load_v2_expert_bases(model: nn.Module, mlp_dir: str | Path) -> list[int]:
    """Copy ``mlp_dir/<V2_EXPERT_FILES[e]>.bin`` into expert e's base in every MoE layer of ``model``.

    Returns the global experts filled on this rank. A missing file, key or shape mismatch raises an
    error naming the file and key; LoRA and routers are left as they are.
    """
    mlp_dir = Path(mlp_dir)
    layers = moe_mlps_by_index(model)
    if not layers:
        raise ValueError("the model has no MoE layers to load v2 experts into")
    num_experts = next(iter(layers.values())).num_experts
    if num_experts != len(V2_EXPERT_FILES):
        raise ValueError(f"the v2 Experts directory fills {len(V2_EXPERT_FILES)} experts; the model has {num_experts}")
    targets = {e: {i: _expert_bases(layer, e) for i, layer in layers.items()} for e in range(num_experts)}
    filled = [e for e, per_layer in targets.items() if any(v is not None for v in per_layer.values())]
    for stem in dict.fromkeys(V2_EXPERT_FILES[e] for e in filled):
        path = mlp_dir / f"{stem}.bin"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: v2 expert file not found (experts "
                                    f"{[e for e in filled if V2_EXPERT_FILES[e] == stem]})")
        state = load_state_dict(path, mmap=True)
        for e in (e for e in filled if V2_EXPERT_FILES[e] == stem):
            for i, bases in targets[e].items():
                for proj, dest in (bases or {}).items():
                    key = V2_MLP_KEY.format(layer=i, proj=proj)
                    if key not in state:
                        raise KeyError(f"{path}: no '{key}' (needed by expert {e} of layer {i})")
                    if state[key].shape != dest.shape:
                        raise ValueError(f"{path}: '{key}' has shape {tuple(state[key].shape)}; expert {e} of "
                                         f"layer {i} expects {tuple(dest.shape)}")
                    dest.copy_(state[key])
        del state
    return filled


def from_pretrained_expert_parallel(
    model_dir: str | Path, ep_size: int, dtype: torch.dtype | None = None, **config_overrides: Any
) -> UniMoEForCausalLM:
    """Build our model with the deepspeed MoE backend at ``ep_size`` and load ``model_dir`` into it,
    shard by shard; every key must be found. Call on every rank (the layers create EP groups)."""
    config = UniMoEConfig.from_pretrained(model_dir, **config_overrides)
    config.moe_backend, config.ep_size = "deepspeed", ep_size
    model = UniMoEForCausalLM._from_config(config, dtype=dtype)
    missing: set[str] | None = None
    unexpected: set[str] = set()
    for path, shard in iter_state_dicts(model_dir):
        result = model.load_state_dict(shard, strict=False)
        missing = set(result.missing_keys) if missing is None else missing & set(result.missing_keys)
        unexpected |= {f"{path.name}: {k}" for k in result.unexpected_keys}
    if missing or unexpected:
        raise KeyError(f"{model_dir}: missing {sorted(missing or ())[:10]}, unexpected {sorted(unexpected)[:10]}")
    return model.eval()
