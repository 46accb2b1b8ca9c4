"""lqplan's planner, one subpackage per stage of the pipeline:

model (resolve, discover, stream the weights) -> profile (every matrix x configuration, cached; Fisher weights) ->
plan (budget, ILP, the plan document) -> report (allocation tables, figures) -> train (apply the plan, fine-tune,
evaluate, export). `planner.api.make_plan` runs profile -> plan -> report; `planner.cli` is the command line."""

__version__ = "0.1.0"
