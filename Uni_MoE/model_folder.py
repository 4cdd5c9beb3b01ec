"""The one check every entry point makes on a model path before anything reads it: it must be a local
folder. transformers treats a path that does not exist as a hub id and reports a failed download; this
project never downloads, so a typo'd path gets one line naming it instead."""

from __future__ import annotations

from pathlib import Path


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
