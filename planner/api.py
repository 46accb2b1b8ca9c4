"""The library API behind the CLI, and the one place that composes the stages: profile a model, solve the ILP,
write the plan and its reports; score a plan.

A training script can call `make_plan(...)` and then `planner.train.apply_plan(model, plan)`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from .devices import resolve_device
from .errors import UserError
from .fsio import sha256_file, write_json
from .outputs import output_folder
from .model.discover import discover_matrices, planned_params
from .model.resolve import ModelSource, resolve_model
from .model.stream import check_unplanned_finite
from .plan.assemble import plan_from_solution
from .plan.budget import Budget, resolve_budget, training_budget
from .plan.document import Plan
from .plan.ilp import DEFAULT_TIME_LIMIT, solve, uniform_solutions
from .model.fused import TIE_GROUPS, tie_groups, untied_names
from .plan.train_memory import ReferenceWeights, TrainShape, predict, training_table
from .plan.weighted_error import weighted_plan_error
from .profile.cache import DEFAULT_CACHE
from .profile.grid import default_ranks, make_grid
from .profile.objective import calibration_weights, objective_record
from .profile.run import profile_manifest, run_profile, save_table
from .profile.settings import ProfileSettings
from .report.frames import budget_curve
from .report.render import REPORT_OUTPUTS, write_reports
from .report.run_stats import RUN_STATS
from .timing import PhaseClock

log = logging.getLogger("lqplan")

# What `lqplan plan` writes into --out; a new plan replaces all of them (a --no-report plan drops the old reports)
PLAN_OUTPUTS = ("plan.json", "profile.csv", "profile.json", RUN_STATS, "evaluate.json", *REPORT_OUTPUTS)


@dataclass
class PlanResult:
    plan: Plan
    table: pd.DataFrame
    stats: object
    paths: dict = field(default_factory=dict)
    comparison: dict | None = None
    tie_cost: dict | None = None


@dataclass(frozen=True)
class _Job:
    """One make_plan call's resolved inputs, so the steps below take one value instead of fifteen."""
    source: ModelSource
    matrices: list
    settings: ProfileSettings
    budget: Budget
    budget_bits: int
    unplanned: int
    describe: Callable[[int], str]
    cache_dir: Path
    device: str
    progress: bool
    ilp_solver: str
    time_limit: float | None
    train: TrainShape | None = None  # set: the budget is the fine-tune's peak GPU memory

    def profile(self, weights=None, weights_key=None):
        """The profile table under the job's objective with its `weights`; without them, the data-free one."""
        settings = self.settings if weights is not None else self.settings.data_free()
        return run_profile(self.source, self.matrices, settings, weights, weights_key, cache_dir=self.cache_dir,
                           device=self.device, progress=self.progress)

    def plan(self, table: pd.DataFrame, method: dict, tie: bool = True) -> Plan:
        """The optimal plan of `table` at the budget; tie=False solves it without the settings' tie."""
        costs = table if self.train is None else training_table(table, self.settings.grid, self.train)
        solution = solve(costs, self.budget_bits, solver=self.ilp_solver, describe=self.describe,
                         time_limit=self.time_limit, tie=self.settings.tie if tie else ())
        return plan_from_solution(self.source, self.matrices, table, solution, self.budget, self.budget_bits, method,
                                  self.unplanned)


def fisher_comparison(job: _Job, table: pd.DataFrame, plan: Plan, weights) -> dict:
    """The data-free plan for the same budget and grid, and both plans' weighted and plain errors. The keys name the
    weighted plan "fisher" whatever its objective; the output objective's comparison says objective = "output"."""
    plain_table, _ = job.profile()
    plain_plan = job.plan(plain_table, {k: v for k, v in plan.method.items() if k not in ("objective", "output")}
                          | {"fisher": None})
    unweighted = table.set_index(["matrix", "label"])["error_unweighted"]
    plain_by_name = plain_plan.by_name()
    return {
        **({"objective": "output"} if job.settings.objective == "output" else {}),
        "fisher_plan_weighted_error": plan.totals["error"],
        "plain_plan_weighted_error": weighted_plan_error(job.source, plain_plan, weights, False, job.settings,
                                                         job.device),
        "fisher_plan_unweighted_error": float(sum(unweighted[(e.name, e.point.label)] for e in plan.matrices)),
        "plain_plan_unweighted_error": plain_plan.totals["error"],
        "plain_plan_bits_per_param": plain_plan.totals["bits_per_param"],
        "changed_matrices": sum(1 for e in plan.matrices if plain_by_name[e.name].point != e.point),
        "matrices": len(plan.matrices),
    }


def tie_comparison(job: _Job, table: pd.DataFrame, plan: Plan) -> dict:
    """What the tie cost: the untied optimum of the same table at the same budget beside the tied plan (totals of
    the planned matrices' storage and error), and how many groups and matrices the tie joined."""
    untied = job.plan(table, {k: v for k, v in plan.method.items() if k != "tie"}, tie=False)
    groups = tie_groups([e.name for e in plan.matrices], job.settings.tie)
    tied_error, untied_error = plan.totals["error"], untied.totals["error"]
    return {"tied_error": tied_error, "untied_error": untied_error,
            "relative_error_increase": (tied_error - untied_error) / untied_error if untied_error > 0 else 0.0,
            "tied_bits": plan.totals["bits"], "untied_bits": untied.totals["bits"],
            "tied_bits_per_param": plan.totals["bits_per_param"],
            "untied_bits_per_param": untied.totals["bits_per_param"],
            "untied_status": untied.solver.get("status"), "groups": len(groups),
            "tied_matrices": sum(len(g.members) for g in groups),
            "changed_matrices": sum(1 for e, u in zip(plan.matrices, untied.matrices) if e.point != u.point)}


def warn_untied(matrices, tie) -> None:
    """One warning line per group of `tie` that ties nothing in this model (BERT has no gate/up): the option is
    kept, since a script may pass the same --tie for every model."""
    for name in untied_names([m.name for m in matrices], tie):
        tails = " / ".join("+".join(t) for t in TIE_GROUPS[name])
        log.warning("--tie %s ties nothing in this model: no layer has two or more of %s; planned without it",
                    name, tails)


def make_plan(model: str | None = None, budget: "str | Budget" = "2.75bits", settings: ProfileSettings | None = None,
              *, out_dir: str | Path = "lqplan-out", ilp_solver: str = "highs",
              time_limit: float | None = DEFAULT_TIME_LIMIT, cache_dir: str | Path = DEFAULT_CACHE,
              device: str = "auto", progress: bool = True, reports: bool = True,
              train: TrainShape | None = None) -> PlanResult:
    """Profile → plan → report for one model and budget. `settings`: the grid, LoftQ iterations, solver, Fisher
    calibration (default: ProfileSettings' grid with the ranks default_ranks picks for the model's widths).
    `train`: the fine-tune (batch, sequence length, checkpointing, optimizer, adapter dtype) whose peak GPU memory a bytes budget then means (planner.plan.train_memory): the
    ILP spends what the fixed terms leave on packed weights and adapter training state, and plan.json's budget
    records the prediction. Returns the plan, the profile table, the profile's ProfileStats (points computed vs
    cached) and, with a calibration source, the comparison with the data-free plan. With reports, run.json records
    each phase's wall seconds and the seconds from process start (PhaseClock)."""
    t0 = time.perf_counter()
    clock = PhaseClock()
    with clock("resolve"):  # config, safetensors headers and the fingerprint (every byte of the weights)
        source = resolve_model(model)
    with clock("discover"):
        if settings is None:  # the default grid with the ranks that suit this model's widths, as the CLI's
            matrices = discover_matrices(source)
            settings = ProfileSettings(make_grid(ranks=default_ranks(min(m.shape) for m in matrices)))
        matrices = discover_matrices(source, include_head=settings.include_head)
        dev = str(resolve_device(device))
        check_unplanned_finite(source, matrices)
        budget_obj, budget_bits, unplanned, describe = resolve_budget(source, matrices, settings.grid, budget,
                                                                      settings.tie)
        warn_untied(matrices, settings.tie)
        fixed = None
        if train is not None:
            budget_obj, budget_bits, describe, fixed = training_budget(source, matrices, settings, budget_obj, train)
    job = _Job(source, matrices, settings, budget_obj, budget_bits, unplanned, describe,
               Path(cache_dir), dev, progress, ilp_solver, time_limit, train)

    weights = wkey = tokenizer = None
    if settings.calib:  # the data-free objective reads no calibration text
        with clock("calibration"):
            weights, wkey, tokenizer = calibration_weights(source, matrices, settings, job.cache_dir, dev, progress)
    with clock("profile"):
        table, stats = job.profile(weights, wkey)
    method = {**settings.method_record(), **objective_record(settings, wkey, tokenizer)}
    with clock("solve"):
        plan = job.plan(table, method)
    if train is not None:
        # `lqplan train` runs the full-precision reference pass by default: its phase is part of the prediction
        prediction = predict(source.config, plan.matrices, fixed["unplanned_train_bytes"], train,
                             reference=ReferenceWeights.of(source.tensors))
        plan.budget["train"] = {**train.to_dict(), "fixed_bytes": fixed["fixed_bytes"],
                                "predicted_peak_bytes": prediction["peak_bytes"], "terms": prediction["terms"],
                                "phases": prediction["phases"]}

    tie_cost = None
    if settings.tie:
        with clock("tie_comparison"):
            tie_cost = tie_comparison(job, table, plan)
        plan.method["tie_cost"] = tie_cost  # in plan.json too, so `lqplan report` can show it

    comparison = None
    if weights is not None:
        with clock("objective_comparison"):
            comparison = fisher_comparison(job, table, plan, weights)
        # in plan.json too, so `lqplan report` can show it
        plan.method["output" if settings.objective == "output" else "fisher"]["comparison"] = comparison

    out = Path(out_dir)
    paths = {}
    # The whole folder is written aside and swapped in at the end: a failed or killed run leaves the previous one.
    with output_folder(out, PLAN_OUTPUTS) as stage:
        with clock("save"):  # the profile first, the plan last: a plan.json always has its profile beside it
            for key, path in zip(("profile", "profile_manifest"), save_table(
                    table, stage, profile_manifest(source, settings, wkey, job.cache_dir, plan.model))):
                paths[key] = out / path.name
            plan.save(stage / "plan.json")
        paths["plan"] = out / "plan.json"

        if reports:
            with clock("curve"):
                curve = budget_curve(table, planned_params(matrices), settings.tie)
                uniform = uniform_solutions(table, budget_bits)
            extra = {**stats.record(), "total_seconds": round(time.perf_counter() - t0, 2)}
            # timings stay out of plan.json (same inputs, same bytes); `lqplan report` shows them again from here,
            # and only beside the plan they were measured for
            seconds = {"solver_seconds": plan.solver["seconds"]} if "seconds" in plan.solver else {}
            if comparison:
                extra["fisher_comparison"] = comparison
            with clock("reports"):
                for key, path in write_reports(plan, table, stage, curve, uniform, extra).items():
                    paths[key] = out / Path(path).name
            extra.pop("fisher_comparison", None)
            write_json(stage / RUN_STATS, {**extra, **seconds, **clock.record(),
                                           "plan_sha256": sha256_file(stage / "plan.json")})
            paths["run_stats"] = out / RUN_STATS
    return PlanResult(plan, table, stats, paths, comparison, tie_cost)


def evaluate_plan(plan, *, model: str | None = None, out_dir=None, cache_dir=DEFAULT_CACHE, **scoring) -> dict:
    """`lqplan evaluate --plan`: the plan's quantized model with its initial adapters scored against the
    full-precision model (planner.train.score.PlanScorer: KL(fp ‖ quantized) per token, both perplexities, top-1
    agreement); `scoring`: PlanScorer's settings (texts, text_source, eval_tokens, max_len, stride, batch_size,
    device, stream, progress; its defaults: 4096 tokens of the built-in held-out prose in windows of 512). The
    result is written atomically to out_dir/evaluate.json (default: beside the plan) and returned with its "path".
    `model`: the full-precision model (default: the plan's model.source); `cache_dir`: where the weights of a Fisher
    or output-aware plan are read or computed. To score many plans of one model, make one PlanScorer and call its
    score() per plan: the full-precision model then runs once."""
    from .train.score import PlanScorer  # torch and transformers: loaded when a plan is scored, not at start-up

    path = Path(plan)
    plan_obj = Plan.load(path)  # a bad plan fails before any model is loaded
    folder = model or plan_obj.model.get("source")
    if model is None and not (folder and (Path(folder) / "config.json").is_file()):
        raise UserError(f"the plan's model folder {folder!r} was not found; pass --model <the folder, alias or hub id "
                        "the plan was made for>")
    source = resolve_model(folder)
    plan_obj.check_model(source.fingerprint)  # before the full-precision pass
    scorer = PlanScorer(source, **scoring)
    result = scorer.score(plan_obj, plan_path=path, cache_dir=cache_dir)
    out = (Path(out_dir) if out_dir is not None else path.parent) / "evaluate.json"
    write_json(out, result)
    return {**result, "path": str(out)}
