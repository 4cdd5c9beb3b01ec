"""Read a PEFT LoRA adapter folder as the original saved it (PEFT 0.4) and compute merged deltas.

Keys are ``base_model.model.<module>.lora_{A,B}.weight`` (newer PEFT adds ``.default``); merging
adds ``(lora_alpha / r) * B @ A`` to ``<module>.weight``, exactly what ``merge_and_unload`` does.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .io import load_state_dict

_LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass
class LoraAdapter:
    """LoRA pairs by original module name, with the adapter's scaling and the keys it could not parse
    (``unmatched``) or whose A and B do not fit together (``mismatched``, left out of ``pairs``)."""

    scaling: float
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    unmatched: list[str]
    path: Path
    mismatched: list[str] = field(default_factory=list)

    def delta(self, module: str) -> torch.Tensor:
        """fp32 ``scaling * B @ A`` for ``module`` ([out, in], nn.Linear layout)."""
        lora_a, lora_b = self.pairs[module]
        return self.scaling * (lora_b.float() @ lora_a.float())

    def delta_shape(self, module: str) -> tuple[int, int]:
        """The shape of ``delta(module)`` without computing it."""
        lora_a, lora_b = self.pairs[module]
        return lora_b.shape[0], lora_a.shape[1]


def find_adapter_file(folder: str | Path) -> Path | None:
    """The adapter weights file of ``folder``, or None when the folder has no adapter."""
    for name in ADAPTER_FILES:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def read_adapter(folder: str | Path) -> LoraAdapter:
    """Parse ``adapter_config.json`` and the adapter weights of ``folder``."""
    folder = Path(folder)
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found (needed with the adapter weights)")
    cfg = json.loads(config_path.read_text())
    if cfg.get("fan_in_fan_out"):
        raise ValueError(f"{config_path}: fan_in_fan_out=true is not used by Uni-MoE releases and is unsupported")
    if cfg.get("use_rslora") or cfg.get("use_dora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"{config_path}: rsLoRA / DoRA / per-module ranks are not used by Uni-MoE releases")
    path = find_adapter_file(folder)
    if path is None:
        raise FileNotFoundError(f"{folder}: no {' or '.join(ADAPTER_FILES)}")
    halves: dict[str, dict[str, torch.Tensor]] = {}
    unmatched = []
    for key, value in load_state_dict(path).items():
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            unmatched.append(f"{path.name}: {key} {tuple(value.shape)}")
            continue
        halves.setdefault(match.group(1), {})[match.group(2)] = value
    pairs, mismatched = {}, []
    for module, ab in halves.items():
        if set(ab) != {"A", "B"}:
            unmatched.append(f"{path.name}: {module} has lora_{''.join(ab)} without its partner")
            continue
        problem = _rank_problem(ab["A"], ab["B"], int(cfg["r"]))
        if problem:
            mismatched.append(f"{path.name}: {module}: {problem}")
            continue
        pairs[module] = (ab["A"], ab["B"])
    return LoraAdapter(float(cfg["lora_alpha"]) / float(cfg["r"]), pairs, unmatched, path, mismatched)


def _rank_problem(lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int) -> str | None:
    """Why A [r, in] and B [out, r] cannot form a rank-``rank`` LoRA, or None when they can."""
    shapes = f"lora_A {tuple(lora_a.shape)}, lora_B {tuple(lora_b.shape)}"
    if lora_a.dim() != 2 or lora_b.dim() != 2:
        return f"{shapes}: expected 2-D matrices"
    if lora_a.shape[0] != rank or lora_b.shape[1] != rank:
        return f"{shapes}: ranks {lora_a.shape[0]} and {lora_b.shape[1]}, adapter_config.json says r={rank}"
    return None
