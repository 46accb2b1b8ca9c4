"""Hugging Face integration: a plan as a transformers quantization_config, PEFT LoRA over the quantized base,
training data through datasets, and whole-model integer export."""

from .config import LqplanConfig
from .quantizer import LqplanHfQuantizer, register

__all__ = ["LqplanConfig", "LqplanHfQuantizer", "register"]
