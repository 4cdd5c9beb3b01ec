"""One loader for every checkpoint folder the package reads, called by the CLI, eval, the training
stages and the demo:

- our ``save_pretrained`` folders (transformers' ``from_pretrained``);
- an original Uni-MoE release (a llava config), converted in memory as the original's
  ``load_pretrained_model(model_path, model_base)`` loads it; ``release`` names its other parts;
- expert parallelism (``ep_size``, or ``moe_backend="deepspeed"``): our folder loaded into DeepSpeed-MoE
  layers, each rank keeping its share of the experts.

v2 expert files (``--mlp_dir``) are one of a release's parts (``experts_dir``), or, for a stage-3 start,
loaded into a built model by :func:`Uni_MoE.checkpoint.v2_experts.load_v2_expert_bases`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from ..config import ORIGINAL_MODEL_TYPES, UniMoEConfig, is_original_release, saved_config, saved_with_experts
from ..data.tokenizer import load_tokenizer
from ..model.uni_moe import UniMoEForCausalLM
from ..model_folder import require_model_folder
from .convert_original import TOKENIZER_FILES, load_original
from .v2_experts import from_pretrained_expert_parallel

RELEASE_PARTS = ("model_base", "experts_dir", "clip_dir", "whisper_dir", "beats_path")


def load_checkpoint(
    path: str | Path,
    dtype: torch.dtype | None = None,
    ep_size: int | None = None,
    release: dict[str, Any] | None = None,
    **config_overrides: Any,
) -> UniMoEForCausalLM:
    """The model stored in ``path`` (any folder kind above); ``dtype`` None keeps the saved one.

    ``release`` (original releases only): ``model_base`` (the base release ``path`` fine-tunes),
    ``experts_dir`` (v2/8e Experts directory), ``clip_dir``, ``whisper_dir``, ``beats_path``, and
    ``strict``. ``ep_size`` (or ``moe_backend="deepspeed"`` among the overrides, on a checkpoint with
    experts) builds DeepSpeed-MoE layers: torch.distributed must be initialised, and every rank must call.
    ``config_overrides`` replace fields of the saved config.
    """
    release = {k: v for k, v in (release or {}).items() if v is not None}
    saved = saved_config(require_model_folder(path))
    if saved.get("model_type") in ORIGINAL_MODEL_TYPES:
        given = sorted(config_overrides) + (["ep_size"] if ep_size is not None else [])
        if given:
            raise ValueError(f"{path}: an original release loads as released; convert it first "
                             f"(python -m Uni_MoE.checkpoint.convert_original) to load it with {given}")
        return _load_release(path, dtype, release)
    if release:
        raise ValueError(f"{path} is not an original release (no llava config.json); release parts "
                         f"{sorted(release)} apply to original releases only")
    wants_ep = ep_size is not None or config_overrides.get("moe_backend", saved.get("moe_backend")) == "deepspeed"
    if wants_ep and saved_with_experts(saved):
        ep = ep_size if ep_size is not None else config_overrides.get("ep_size", saved.get("ep_size", 1))
        return from_pretrained_expert_parallel(path, ep, dtype=dtype, **config_overrides)
    if ep_size is not None:
        config_overrides.update(moe_backend="deepspeed", ep_size=ep_size)
    return UniMoEForCausalLM.from_pretrained(str(path), dtype=dtype if dtype is not None else "auto",
                                             **config_overrides)


def _load_release(path: str | Path, dtype: torch.dtype | None, release: dict[str, Any]) -> UniMoEForCausalLM:
    """An original release converted in memory, as the original's ``load_pretrained_model(model_path,
    model_base)``: with ``model_base``, ``path`` is the fine-tuned folder over that base."""
    unknown = sorted(set(release) - set(RELEASE_PARTS) - {"strict"})
    if unknown:
        raise TypeError(f"unknown release parts {unknown}; expected some of {RELEASE_PARTS + ('strict',)}")
    base = release.pop("model_base", None)
    return load_original(base or path, path if base else None, **release,
                         **({"dtype": dtype} if dtype is not None else {}))


def config_and_tokenizer(path: str | Path) -> tuple[UniMoEConfig, PreTrainedTokenizerBase] | None:
    """A folder's UniMoEConfig and tokenizer without its weights, enough to check data before the model loads;
    None for an original release folder, whose config exists only once it is converted."""
    folder = require_model_folder(path)
    if is_original_release(folder):
        return None
    return UniMoEConfig.from_pretrained(str(folder)), load_tokenizer(folder)


def tokenizer_folder(folders: Sequence[str | Path | None]) -> Path:
    """The first folder that holds tokenizer files (an original fine-tuned release may have none)."""
    found = [Path(f) for f in folders if f is not None and any((Path(f) / n).is_file() for n in TOKENIZER_FILES)]
    if not found:
        named = [str(f) for f in folders if f]
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {named}")
    return found[0]


def load_model(
    model_path: str | Path,
    device: str | None = None,
    dtype: str | None = None,
    ep_size: int | None = None,
    release: dict[str, Any] | None = None,
) -> tuple[UniMoEForCausalLM, PreTrainedTokenizerBase]:
    """Model (eval mode, on ``device``: default cuda when available) and tokenizer, for inference.

    ``dtype`` by name ("bfloat16" ...; None or "auto" keeps the saved one); ``ep_size`` and ``release``
    as :func:`load_checkpoint` takes them.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = None if dtype in (None, "auto") else getattr(torch, dtype)
    model = load_checkpoint(model_path, torch_dtype, ep_size, release)
    base = (release or {}).get("model_base") if is_original_release(model_path) else None
    return model.to(device).eval(), load_tokenizer(tokenizer_folder([model_path, base]))
