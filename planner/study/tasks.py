"""One model's task graph in the study: the tokenizer check, one profile per objective, a plan per objective and
budget from the cached profiles, QLoRA's and every uniform configuration's plan from the data-free profile, KL before
fine-tuning for every arm, the same fine-tune for every arm (more seeds for the arms the claims compare), and what
the finished tasks produced, gathered with the claims. Everything the GPU does is an `lqplan` process
(planner.study.calls) queued on planner.study.runner."""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

from quant import SolverSettings

from ..model.discover import discover_matrices, planned_params
from ..model.resolve import resolve_model
from ..plan.document import Plan
from ..profile.table import read_profile_csv
from . import calls
from .arms import best_uniform, budget_bits, predicted_error, qlora_bits, qlora_point, uniform_plan, uniform_points
from .claims import judge, mean_std
from .runner import Runner, Task
from .settings import StudySettings
from .tokens import known_answer

# Order in which a model's tasks get a free slot: the claims' arms first, the second seeds before the other budgets.
TIER = {"profile": 0, "plan": 1, "kl-arm": 2, "train-key": 3, "kl-uniform": 4, "train-key-more": 5, "train": 6,
        "train-loftq": 7, "train-more": 8}


def safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def gpu_estimates(source, s: StudySettings) -> dict[str, float]:
    """GB of GPU memory each kind of process is reserved, from the fp32 weights (w) and one batch's fp32 logits with
    the softmax and its gradient (L): 8.7 GB was the measured peak of a Gemma 3 270M fine-tune of 8 x 256 tokens
    (this gives 10). A process that runs out anyway is tried again with twice its reserve."""
    cfg = source.config.get("text_config") or source.config
    vocab = int(cfg.get("vocab_size") or 32000)
    w = sum(math.prod(e.shape) for e in source.tensors.values()) * 4 / 1e9
    logits = s.batch_size * s.max_len * vocab * 4 * 3 / 1e9
    return {"profile": 1.0 + 3 * w + logits, "plan": 1.0 + w, "kl": 1.0 + 2 * w + 0.5 * logits,
            "train": 1.0 + 1.2 * w + 1.2 * logits}


class ModelStudy:
    """One model's tasks and what they produce."""

    def __init__(self, index: int, name: str, spec: str, s: StudySettings, caps: dict, work: Path, cache: Path,
                 runner: Runner, log):
        self.i, self.name, self.s, self.caps, self.work, self.cache, self.runner, self.log = (
            index, name, s, caps, work, cache, runner, log)
        self.source = resolve_model(spec)
        self.model = str(self.source.folder)
        self.matrices = discover_matrices(self.source)
        self.params = planned_params(self.matrices)
        self.qlora_bits = qlora_bits(self.matrices, s.qlora_rank)
        self.budgets = sorted(set(s.budgets) | {self.qlora_bits})
        self.budget_bits = {str(b): budget_bits(self.source, self.matrices, b) for b in self.budgets}
        self.gpu = gpu_estimates(self.source, s)
        self.tables: dict = {}
        self.arms: dict[str, dict] = {}
        self.uniform: dict[str, dict] = {}
        self.tokenizer = known_answer(name, self.source.folder)
        self.skipped = None

    # ---- tasks ---------------------------------------------------------------------------------------------------
    def prio(self, tier: str, sub: float = 0.0) -> tuple:
        return (self.i, TIER[tier], sub)

    def start(self) -> None:
        self.log(f"{self.name}: {len(self.matrices)} matrices, {self.params:,} planned parameters, QLoRA's bits "
                 f"{self.qlora_bits}, tokenizer known answer: {self.tokenizer['status']}, digest "
                 f"{self.tokenizer['digest']}")
        if self.tokenizer["status"] == "fail":
            self.skipped = (f"its tokenizer {self.tokenizer['problem']}: a wrong conversion; assemble the folder "
                            "with the tokenizer files of a machine whose transformers converts it right "
                            "(docs/gpu-study.md)")
            self.log(f"{self.name}: SKIPPED: {self.skipped}")
            return
        # The plan at QLoRA's bits profiles (the profile.csv beside it is the objective's table); the other budgets
        # are planned from the cached profile once it exists.
        first = self.qlora_bits
        for obj in self.s.objectives:
            for b in [first] + [b for b in self.budgets if b != first]:
                out = self.work / "plans" / f"{obj}-{b}"
                deps = () if b == first else (f"{self.name}/plan/{obj}@{first}",)
                self.runner.add(Task(
                    f"{self.name}/plan/{obj}@{b}", f"{'profile' if b == first else 'plan'}:{self.name}",
                    calls.plan_argv(self.model, obj, b, self.s, self.caps, out, self.cache), deps=deps,
                    priority=self.prio("profile" if b == first else "plan", b), est_s=150 if b == first else 60,
                    gpu_gb=self.gpu["profile" if b == first else "plan"], done=out / "plan.json", log=out / "task.log",
                    on_done=lambda t, obj=obj, b=b, out=out: self.planned(obj, b, out)))

    def kl_task(self, arm_id: str, plan: Path, tier: str, deps=()) -> None:
        if not self.s.extra.get("kl", True):
            return
        out = self.work / "kl" / safe(arm_id)
        self.runner.add(Task(f"{self.name}/kl/{arm_id}", f"kl:{self.name}", calls.evaluate_argv(
            plan, self.s, self.caps, out, self.cache), deps=tuple(deps), priority=self.prio(tier), est_s=60,
            gpu_gb=self.gpu["kl"], done=out / calls.EVALUATE_FILE, log=out / "task.log"))

    def train_tasks(self, arm: dict, seeds: int, key: bool, deps=()) -> None:
        for seed in range(seeds):
            tier = ("train-key" if seed == 0 else "train-key-more") if key else \
                ("train-loftq" if arm["kind"] == "loftq" else "train") if seed == 0 else "train-more"
            out = self.work / "train" / f"{safe(arm['id'])}-s{seed}"
            key_ = f"{self.name}/train/{arm['id']}/s{seed}"
            if key_ in self.runner.tasks:
                task = self.runner.tasks[key_]
                if task.state == "pending":
                    task.priority = min(task.priority, self.prio(tier, arm["budget"]))
                continue
            self.runner.add(Task(key_, f"train:{self.name}", calls.train_argv(
                Path(arm["plan"]), arm["init"], seed, self.s, out, self.cache), deps=tuple(deps),
                priority=self.prio(tier, arm["budget"]), est_s=40 + 0.6 * self.s.steps, gpu_gb=self.gpu["train"],
                done=out / calls.TRAIN_FILE, log=out / "task.log"))

    def is_key(self, budget: float) -> bool:
        return budget in (self.qlora_bits, self.s.near_budget)

    # ---- what a finished task adds -------------------------------------------------------------------------------
    def profiled(self, obj: str, out: Path) -> None:
        self.tables[obj] = read_profile_csv(out / "profile.csv")
        if obj == "data-free":
            self.reference_arms(self.tables[obj])

    def reference_arms(self, table) -> None:
        """QLoRA's plan and every uniform configuration's, from the data-free profile; the uniform LoftQ arm of
        each budget is the configuration with the least profiled error among those that fit."""
        solver = SolverSettings().key
        points = uniform_points(self.s, self.matrices, max(self.budget_bits.values()))
        method = {"iters": self.s.iters, "solver": solver, "grid": [p.label for p in points], "fisher": None}
        indexed = table.set_index(["matrix", "label"])
        for p in points:
            path = self.work / "plans" / f"uniform-{safe(p.label)}" / "plan.json"
            if not path.is_file():
                uniform_plan(self.source, self.matrices, table, p, {**method, "arm": "uniform"}).save(path)
            plan = Plan.load(path)
            self.uniform[p.label] = {"label": p.label, "plan": str(path), "bits": plan.totals["bits"],
                                     "bits_per_param": plan.totals["bits_per_param"],
                                     "table_error": math.fsum(float(indexed.loc[(m.name, p.label), "error"])
                                                              for m in self.matrices),
                                     "choice": {m.name: p.label for m in self.matrices}}
            self.kl_task(f"uniform:{p.label}", path, "kl-uniform")
        q = qlora_point(self.s.qlora_rank)
        path = self.work / "plans" / "qlora" / "plan.json"
        if not path.is_file():
            uniform_plan(self.source, self.matrices, table, q, {**method, "arm": "qlora"}, zero_init=True).save(path)
        plan = Plan.load(path)
        arm = self.add_arm("qlora", "qlora", None, self.qlora_bits, path, plan, "qlora")
        self.kl_task(arm["id"], path, "kl-arm")
        self.train_tasks(arm, self.s.key_seeds, True)
        for b in self.budgets:
            label = best_uniform(self.uniform, self.budget_bits[str(b)])
            if label is None:
                self.log(f"{self.name}: no uniform configuration fits {b} bits/param")
                continue
            arm_id = f"loftq:{label}"
            if arm_id in self.arms:
                self.arms[arm_id]["budgets"].append(b)
                continue
            u = self.uniform[label]
            arm = self.add_arm(arm_id, "loftq", None, b, Path(u["plan"]), Plan.load(u["plan"]), "loftq")
            self.train_tasks(arm, self.s.seeds, False)

    def add_arm(self, arm_id: str, kind: str, objective, budget: float, path: Path, plan: Plan, init: str) -> dict:
        labels = sorted({e.point.label for e in plan.matrices})
        arm = {"id": arm_id, "kind": kind, "objective": objective, "budget": budget, "budgets": [budget],
               "plan": str(path), "init": init, "bits_per_param": plan.totals["bits_per_param"],
               "bits": plan.totals["bits"], "choice": {e.name: e.point.label for e in plan.matrices},
               "config": labels[0] if len(labels) == 1 else f"{len(labels)} configurations",
               "plan_error": plan.totals.get("error"), "same_as": None}
        self.arms[arm_id] = arm
        return arm

    def planned(self, obj: str, b: float, out: Path) -> None:
        if obj not in self.tables:
            self.profiled(obj, out)
        plan = Plan.load(out / "plan.json")
        arm_id = f"{obj}@{b}"
        arm = self.add_arm(arm_id, "plan", obj, b, out / "plan.json", plan, "loftq")
        same = next((a for a in self.arms.values() if a["kind"] == "plan" and a["objective"] == obj
                     and a["id"] != arm_id and a["same_as"] is None and a["choice"] == arm["choice"]), None)
        if same is not None:  # the same plan at another budget: one set of runs, reported under both budgets
            arm["same_as"] = same["id"]
            self.train_tasks(same, self.s.key_seeds if self.is_key(b) else self.s.seeds, self.is_key(b))
            return
        self.kl_task(arm_id, out / "plan.json", "kl-arm")
        self.train_tasks(arm, self.s.key_seeds if self.is_key(b) else self.s.seeds, self.is_key(b))

    # ---- collect -------------------------------------------------------------------------------------------------
    def collect(self) -> dict:
        def kl_of(arm_id: str):
            path = self.work / "kl" / safe(arm_id)
            return calls.read_evaluate(path) if (path / calls.EVALUATE_FILE).is_file() else None

        fp, fp_kl = [], []  # the fine-tune's windows; evaluate's (KL) windows
        for u in self.uniform.values():
            k = kl_of(f"uniform:{u['label']}")
            u["kl"], u["ppl_init"] = (k or {}).get("kl"), (k or {}).get("ppl")
            u["predicted"] = {o: predicted_error(t, u["choice"], False) for o, t in self.tables.items()}
        for arm in self.arms.values():
            src = self.arms[arm["same_as"]] if arm["same_as"] else arm
            if arm["kind"] == "loftq":
                u = self.uniform[arm["config"]]
                arm["kl"], arm["ppl_init"] = u["kl"], u["ppl_init"]
                u["trained_as"] = arm["id"]
            else:
                k = kl_of(src["id"])
                arm["kl"], arm["ppl_init"] = (k or {}).get("kl"), (k or {}).get("ppl")
                if k and k.get("fp_ppl") is not None:
                    fp_kl.append(k["fp_ppl"])
            runs = []
            for seed in range(max(self.s.key_seeds, self.s.seeds)):
                path = self.work / "train" / f"{safe(src['id'])}-s{seed}"
                if (path / calls.TRAIN_FILE).is_file():
                    runs.append({"seed": seed, **calls.read_train(path)})
            arm["runs"] = runs
            arm["ppl_after_seeds"] = [r["ppl_after"] for r in runs]
            arm["ppl_after_mean"], arm["ppl_after_std"] = mean_std(r["ppl_after"] for r in runs)
            arm["ppl_before_mean"], _ = mean_std(r["ppl_before"] for r in runs)
            fp += [r["fp_ppl"] for r in runs if r.get("fp_ppl") is not None]
            arm["predicted"] = {o: predicted_error(t, arm["choice"], arm["init"] == "qlora")
                                for o, t in self.tables.items()}
            arm["status"] = self.arm_status(src)
        fp_ppl = sorted(fp)[len(fp) // 2] if fp else None
        m = {"name": self.name, "folder": self.model, "fingerprint": self.source.fingerprint,
             "weights": self.source.note, "weights_sha256": weights_sha256(self.source), "tokenizer": self.tokenizer,
             "architecture": (self.source.config.get("architectures") or ["?"])[0], "matrices": len(self.matrices),
             "params": self.params, "qlora_bits": self.qlora_bits, "budgets": self.budgets,
             "budget_bits": self.budget_bits, "arms": {k: compact(a) for k, a in self.arms.items()},
             "uniform": {k: compact(u) for k, u in self.uniform.items()}, "fp_ppl": fp_ppl,
             "profiles": {o: str(self.work / "plans" / f"{o}-{self.qlora_bits}") for o in self.tables},
             "fp_ppl_spread": [min(fp), max(fp)] if fp else None,
             "fp_ppl_kl_windows": sorted(fp_kl)[len(fp_kl) // 2] if fp_kl else None, "gpu_estimates_gb": self.gpu,
             "skipped": self.skipped}
        m["claims"] = [] if self.skipped else judge(m, self.s)
        return m

    def arm_status(self, arm: dict) -> str:
        states = [t.state for k, t in self.runner.tasks.items() if k.startswith(f"{self.name}/train/{arm['id']}/")]
        if not states:
            return "not run"
        return "ok" if all(x == "ok" for x in states) else ", ".join(sorted(set(states)))


def compact(arm: dict) -> dict:
    """An arm as results.json keeps it: how many matrices take each configuration instead of the whole choice
    (the plan file in runs.tar.gz has it)."""
    counts: dict[str, int] = {}
    for label in arm["choice"].values():
        counts[label] = counts.get(label, 0) + 1
    return {**{k: v for k, v in arm.items() if k != "choice"}, "config_counts": dict(sorted(counts.items()))}


def weights_sha256(source) -> dict[str, str]:
    out = {}
    for f in source.files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while block := fh.read(1 << 24):
                h.update(block)
        out[Path(f).name] = h.hexdigest()
    return out
