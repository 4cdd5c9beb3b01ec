"""Uni-MoE: a unified multimodal LLM with a mixture of (LoRA) experts."""

from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor

from .config import UniMoEConfig
from .model.uni_moe import UniMoEForCausalLM
from .processing_uni_moe import UniMoEProcessor

AutoConfig.register(UniMoEConfig.model_type, UniMoEConfig, exist_ok=True)
AutoModelForCausalLM.register(UniMoEConfig, UniMoEForCausalLM, exist_ok=True)
AutoProcessor.register(UniMoEConfig, UniMoEProcessor, exist_ok=True)

__all__ = ["UniMoEConfig", "UniMoEForCausalLM", "UniMoEProcessor"]
__version__ = "0.1.0"
