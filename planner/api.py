"""The library API behind the CLI, and the one place that composes the stages: profile a model, solve the ILP,
write the plan and its reports; render a plan's reports again; predict a plan's fine-tune memory; score a plan.
Each CLI verb is one call of a function here.

A training script can call `make_plan(...)` and then `planner.train.apply_plan(model, plan)`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .devices import resolve_device
from .errors import UserError
from .fsio import sha256_file, write_json
from .outputs import output_folder
from .model.discover import discover_matrices
from .model.resolve import ModelSource, resolve_model
from .model.stream import check_unplanned_finite
from .plan.assemble import plan_from_solution
from .plan.budget import Budget, ResolvedBudget, resolve_budget
from .plan.document import Plan
from .plan.ilp import DEFAULT_TIME_LIMIT, solve
from .model.fused import TIE_GROUPS, tie_groups, untied_names
from .plan.train_memory import TrainShape, predict_model, training_table
from .plan.weighted_error import weighted_plan_error
from .profile.cache import DEFAULT_CACHE
from .profile.distributed import profile_distributed, share_fisher
from .profile.grid import default_ranks, make_grid
from .profile.objective import calibration_weights, objective_record
from .profile.run import profile_manifest, run_profile, save_table
from .profile.settings import ProfileSettings
from .report.render import REPORT_OUTPUTS, plan_reports
from .report.run_stats import RUN_STATS
from .report.sources import read_report_sources
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
class PlanInputs:
    """What a plan or a profile is made from, resolved once per process (resolve_inputs): the model, its planned
    matrices, the settings and, for a plan, the budget checked against the grid's cheapest plan."""
    source: ModelSource
    matrices: list
    settings: ProfileSettings
    budget: ResolvedBudget | None = None
    seconds: dict = field(default_factory=dict, compare=False)  # the resolve and discover phases, for run.json


def resolve_inputs(model: str | None, settings: ProfileSettings | None = None, budget: "str | Budget | None" = None,
                   train: TrainShape | None = None) -> PlanInputs:
    """Resolve the model (config, safetensors headers and the fingerprint: every byte of the weights), find its
    planned matrices and, with a `budget`, resolve it (planner.plan.budget.resolve_budget; `train`: the fine-tune
    whose peak GPU memory a bytes budget then means). `settings` default: ProfileSettings' grid with the ranks
    default_ranks picks for the model's widths, as the CLI's."""
    clock = PhaseClock()
    with clock("resolve"):
        source = resolve_model(model)
    with clock("discover"):
        if settings is None:
            widths = (min(m.shape) for m in discover_matrices(source))
            settings = ProfileSettings(make_grid(ranks=default_ranks(widths)))
        matrices = discover_matrices(source, include_head=settings.include_head)
        check_unplanned_finite(source, matrices)
        resolved = None if budget is None else resolve_budget(source, matrices, settings.grid, budget,
                                                              settings.tie, train)
    return PlanInputs(source, matrices, settings, resolved, dict(clock.seconds))


@dataclass(frozen=True)
class _Job:
    """One make_plan call's resolved inputs and run settings, so the steps below take one value."""
    inputs: PlanInputs
    cache_dir: Path
    device: str
    progress: bool
    ilp_solver: str
    time_limit: float | None

    @property
    def settings(self) -> ProfileSettings:
        return self.inputs.settings

    def profile(self, weights=None, weights_key=None):
        """The profile table under the job's objective with its `weights`; without them, the data-free one."""
        settings = self.settings if weights is not None else self.settings.data_free()
        return run_profile(self.inputs.source, self.inputs.matrices, settings, weights, weights_key,
                           cache_dir=self.cache_dir, device=self.device, progress=self.progress)

    def plan(self, table: pd.DataFrame, method: dict, tie: bool = True) -> Plan:
        """The optimal plan of `table` at the budget; tie=False solves it without the settings' tie."""
        budget = self.inputs.budget
        costs = table if budget.train is None else training_table(table, self.settings.grid, budget.train)
        solution = solve(costs, budget, solver=self.ilp_solver, time_limit=self.time_limit,
                         tie=self.settings.tie if tie else ())
        return plan_from_solution(self.inputs.source, self.inputs.matrices, table, solution, budget, method)


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
        "plain_plan_weighted_error": weighted_plan_error(job.inputs.source, plain_plan, weights, False, job.settings,
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
              train: TrainShape | None = None, inputs: PlanInputs | None = None) -> PlanResult:
    """Profile → plan → report for one model and budget. `settings`: the grid, LoftQ iterations, solver, Fisher
    calibration (default: ProfileSettings' grid with the ranks default_ranks picks for the model's widths).
    `train`: the fine-tune (batch, sequence length, checkpointing, optimizer, adapter dtype) whose peak GPU memory a
    bytes budget then means (planner.plan.train_memory): the ILP spends what the fixed terms leave on packed weights
    and adapter training state, and plan.json's budget records the prediction. `inputs`: resolve_inputs(model,
    settings, budget, train) made earlier in this process (a distributed run's rank 0 makes it before the profile),
    used instead of resolving them again. Returns the plan, the profile table, the profile's ProfileStats (points
    computed vs cached) and, with a calibration source, the comparison with the data-free plan. With reports,
    run.json records each phase's wall seconds and the seconds from process start (PhaseClock)."""
    t0 = time.perf_counter()
    clock = PhaseClock()
    inputs = inputs or resolve_inputs(model, settings, budget, train)
    if inputs.budget is None:
        raise ValueError("make_plan's inputs were resolved without a budget")
    clock.seconds.update(inputs.seconds)
    source, matrices, settings, train = inputs.source, inputs.matrices, inputs.settings, inputs.budget.train
    warn_untied(matrices, settings.tie)
    job = _Job(inputs, Path(cache_dir), str(resolve_device(device)), progress, ilp_solver, time_limit)

    weights = wkey = tokenizer = None
    if settings.calib:  # the data-free objective reads no calibration text
        with clock("calibration"):
            weights, wkey, tokenizer = calibration_weights(source, matrices, settings, job.cache_dir, job.device,
                                                           progress)
    with clock("profile"):
        table, stats = job.profile(weights, wkey)
    method = {**settings.method_record(), **objective_record(settings, wkey, tokenizer)}
    with clock("solve"):
        plan = job.plan(table, method)
    if train is not None:
        prediction = predict_model(source, matrices, plan.matrices, train)
        plan.budget["train"] = {**train.to_dict(), "fixed_bytes": inputs.budget.fixed,
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
            extra = {**stats.record(), "total_seconds": round(time.perf_counter() - t0, 2)}
            # timings stay out of plan.json (same inputs, same bytes); `lqplan report` shows them again from here,
            # and only beside the plan they were measured for
            seconds = {"solver_seconds": plan.solver["seconds"]} if "seconds" in plan.solver else {}
            for key, path in plan_reports(plan, table, stage, {**extra, **({"fisher_comparison": comparison}
                                                                          if comparison else {})}, clock).items():
                paths[key] = out / Path(path).name
            write_json(stage / RUN_STATS, {**extra, **seconds, **clock.record(),
                                           "plan_sha256": sha256_file(stage / "plan.json")})
            paths["run_stats"] = out / RUN_STATS
    return PlanResult(plan, table, stats, paths, comparison, tie_cost)


def profile_model(model: str | None = None, settings: ProfileSettings | None = None, *,
                  out_dir: str | Path = "lqplan-out", cache_dir: str | Path = DEFAULT_CACHE, device: str = "auto",
                  progress: bool = True, inputs: PlanInputs | None = None):
    """`lqplan profile`: the profile table of every planned matrix x configuration (with the settings' objective),
    written to out_dir/profile.csv and profile.json. `inputs`: as make_plan's. Returns (table, ProfileStats, the
    profile.csv path)."""
    inputs = inputs or resolve_inputs(model, settings)
    source, matrices, settings = inputs.source, inputs.matrices, inputs.settings
    dev = str(resolve_device(device))
    weights, wkey, _ = calibration_weights(source, matrices, settings, Path(cache_dir), dev, progress)
    table, stats = run_profile(source, matrices, settings, weights, wkey, cache_dir=Path(cache_dir), device=dev,
                               progress=progress)
    out = Path(out_dir)
    with output_folder(out, ("profile.csv", "profile.json")) as stage:
        save_table(table, stage, profile_manifest(source, settings, wkey, Path(cache_dir)))
    return table, stats, out / "profile.csv"


def profile_on_ranks(ctx, inputs: PlanInputs, *, cache_dir: str | Path = DEFAULT_CACHE, progress: bool = True,
                     for_plan: bool = False) -> list:
    """A torchrun job's profile, spread over its ranks (planner.profile.distributed): every point make_plan
    (`for_plan`: with an objective's weights, the data-free points of its comparison too) or profile_model will
    then read from the cache. Returns the DistributedSummary of each profile on rank 0, [] on the others."""
    source, matrices, settings = inputs.source, inputs.matrices, inputs.settings
    variants = [(None, None)]
    if settings.calib:
        variants = [share_fisher(ctx, source, matrices, settings, Path(cache_dir), progress)[:2]]
        if for_plan:
            variants.append((None, None))
    summaries = [profile_distributed(ctx, source, matrices, settings if weights is not None else settings.data_free(),
                                     weights, key, Path(cache_dir), progress) for weights, key in variants]
    return [s for s in summaries if s is not None]


def report_plan(plan: str | Path, *, profile: str | Path | None = None, out_dir: str | Path | None = None) -> dict:
    """`lqplan report`: a plan's reports rendered again from plan.json and its profile table (`profile`: profile.csv
    or its folder, default beside the plan) into out_dir (default: the plan's folder). Returns the paths written."""
    plan_obj, table, stats = read_report_sources(plan, profile)
    out = Path(out_dir) if out_dir else Path(plan).parent
    with output_folder(out, REPORT_OUTPUTS) as stage:
        paths = plan_reports(plan_obj, table, stage, stats)
    return {k: out / Path(v).name for k, v in paths.items()}


def plan_memory(plan: str | Path, train: TrainShape, *, model: str | None = None) -> dict:
    """`lqplan memory --plan`: the fine-tune's predicted peak GPU memory for a plan (planner.plan.train_memory.predict:
    terms, phases, peak). `model`: the plan's full-precision model (default: its model.source)."""
    plan_obj = Plan.load(plan)
    source = resolve_model(model or plan_obj.model.get("source"))
    plan_obj.check_model(source.fingerprint)
    planned = {e.name for e in plan_obj.matrices}
    matrices = [m for m in discover_matrices(source, include_head=True) if m.name in planned]
    return predict_model(source, matrices, plan_obj.matrices, train)


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
