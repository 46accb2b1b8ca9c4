"""lqplan's numeric core: codebooks, blockwise quantization into packed storage, LoftQ/LQ-LoRA decomposition.

Pure numerics: tensors in, tensors out; no file or network I/O, no printing."""

from .blockwise import QuantizedTensor, quantize, quantize_dequantize
from .codebooks import int_codebook, nf_codebook
from .config import NF4_QLORA, QuantConfig
from .decompose import Decomposition, decompose
from .lowrank import SolverSettings

__all__ = [
    "NF4_QLORA", "Decomposition", "QuantConfig", "QuantizedTensor", "SolverSettings",
    "decompose", "int_codebook", "nf_codebook", "quantize", "quantize_dequantize",
]
