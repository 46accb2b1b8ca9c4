"""Exact multiple-choice knapsack: a sparse dynamic program over the budget, pruned by reduced costs and suffix LP
bounds. Pure functions over numpy arrays.

Hand-written because no library solves MCKP exactly, and branch and bound (HiGHS, CBC) stalls on near-symmetric
instances (layers whose errors agree to 1e-4): millions of near-equal plans to refute.

Input: the restricted instance of planner.plan.ilp._restricted: rows sorted by matrix, then storage; each matrix's first
row has shift (0 units, 0 error), its later ones more units and less error. For a target error G:
- rows whose Lagrangian reduced cost exceeds G - LP bound are left out (a plan using one has error > G);
- stage i keeps the Pareto list of (units used, error) over matrices 0..i-1: f_i(c), the least error within c
  units, is the error of the last state with units <= c, i.e. the dense DP table best[c] of dense_solve below
  (the same float additions in the same order), stored only at the budget positions where it changes;
- a state is dropped when its error plus the LP relaxation of the remaining matrices at the remaining capacity
  exceeds G. Every plan of error <= G keeps all its states, so a last stage that reaches error <= G holds the
  optimum. G starts just above the LP bound and widens geometrically up to the incumbent (iterative deepening):
  the lists stay small because the optimum is near the bound;
- the plan is traced back as the dense DP does (at capacity c, the first row j minimising f_{i-1}(c - d_j) + e_j);
  rows and states left out cannot reach the optimum, so ties are broken exactly as the dense DP breaks them;
- the search runs over the matrices in an order that puts alike ones (same storage table, near-equal errors)
  side by side: plans that only permute configurations among them reach the same units, so the Pareto filter
  keeps one of them instead of all (near-symmetric 70B: 23k states instead of 3M). Its optimum is the dense DP's
  plan when no other plan comes within the float slack of it (checked over the kept states); otherwise (exact
  ties, as in copied layers) one more round in the given order, at the optimum's error, traces the dense DP's.
"""

from __future__ import annotations

import numpy as np

from .instance import lower_hull, matrix_spans

FIRST_GAP = 1e-7  # first target's distance above the LP bound, relative to |total error|
WIDEN = 4.0  # each round that finds no plan multiplies that distance by this
# Slack on every prune test, relative to |total error|: bounds and state errors are float sums in other orders.
PRUNE_SLACK = 1e-11


class TooLarge(Exception):
    """The state lists outgrew the work or memory limit; the caller falls back to another method."""


def lower_hulls(ds: np.ndarray, de: np.ndarray, spans: list[tuple[int, int]], active: np.ndarray):
    """Each matrix's lower-hull steps over its active rows (units, error change, matrix), most error removed per
    unit first; ties in (matrix, position) order."""
    mats, dx, dy = [], [], []
    s, e = ds.tolist(), de.tolist()
    for i, (lo, hi) in enumerate(spans):
        hull = lower_hull(s, e, [k for k in range(lo, hi) if active[k]])
        for a, b in zip(hull[:-1], hull[1:]):
            mats.append(i)
            dx.append(s[b] - s[a])
            dy.append(e[b] - e[a])
    mats, dx, dy = np.asarray(mats, np.int64), np.asarray(dx, np.int64), np.asarray(dy, np.float64)
    order = np.lexsort((np.arange(len(mats)), dy / np.maximum(dx, 1)))  # most negative slope first
    return mats[order], dx[order], dy[order]


def _suffix_lp(hulls, first: int):
    """Breakpoints (units, error change) of the LP relaxation of matrices first.. as a function of capacity."""
    mats, dx, dy = hulls
    take = mats >= first
    return np.concatenate(([0], np.cumsum(dx[take]))), np.concatenate(([0.0], np.cumsum(dy[take])))


def _lagrangian_tails(ds, de, spans, active, cap, hulls) -> tuple[float, np.ndarray]:
    """(lam, tail): for the price lam of the LP at full capacity, tail[i] = sum over matrices i.. of their least
    de + lam * ds. Then LP of matrices i.. within r units >= tail[i] - lam * r (weak duality): a linear bound, a
    cheap first filter before the exact piecewise-linear one."""
    _, dx, dy = hulls
    at = int(np.searchsorted(np.cumsum(dx), cap, side="right"))
    lam = float(-dy[at] / dx[at]) if at < len(dx) else 0.0
    price = np.where(active, de + lam * ds, np.inf)
    least = np.minimum.reduceat(price, [lo for lo, _ in spans])
    return lam, np.concatenate((np.cumsum(least[::-1])[::-1], [0.0]))


def _forward(ds, de, spans, active, cap, hulls, target, max_cells, max_bytes):
    """Stage lists (units, errors) after each matrix, only states that can still reach <= target; None if none can."""
    units, errors = np.zeros(1, np.int64), np.zeros(1)
    lam, tail = _lagrangian_tails(ds, de, spans, active, cap, hulls)
    lists, cells, stored = [], 0, 0
    for i, (lo, hi) in enumerate(spans):
        use = np.flatnonzero(active[lo:hi] & (ds[lo:hi] <= cap)) + lo
        cells += len(units) * len(use)
        if cells > max_cells:
            raise TooLarge
        # Linear filter before building candidates: state s + row j can reach <= target only if its Lagrangian
        # value errors[s] + lam * units[s] is at most the row's limit. Taken as a (row, state) mask, each row's
        # survivors stay in units order: the candidates are len(use) sorted runs.
        limit = (target + lam * cap - tail[i + 1]) - (de[use] + lam * ds[use])
        j, s = np.nonzero((errors + lam * units)[None, :] <= limit[:, None])
        u, e = units[s] + ds[use][j], errors[s] + de[use][j]
        fits = u <= cap
        u, e = u[fits], e[fits]
        if len(use) > 1 and len(u):
            # Pareto filter; within equal units any order will do: only the least error of each units survives.
            order = np.argsort(u, kind="stable")
            u, e = u[order], e[order]
            better = e < np.concatenate(([np.inf], np.minimum.accumulate(e)[:-1]))  # than all with <= units
            u, e = u[better], e[better]
            last = np.concatenate((u[1:] != u[:-1], [True]))  # equal units: the later one has less error
            u, e = u[last], e[last]
        x, y = _suffix_lp(hulls, i + 1)  # the exact filter, on the fewer Pareto states
        keep = e + np.interp(cap - u, x, y) <= target  # past the last breakpoint the LP stays
        u, e = u[keep], e[keep]
        stored += u.nbytes + e.nbytes
        if stored > max_bytes:
            raise TooLarge
        if not len(u):
            return None
        lists.append((u, e))
        units, errors = u, e
    return lists


def _at_capacity(ds, spans, active, lists, i: int, c: int):
    """Matrix i's rows at remaining capacity c: (which rows fit, the state each lands on, their states' errors)."""
    lo, hi = spans[i]
    u, e = lists[i - 1] if i else (np.zeros(1, np.int64), np.zeros(1))
    room = c - ds[lo:hi]
    pos = np.searchsorted(u, room, side="right") - 1
    return active[lo:hi] & (room >= 0) & (pos >= 0), pos, e


def _trace(ds, de, spans, active, cap, lists) -> np.ndarray:
    """The dense DP's traceback: at capacity c take the first row j minimising f_{i-1}(c - ds[j]) + de[j]."""
    out = np.empty(len(spans), dtype=np.int64)
    c = cap
    for i in range(len(spans) - 1, -1, -1):
        lo, hi = spans[i]
        ok, pos, e = _at_capacity(ds, spans, active, lists, i, c)
        vals = np.where(ok, e[np.maximum(pos, 0)] + de[lo:hi], np.inf)
        j = lo + int(np.argmin(vals))
        out[i] = j
        c -= int(ds[j])
    return out


def _search(ds, de, rc, spans, cap, lower, upper, slack, max_cells, max_bytes):
    """Rounds of widening targets from the LP bound to the incumbent: (lists, active rows, target, rounds) of the
    first round whose last stage is not empty."""
    firsts = np.zeros(len(ds), dtype=bool)
    firsts[[lo for lo, _ in spans]] = True  # the (0, 0) rows: they anchor the hulls and the shifts
    gap, rounds = max(FIRST_GAP * slack / PRUNE_SLACK, slack), 0  # slack / PRUNE_SLACK: |total error|
    while True:
        rounds += 1
        target = min(lower + gap, upper) + slack
        active = firsts | (rc <= target - lower + slack)
        hulls = lower_hulls(ds, de, spans, active)
        lists = _forward(ds, de, spans, active, cap, hulls, target, max_cells, max_bytes)
        if lists is not None:
            return lists, active, target, rounds
        if lower + gap >= upper:
            raise AssertionError("the incumbent's own plan was pruned")  # a bug: it has error upper <= target
        gap *= WIDEN
        if 2 * gap >= upper - lower:  # a round's cost grows fast with its gap: go to the incumbent at once
            gap = upper - lower


def _one_round(ds, de, rc, spans, cap, lower, target, slack, max_cells, max_bytes):
    """(lists, active rows) of one round at `target`, which the caller knows some plan reaches."""
    firsts = np.zeros(len(ds), dtype=bool)
    firsts[[lo for lo, _ in spans]] = True
    active = firsts | (rc <= target - lower + slack)
    lists = _forward(ds, de, spans, active, cap, lower_hulls(ds, de, spans, active), target, max_cells, max_bytes)
    if lists is None:
        raise AssertionError("a plan known to reach the target was pruned")
    return lists, active


def _runner_up(ds, de, spans, active, cap, lists, plan) -> float:
    """Least error of a plan other than `plan` among those the lists keep (inf if none). For such a plan Q, let i be
    the last matrix where Q and `plan` differ: Q is a kept state of matrices 0..i-1, a row of matrix i other than
    plan's, then plan's rows after i; so a minimum over (i, row), each at plan's remaining capacity."""
    best, c, after = np.inf, cap, 0.0
    for i in range(len(spans) - 1, -1, -1):
        lo, hi = spans[i]
        ok, pos, e = _at_capacity(ds, spans, active, lists, i, c)
        ok[plan[i] - lo] = False
        if ok.any():
            best = min(best, float((e[pos[ok]] + de[lo:hi][ok]).min()) + after)
        after += float(de[plan[i]])
        c -= int(ds[plan[i]])
    return best


def solve(ds: np.ndarray, de: np.ndarray, rc: np.ndarray, spans: list[tuple[int, int]], cap: int, lower: float,
          upper: float, scale: float, max_cells: int, max_bytes: int,
          order: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Exact optimum of the restricted instance: (one row index per span, rounds). lower: the LP bound and upper: an
    incumbent's error, both in the shifted errors of `de`; rc: each row's Lagrangian reduced cost (a plan using row
    r has error >= lower + rc[r]); scale: |total error|, for the float slack. Raises TooLarge when one round
    exceeds max_cells (state x row evaluations) or max_bytes (stored state lists).

    order: the matrices in the order to search them, alike matrices (same storage table, near-equal errors)
    adjacent: the plans that only permute their configurations then reach the same units and the Pareto filter
    keeps one of them, where the given order keeps each (at 70B near-symmetric: 23k states instead of 3M). The
    plan must still be the dense DP's, whose ties depend on the given order (and its float sums): when no other
    kept plan is within the slack of the optimum found, the dense DP's plan is that optimum; else one round in the
    given order at the optimum's error traces it."""
    ds, de, rc = np.asarray(ds, np.int64), np.asarray(de, np.float64), np.asarray(rc, np.float64)
    slack = PRUNE_SLACK * max(abs(scale), 1e-300)
    if order is None or np.array_equal(order, np.arange(len(spans))):
        lists, active, _, rounds = _search(ds, de, rc, spans, cap, lower, upper, slack, max_cells, max_bytes)
        return _trace(ds, de, spans, active, cap, lists), rounds
    rows = np.concatenate([np.arange(*spans[m]) for m in order.tolist()])
    width = np.array([hi - lo for lo, hi in spans])[order]
    ends = np.cumsum(width)
    alike = list(zip((ends - width).tolist(), ends.tolist()))
    a_ds, a_de, a_rc = ds[rows], de[rows], rc[rows]
    lists, active, target, rounds = _search(a_ds, a_de, a_rc, alike, cap, lower, upper, slack, max_cells, max_bytes)
    plan = _trace(a_ds, a_de, alike, active, cap, lists)
    best = float(lists[-1][1][-1])  # the trace's error: the last state within cap
    check = best + 2 * slack  # a round at this target keeps every plan within 2 slack of the optimum
    if check > target:
        lists, active = _one_round(a_ds, a_de, a_rc, alike, cap, lower, check, slack, max_cells, max_bytes)
    if _runner_up(a_ds, a_de, alike, active, cap, lists, plan) > best + slack:
        out = np.empty(len(spans), dtype=np.int64)
        out[order] = rows[plan]
        return out, rounds
    lists, active = _one_round(ds, de, rc, spans, cap, lower, check, slack, max_cells, max_bytes)
    return _trace(ds, de, spans, active, cap, lists), rounds + 1


def hull_curve(min_bits: int, min_error: float, inc_ds: np.ndarray, inc_de: np.ndarray, budgets) -> np.ndarray:
    """The MCKP LP optimum at each budget from the hull-greedy steps (units, error change, best first): piecewise
    linear between the breakpoints, exact, a lower bound on the best plan and equal to it at the breakpoints
    (there the LP takes whole steps only). NaN below min_bits (no plan fits)."""
    x = min_bits + np.concatenate(([0], np.cumsum(inc_ds))).astype(np.float64)
    y = min_error + np.concatenate(([0.0], np.cumsum(inc_de)))
    b = np.asarray(budgets, dtype=np.float64)
    return np.where(b < min_bits, np.nan, np.interp(b, x, y))


# ---- the dense table: same plan, used when the sparse lists outgrow their limits ------------------------
# Bytes per budget unit of dense_solve's float64 working arrays (best, new, a candidate slice) and boolean mask.
_DP_WORK_BYTES_PER_UNIT = 3 * 8 + 1


def dense_solve(n_matrices: int, restricted) -> np.ndarray:
    """Exact optimum of the kept rows (`restricted` from _restricted): best[c] = least error shift of the matrices
    so far within c units. Ties go to the earlier (smaller) configuration, so the plan is deterministic."""
    rows, mats, ds, de, cap = restricted
    best = np.zeros(cap + 1)
    picks = []  # (lo, hi, index of the row chosen at each capacity or None when the matrix has one row)
    for lo, hi in zip(*matrix_spans(mats)):
        if hi - lo == 1:  # only its cheapest kept row (shift 0): nothing to choose
            picks.append((lo, hi, None))
            continue
        new = np.full(cap + 1, np.inf)
        arg = np.zeros(cap + 1, dtype=_choice_dtype(hi - lo))
        for j in range(lo, hi):
            d = int(ds[j])
            if d > cap:
                break  # storage ascends within a matrix
            cand = best[:cap + 1 - d] + de[j]
            better = cand < new[d:]
            new[d:][better] = cand[better]
            arg[d:][better] = j - lo
        best = new
        picks.append((lo, hi, arg))
    out = np.empty(n_matrices, dtype=np.int64)
    c = cap
    for lo, _, arg in reversed(picks):
        j = lo if arg is None else lo + int(arg[c])
        out[mats[j]] = rows[j]
        c -= int(ds[j])
    return out


def _choice_dtype(choices: int) -> type:
    """The dtype of a matrix's DP choice table: the index of its chosen row among `choices`."""
    return np.uint8 if choices <= 256 else np.int16


def dense_fits(restricted, max_cells: int, max_bytes: int) -> bool:
    """Whether dense_solve's work (cells) and memory (choice tables + working arrays) stay under max_cells and
    max_bytes."""
    rows, mats, _, _, cap = restricted
    tables = sum(np.dtype(_choice_dtype(c)).itemsize for c in np.bincount(mats).tolist() if c > 1)
    memory = (tables + _DP_WORK_BYTES_PER_UNIT) * (cap + 1)
    return len(rows) * (cap + 1) <= max_cells and memory <= max_bytes
