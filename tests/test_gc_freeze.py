"""The training run's garbage-collector freeze: objects alive at the start of training are exempt from
collections until training ends."""

from __future__ import annotations

import gc
import weakref

from transformers import TrainerControl, TrainerState, TrainingArguments

from Uni_MoE.train.gc_freeze import GcFreezeCallback, freeze_host_objects


def _tracked(obj: object) -> bool:
    """Whether ``obj`` is in a generation that collections visit (the frozen ones are not)."""
    return any(o is obj for o in gc.get_objects())


def test_callback_freezes_what_lives_at_train_begin_and_releases_it_at_the_end(tmp_path):
    built = [{"sample": i} for i in range(3)]  # stands for the model, optimizer and samples
    args, state, control = TrainingArguments(output_dir=str(tmp_path)), TrainerState(), TrainerControl()
    callback = GcFreezeCallback()
    try:
        callback.on_train_begin(args, state, control)
        assert gc.get_freeze_count() > 0 and not _tracked(built)
        during = [{"step": 1}]  # made by training: still collected as usual
        assert _tracked(during)
    finally:
        callback.on_train_end(args, state, control)
    assert gc.get_freeze_count() == 0 and _tracked(built)


class _Node:
    pass


def test_freeze_collects_garbage_first():
    """Unreachable cycles are freed before the freeze, not kept forever in the permanent generation."""
    gc.disable()  # no automatic collection may free the cycle before the freeze does
    try:
        node = _Node()
        node.self = node
        alive = weakref.ref(node)
        del node
        assert alive() is not None
        freeze_host_objects()
        assert alive() is None and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.enable()
