"""A plan's total error under a weighting (Fisher or output-aware), recomputed from the weights: how the data-free
plan fares on the objective the weighted plan was solved for."""

from __future__ import annotations

from quant.methods import get_method
from quant.weighting import Metric, check_weighting

from ..model.discover import discover_matrices
from ..model.stream import iter_matrices
from ..profile.settings import ProfileSettings
from .document import Plan


def weighted_plan_error(source, plan: Plan, weights, weighted_decomposition: bool, settings: ProfileSettings,
                        device) -> float:
    """The weighted error (Fisher or output-aware: `weights.get(name)`) of a plan's configurations, decomposed with
    or without the weights."""
    infos = [m for m in discover_matrices(source) if m.name in plan.by_name()]
    total = 0.0
    for info, w in iter_matrices(source, infos, device=device):
        e = plan.by_name()[info.name]
        weighting = check_weighting(weights.get(info.name), tuple(w.shape))
        kind = get_method(e.point.method)
        fisher, rounding = (weighting, settings.rounding) if weighted_decomposition else (None, "nearest")
        q, a, b = kind.decompose(w, e.point.config, e.point.rank, settings.iters, fisher=fisher,
                                 solver=settings.solver, rounding=rounding)
        total += Metric.of(weighting, w.device).error(w.float() - q.dequantize() - kind.dense(a, b, e.point.config))
    return total
