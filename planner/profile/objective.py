"""The statistics each objective's errors are weighted by, fetched in one place for the plan and profile verbs,
the distributed profile and training: none (data-free), LQ-LoRA's Fisher row/column weights, or the output-aware
statistics (planner.profile.output_stats)."""

from __future__ import annotations

from pathlib import Path

from .fisher import get_fisher
from .output_stats import get_output_stats
from .settings import ProfileSettings


def calibration_weights(source, matrices, settings: ProfileSettings, cache_dir: Path, device, progress: bool):
    """(weights, key) for `settings.objective`: weights maps a matrix name to what quant's decompositions take
    (`.get(name)`), key names them in the profile cache key; (None, None) for the data-free objective."""
    if settings.objective == "fisher":
        return get_fisher(source, matrices, settings.calib, Path(cache_dir), settings.calib_tokens, device, progress)
    if settings.objective == "output":
        return get_output_stats(source, matrices, settings.calib, Path(cache_dir), settings.calib_tokens, device,
                                progress, settings.damping)
    return None, None


def objective_record(settings: ProfileSettings, key: str | None) -> dict:
    """plan.json's method fields for the objective: fisher {source, key, tokens} (or None), and for the output
    objective also objective = "output" and output {source, key, tokens, damping, row_weights}."""
    calib = {"source": settings.calib, "key": key, "tokens": settings.calib_tokens}
    if settings.objective == "output":
        return {"fisher": None, "objective": "output",
                "output": {**calib, "damping": settings.damping, "row_weights": True}}
    return {"fisher": calib if settings.objective == "fisher" else None}


def plan_objective(method: dict) -> str:
    """The objective a plan's method record was made with (records before the output objective name none)."""
    return method.get("objective") or ("fisher" if method.get("fisher") else "data-free")
