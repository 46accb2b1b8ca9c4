"""The plan stage: budgets, the multiple-choice knapsack ILP and the versioned plan document."""

from .budget import Budget, ResolvedBudget, parse_budget, resolve_budget
from .document import Plan, PlanEntry
from .ilp import InfeasibleBudget, Solution, solve

__all__ = ["Budget", "InfeasibleBudget", "Plan", "PlanEntry", "ResolvedBudget", "Solution", "parse_budget",
           "resolve_budget", "solve"]
