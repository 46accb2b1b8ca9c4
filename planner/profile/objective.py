"""The statistics each objective's errors are weighted by, fetched in one place for the plan and profile verbs,
the distributed profile and training: none (data-free), LQ-LoRA's Fisher row/column weights, or the output-aware
statistics (planner.profile.output_stats)."""

from __future__ import annotations

import logging
from pathlib import Path

from .fisher import get_fisher
from .output_stats import get_output_stats
from .settings import ProfileSettings

log = logging.getLogger("lqplan")


def calibration_weights(source, matrices, settings: ProfileSettings, cache_dir: Path, device, progress: bool):
    """(weights, key, tokenizer digest) for `settings.objective`: weights maps a matrix name to what quant's
    decompositions take (`.get(name)`), key names them in the profile cache key (the tokenizer included: the
    weights' fingerprint cannot see a tokenizer converted differently); (None, None, None) for data-free."""
    if settings.objective == "fisher":
        return get_fisher(source, matrices, settings.calib, Path(cache_dir), settings.calib_tokens, device, progress)
    if settings.objective == "output":
        return get_output_stats(source, matrices, settings.calib, Path(cache_dir), settings.calib_tokens, device,
                                progress, settings.damping)
    return None, None, None


def objective_record(settings: ProfileSettings, key: str | None, tokenizer: str | None = None) -> dict:
    """plan.json's method fields for the objective: fisher {source, key, tokens} (or None), and for the output
    objective also objective = "output" and output {source, key, tokens, damping, row_weights, rounding}."""
    calib = {"source": settings.calib, "key": key, "tokens": settings.calib_tokens,
             **({"tokenizer": tokenizer} if tokenizer else {})}
    if settings.objective == "output":
        return {"fisher": None, "objective": "output",
                "output": {**calib, "damping": settings.damping, "row_weights": True, "rounding": settings.rounding}}
    return {"fisher": calib if settings.objective == "fisher" else None}


def plan_objective(method: dict) -> str:
    """The objective a plan's method record was made with (records before the output objective name none)."""
    return method.get("objective") or ("fisher" if method.get("fisher") else "data-free")


def plan_calibration(plan, source, cache_dir: Path, device, progress: bool = False):
    """(weights, key): the weights a plan's own objective decomposes with, for applying it as it was profiled, and
    the key that names them: LQ-LoRA's Fisher row/column weights of a Fisher plan, the output statistics of an
    output-aware plan (each from the cache, or recomputed from the calibration source its method record names);
    (None, None) for a data-free plan."""
    objective = plan_objective(plan.method)
    if objective == "data-free":
        return None, None
    from ..model.discover import discover_matrices

    record = plan.method.get(objective) or {}
    try:
        extra = {"damping": float(record["damping"]), "rounding": record.get("rounding", "nearest")} \
            if objective == "output" else {}
        settings = ProfileSettings(calib=record["source"], calib_tokens=int(record["tokens"]), objective=objective,
                                   **extra)
    except (KeyError, TypeError, ValueError):
        from ..errors import UserError

        needs = "source, tokens or damping" if objective == "output" else "source or tokens"
        raise UserError(f"the plan's method.{objective} record lacks {needs}; re-plan with --objective "
                        f"{objective}") from None
    planned = set(plan.by_name())
    matrices = [m for m in discover_matrices(source, include_head=True) if m.name in planned]
    weights, key, _ = calibration_weights(source, matrices, settings, cache_dir, device, progress)
    if record.get("key") not in (None, key):  # an edited calibration file, or another tokenizer since planning
        log.warning("the plan's %s weights were computed as %s, these are %s: the layers are not decomposed exactly "
                    "as the plan was profiled", objective, record["key"], key)
    return weights, key


def plan_weights(plan, source, cache_dir: Path, device, progress: bool = False):
    """The weights of plan_calibration (None for a data-free plan)."""
    return plan_calibration(plan, source, cache_dir, device, progress)[0]


def plan_rounding(method: dict) -> str:
    """How a plan's quantizer step rounds: "gptq" when its output objective said so, else "nearest"."""
    return (method.get("output") or {}).get("rounding", "nearest") if plan_objective(method) == "output" \
        else "nearest"
