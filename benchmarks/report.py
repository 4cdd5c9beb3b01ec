"""What every benchmark's results table needs: the device's name, printing and writing the table, and the
relative difference of two results. Kept free of the model and data stack so that kernel benchmarks stay light."""

from __future__ import annotations

import argparse

import torch


def device_name(device: torch.device) -> str:
    """The GPU's name for a results table, or "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def emit_table(text: str, out: str | None) -> None:
    """Print a results table and, given ``--out``, write it there (UTF-8: the tables hold "×" and "≤")."""
    print(text, flush=True)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)


def relative_difference(reference: object, other: object) -> float:
    """max |other - reference| / max |reference| in float32, over one tensor or the pairs of two sequences of them."""
    pairs = list(zip(reference, other)) if isinstance(reference, (tuple, list)) else [(reference, other)]
    return max(((y.float() - x.float()).abs().max() / x.float().abs().max().clamp_min(1e-30)).item()
               for x, y in pairs)


def timing_parser(doc: str, reps: int, settle: float) -> argparse.ArgumentParser:
    """The options of a timing script that compares two ways: ``--smoke`` (tiny shapes on the CPU), ``--reps``,
    ``--settle`` (seconds each way runs before it is timed) and ``--out``; ``doc`` is the script's docstring."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--reps", type=int, default=reps)
    parser.add_argument("--settle", type=float, default=settle, help="seconds each way runs before it is timed")
    parser.add_argument("--out", help="write the markdown table here")
    return parser
