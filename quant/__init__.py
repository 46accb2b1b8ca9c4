"""lqplan's numeric core: codebooks, blockwise quantization into packed storage, LoftQ/LQ-LoRA decomposition,
QA-LoRA (group-wise INT-k with pooled adapters that merge into the zero-points).

Pure numerics: tensors in, tensors out; no file or network I/O, no printing."""

from .blockwise import QuantizedTensor, quantize, quantize_dequantize
from .codebooks import int_codebook, nf_codebook
from .config import NF4_QLORA, QuantConfig
from .decompose import Decomposition, decompose
from .lowrank import SolverSettings
from .qalora import (
    QALoRADecomposition,
    QALoRALinear,
    qalora_decompose,
    qalora_matrix_bits,
)

__all__ = [
    "NF4_QLORA", "Decomposition", "QALoRADecomposition", "QALoRALinear", "QuantConfig", "QuantizedTensor",
    "SolverSettings", "decompose", "int_codebook", "nf_codebook", "qalora_decompose", "qalora_matrix_bits",
    "quantize", "quantize_dequantize",
]
