"""Uni-MoE: a unified multimodal LLM with a mixture of (LoRA) experts."""

from transformers import AutoConfig, AutoModelForCausalLM

from .config import UniMoEConfig
from .model.uni_moe import UniMoEForCausalLM

AutoConfig.register(UniMoEConfig.model_type, UniMoEConfig, exist_ok=True)
AutoModelForCausalLM.register(UniMoEConfig, UniMoEForCausalLM, exist_ok=True)

__all__ = ["UniMoEConfig", "UniMoEForCausalLM"]
__version__ = "0.1.0"
