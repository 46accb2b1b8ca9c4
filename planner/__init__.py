"""lqplan's planner: model streaming, profiling, Fisher calibration, the ILP, plan documents, reports and the CLI.

Pipeline: profile (planner.profile) -> plan (planner.ilp, planner.plan) -> report (planner.report)
-> apply / train (planner.apply, planner.train). `planner.api.make_plan` runs the first three."""

__version__ = "0.1.0"
