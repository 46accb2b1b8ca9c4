"""The plan stage: budgets, the multiple-choice knapsack ILP and the versioned plan document.

The names below are imported on first use, so that `planner.plan.train_memory`'s constants (which the CLI parser
needs) come without the solver and torch: `lqplan --help` starts in a fraction of a second."""

from importlib import import_module

_HOMES = {"Budget": "budget", "parse_budget": "budget", "resolve_budget": "budget", "ResolvedBudget": "budget", "Plan": "document",
          "PlanEntry": "document", "InfeasibleBudget": "ilp", "Solution": "ilp", "solve": "ilp"}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_HOMES[name]}", __name__), name)
