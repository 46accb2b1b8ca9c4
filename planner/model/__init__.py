"""The model stage: resolve --model to a checked folder, find the matrices a plan covers, stream them.

The names below are imported on first use, so that a light module of this stage (the weights' float codes, the
config reader) comes without torch."""

from importlib import import_module

_HOMES = {"MatrixInfo": "discover", "discover_matrices": "discover", "planned_params": "discover",
          "unplanned_bytes": "discover", "memory_table": "memory", "ModelSource": "resolve",
          "default_model_path": "resolve", "list_aliases": "resolve", "resolve_model": "resolve",
          "iter_matrices": "stream", "fingerprint": "weights"}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_HOMES[name]}", __name__), name)
