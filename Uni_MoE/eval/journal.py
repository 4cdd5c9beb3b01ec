"""The partial predictions file of an eval run: what is generated is kept as it is generated, so a run that
dies loses at most the batch in flight, and a rerun continues where it stopped.

``<output stem>.partial.jsonl`` beside the predictions file holds one JSON line of settings (model, data,
data type, decoding, seed), then one line per finished generation: ``{"n": position, "id": id,
"prediction": text}``, or ``"error"`` instead of ``"prediction"`` when it failed. Lines are appended a batch
at a time with one write, flushed and fsynced. A rerun with other settings is refused (``--overwrite``
starts over); a line cut short by a kill is dropped; a failed generation is tried again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SUFFIX = ".partial.jsonl"


class JournalError(ValueError):
    """A partial file that does not belong to this run; the message names it and the difference."""


def journal_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.stem + SUFFIX)


def _plain(data: Any) -> Any:
    """``data`` as JSON gives it back (tuples become lists), so saved and current settings compare equal."""
    return json.loads(json.dumps(data, default=str))


class Journal:
    """An open partial file: the generations it already holds (``done``: position -> prediction) and an
    append method for new ones."""

    def __init__(self, path: Path, settings: dict[str, Any], ids: list[str], overwrite: bool = False) -> None:
        self.path = path
        self.settings = _plain(settings)
        self.done: dict[int, str] = {}
        if overwrite:
            path.unlink(missing_ok=True)
        if path.is_file():
            self._read(ids)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._append([self.settings])
        self.resumed = len(self.done)

    def _read(self, ids: list[str]) -> None:
        raw = self.path.read_bytes()
        complete = raw[: raw.rfind(b"\n") + 1]
        if len(complete) < len(raw):  # the last line was cut by a kill: drop it
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
        lines = complete.decode("utf-8").splitlines()
        if not lines:
            self._append([self.settings])
            return
        saved = json.loads(lines[0])
        changed = [k for k in sorted(set(saved) | set(self.settings)) if saved.get(k) != self.settings.get(k)]
        if changed:
            key = changed[0]
            raise JournalError(f"{self.path} was written with other settings ({key}: {saved.get(key)!r}, now "
                               f"{self.settings.get(key)!r}); pass --overwrite to start over, or another --output")
        for number, line in enumerate(lines[1:], start=2):
            row = json.loads(line)
            n = row["n"]
            if n >= len(ids):  # beyond a smaller --limit: not part of this run
                continue
            if row["id"] != ids[n]:
                raise JournalError(f"{self.path} line {number}: generation {n} is id {row['id']}, the data now has "
                                   f"{ids[n]}; the data file changed: pass --overwrite to start over")
            if "prediction" in row:
                self.done[n] = row["prediction"]

    def _append(self, rows: list[dict[str, Any]]) -> None:
        data = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows).encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)

    def record(self, rows: list[dict[str, Any]]) -> None:
        """Append finished generations (``{"n", "id", "prediction" | "error"}``) in one write, then fsync."""
        if rows:
            self._append(rows)
            self.done.update({r["n"]: r["prediction"] for r in rows if "prediction" in r})

    def remove(self) -> None:
        """Delete the file once the final predictions are written."""
        self.path.unlink(missing_ok=True)
