"""Claims (a)-(e) of the decoder study, judged per model from the collected arms, each with its numbers.

Status: PASS (held wherever it was measured, and it was measured everywhere the claim speaks of), FAIL (broken
somewhere it was measured), INCOMPLETE (held where measured, but some budgets or arms did not run), NOT MEASURED."""

from __future__ import annotations

import math
import statistics

import pandas as pd

CLAIMS = {
    "a": "At every budget the plan's measured KL before fine-tuning is below that of every uniform configuration "
         "that fits",
    "b": "At QLoRA's own bits, the plan's perplexity after fine-tuning is at most QLoRA's",
    "c": "The {near}-bit plan ends within {pct:g}% of QLoRA NF4's perplexity",
    "d": "Output-aware <= Fisher <= data-free after fine-tuning, at every budget",
    "e": "Spearman rank correlation between the planner's predicted error and the perplexity after fine-tuning, "
         "across all arms, reaches {goal:g}",
}
ORDER = ("output", "fisher", "data-free")  # claim (d)'s ranking, best first


def _ok(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def fmt(v, spec: str = ".4g") -> str:
    return format(v, spec) if _ok(v) else "—"


def after(arm: dict | None):
    return arm.get("ppl_after_mean") if arm else None


def after_text(arm: dict | None) -> str:
    if not arm or not _ok(after(arm)):
        return "not run"
    seeds = arm.get("ppl_after_seeds") or []
    spread = f" ± {arm['ppl_after_std']:.3f}" if len(seeds) > 1 else ""
    return f"{arm['ppl_after_mean']:.3f}{spread} ({len(seeds)} seed{'s' if len(seeds) != 1 else ''}: " \
           f"{', '.join(f'{x:.3f}' for x in seeds)})"


def status(held: bool, compared: int, wanted: int) -> str:
    if not compared:
        return "NOT MEASURED"
    if not held:
        return "FAIL"
    return "PASS" if compared >= wanted else "INCOMPLETE"


def plan_arm(arms: dict, objective: str, budget: float) -> dict | None:
    return next((a for a in arms.values() if a["kind"] == "plan" and a["objective"] == objective
                 and a["budget"] == budget), None)


def qlora_arm(arms: dict) -> dict | None:
    return next((a for a in arms.values() if a["kind"] == "qlora"), None)


def claim_a(m: dict, s) -> dict:
    per, detail = {}, []
    measured_uniform = [u for u in m["uniform"].values() if _ok(u.get("kl"))]
    for obj in s.objectives:
        held, compared, parts = True, 0, []
        for b in m["budgets"]:
            p = plan_arm(m["arms"], obj, b)
            fits = [u for u in measured_uniform if u["bits"] <= m["budget_bits"][str(b)]]
            if not p or not _ok(p.get("kl")) or not fits:
                parts.append(f"{b}: " + ("plan KL not measured" if fits else "no uniform configuration measured"))
                continue
            best = min(fits, key=lambda u: u["kl"])
            win = p["kl"] < best["kl"]
            held &= win
            compared += 1
            parts.append(f"{b}: plan {p['kl']:.4g} vs best uniform {best['label']} {best['kl']:.4g} "
                         f"({100 * (p['kl'] / best['kl'] - 1):+.1f}%, {len(fits)} fit)" + ("" if win else " NOT below"))
        per[obj] = status(held, compared, len(m["budgets"]))
        detail.append(f"{obj}: {per[obj]}; " + "; ".join(parts))
    return {"id": "a", "claim": CLAIMS["a"], "status": per[s.headline], "by_objective": per, "detail": detail}


def claim_b(m: dict, s) -> dict:
    q = qlora_arm(m["arms"])
    b = m["qlora_bits"]
    per, detail = {}, [f"QLoRA NF4 b64 dq r{s.qlora_rank} at {b} bits: {after_text(q)}"]
    for obj in s.objectives:
        p = plan_arm(m["arms"], obj, b)
        ok = _ok(after(p)) and _ok(after(q))
        per[obj] = status(ok and after(p) <= after(q), int(ok), 1)
        detail.append(f"{obj} plan at {b} bits: {after_text(p)}" + (f" ({after(p) - after(q):+.3f})" if ok else ""))
    return {"id": "b", "claim": CLAIMS["b"], "status": per[s.headline], "by_objective": per, "detail": detail}


def claim_c(m: dict, s) -> dict:
    q = qlora_arm(m["arms"])
    per, detail = {}, []
    for obj in s.objectives:
        p = plan_arm(m["arms"], obj, s.near_budget)
        ok = _ok(after(p)) and _ok(after(q))
        ratio = after(p) / after(q) if ok else None
        per[obj] = status(ok and ratio <= s.near_ratio, int(ok), 1)
        detail.append(f"{obj} plan at {s.near_budget} bits: {after_text(p)}; x{fmt(ratio, '.3f')} QLoRA's "
                      f"{fmt(after(q), '.3f')} at {m['qlora_bits']} bits")
    text = CLAIMS["c"].format(near=s.near_budget, pct=100 * (s.near_ratio - 1))
    return {"id": "c", "claim": text, "status": per[s.headline], "by_objective": per, "detail": detail}


def claim_d(m: dict, s) -> dict:
    ranked = [o for o in ORDER if o in s.objectives]
    held, compared, detail = True, 0, []
    for b in m["budgets"]:
        vals = [(o, after(plan_arm(m["arms"], o, b)), plan_arm(m["arms"], o, b)) for o in ranked]
        if len(ranked) < 2 or not all(_ok(v) for _, v, _ in vals):
            detail.append(f"{b}: not every objective's plan was fine-tuned")
            continue
        compared += 1
        good = all(vals[i][1] <= vals[i + 1][1] for i in range(len(vals) - 1))
        held &= good
        spread = max((a.get("ppl_after_std") or 0.0) for _, _, a in vals)
        detail.append(f"{b}: " + " / ".join(f"{o} {v:.3f}" for o, v, _ in vals)
                      + f" (largest seed std {spread:.3g})" + ("" if good else " ORDER BROKEN"))
    return {"id": "d", "claim": CLAIMS["d"], "status": status(held, compared, len(m["budgets"])), "detail": detail}


def spearman(x, y) -> float | None:
    pairs = [(a, b) for a, b in zip(x, y) if _ok(a) and _ok(b)]
    if len(pairs) < 3:
        return None
    xs, ys = pd.Series([p[0] for p in pairs]), pd.Series([p[1] for p in pairs])
    rho = xs.rank().corr(ys.rank())
    return None if math.isnan(rho) else float(rho)


def claim_e(m: dict, s) -> dict:
    trained = [a for a in m["arms"].values() if _ok(after(a)) and not a.get("same_as")]
    with_kl = [a for a in m["arms"].values() if _ok(a.get("kl")) and not a.get("same_as")] + \
        [u for u in m["uniform"].values() if _ok(u.get("kl")) and not u.get("trained_as")]
    per, rho_kl, detail = {}, {}, []
    for obj in s.objectives:
        per[obj] = spearman([a["predicted"].get(obj) for a in trained], [after(a) for a in trained])
        rho_kl[obj] = spearman([a["predicted"].get(obj) for a in with_kl], [a["kl"] for a in with_kl])
        detail.append(f"{obj} table: rho(predicted, ppl after) {fmt(per[obj], '.3f')} over {len(trained)} arms; "
                      f"rho(predicted, KL before) {fmt(rho_kl[obj], '.3f')} over {len(with_kl)} arms")
    head = per.get(s.headline)
    st = "NOT MEASURED" if head is None or len(trained) < 4 else ("PASS" if head >= s.spearman_goal else "FAIL")
    return {"id": "e", "claim": CLAIMS["e"].format(goal=s.spearman_goal), "status": st, "rho_ppl": per,
            "rho_kl": rho_kl, "arms": len(trained), "detail": detail}


def judge(m: dict, s) -> list[dict]:
    return [claim_a(m, s), claim_b(m, s), claim_c(m, s), claim_d(m, s), claim_e(m, s)]


def mean_std(values, missing=None) -> tuple:
    """Mean and sample std (0 for one value) of the values present (None and NaN are absent); (missing, missing)
    when none is. The quality studies pass missing=math.nan: their plots skip NaN."""
    values = [v for v in values if _ok(v)]
    if not values:
        return missing, missing
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
