"""The model stage: resolve --model to a checked folder, find the matrices a plan covers, stream them."""

from .discover import MatrixInfo, discover_matrices, planned_params, unplanned_bytes
from .memory import memory_table
from .resolve import ModelSource, default_model_path, list_aliases, resolve_model
from .stream import iter_matrices
from .weights import fingerprint

__all__ = ["MatrixInfo", "ModelSource", "default_model_path", "discover_matrices", "fingerprint", "iter_matrices",
           "list_aliases", "memory_table", "planned_params", "resolve_model", "unplanned_bytes"]
