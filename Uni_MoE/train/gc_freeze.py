"""Keeps Python's garbage collector from walking the model, the optimizer and the training samples.

A full (generation 2) collection visits every tracked object. After building a 7B-wide model, DeepSpeed's
engine and a sample list, that is millions of objects: one such collection measured 250 ms on the host in a
4-layer benchmark (benchmarks/results/expert_parallel_h200_2gpu.md), and it comes at a random step. A step
whose GPU waits on the host (an expert-parallel count exchange, a small batch) loses that time whole.
:func:`freeze_host_objects` collects once and moves everything alive into the collector's permanent
generation (``gc.freeze``), so later collections only visit what training makes. Freezing before the data
loader forks its workers also keeps the collector from writing to the shared sample pages.
"""

from __future__ import annotations

import gc

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments


def freeze_host_objects() -> int:
    """Collect, then exempt every surviving object from later collections; returns how many are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class GcFreezeCallback(TrainerCallback):
    """Freezes the objects alive when training begins (after the engine, optimizer and data loader are
    built, before its workers start), and unfreezes them at the end so the finished run can be freed."""

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        freeze_host_objects()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        gc.unfreeze()
