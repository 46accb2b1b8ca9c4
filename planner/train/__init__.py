"""The apply / train stage: quantize a model by its plan, fine-tune the adapters, evaluate, save and export."""

from .apply import apply_plan, explicit_plan, quantized_bytes
from .evaluate import evaluate_quantized, perplexity
from .export import export_merged, export_peft, load_quantized, save_quantized
from .finetune import finetune
from .loop import train
from .parallel import setup_distributed
from .settings import TrainSettings

__all__ = ["TrainSettings", "apply_plan", "evaluate_quantized", "explicit_plan", "export_merged", "export_peft",
           "finetune", "load_quantized", "perplexity", "quantized_bytes", "save_quantized", "setup_distributed",
           "train"]
