"""Integrations with the tools users already run: the lmms-eval model plug-in (``lmms_eval``)."""

from __future__ import annotations

from typing import Any


def lmms_eval_manifest() -> Any:
    """The ``lmms_eval.models`` entry point: lmms-eval's model id ``uni_moe`` names ``UniMoELMMS``, imported
    only when a run asks for it."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="uni_moe", simple_class_path="Uni_MoE.integrations.lmms_eval.UniMoELMMS")
