"""The one check every entry point makes on a model path before anything reads it: it must be a local
folder. transformers treats a path that does not exist as a hub id and reports a failed download; this
project never downloads, so a typo'd path gets one line naming it instead."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class ModelFolderError(FileNotFoundError):
    """A model path that is not a folder; the message is one line naming it."""

    def __str__(self) -> str:
        return f"no such model folder: {self.filename}"


def require_model_folder(path: str | Path) -> Path:
    """``path`` as a Path when it is an existing folder, else ModelFolderError ("no such model folder: PATH")."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelFolderError(2, "no such model folder", str(path))
    return folder


def config_and_tokenizer(path: str | Path) -> tuple[Any, Any] | None:
    """A folder's UniMoEConfig and tokenizer without its weights, enough to check data before the model loads;
    None for an original release folder, whose config exists only once it is converted."""
    from .checkpoint.original_config import ORIGINAL_MODEL_TYPES
    from .config import UniMoEConfig
    from .data.tokenizer import load_tokenizer

    folder = require_model_folder(path)
    config_file = folder / "config.json"
    if config_file.is_file() and json.loads(config_file.read_text()).get("model_type") in ORIGINAL_MODEL_TYPES:
        return None
    return UniMoEConfig.from_pretrained(str(folder)), load_tokenizer(folder)
