"""The profile table as a multiple-choice knapsack instance: validated, dominated configurations dropped, sorted
deterministically, with each matrix's lower convex hull, the exact LP relaxation (convex-hull greedy), the greedy
incumbent and a local search that improves it."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pandas as pd

from ..errors import UserError

# Optimality is claimed within this relative tolerance of the total error (both solvers are asked for it).
# 1e-6: far below the profile's own noise (the randomized solver is within 1% of exact LoftQ); 1e-9 made HiGHS
# branch for minutes on some real 84-matrix profiles to separate plans that differ in the 9th digit.
RTOL = 1e-6


REQUIRED_COLUMNS = ("matrix", "label", "error", "storage_bits")


class InfeasibleBudget(UserError):
    """The budget is below the smallest plan (every matrix at its cheapest configuration)."""

    def __init__(self, message: str, min_bits: int, budget_bits: int):
        super().__init__(message)
        self.min_bits = min_bits
        self.budget_bits = budget_bits

    @classmethod
    def below(cls, budget_bits: int, min_bits: int, describe: Callable[[int], str], smallest: str,
              note: str = "") -> "InfeasibleBudget":
        """The one wording of an infeasible budget: both bit counts in the user's unit, what the smallest plan is."""
        return cls(f"the budget, {describe(budget_bits)}, is below the smallest possible plan ({smallest}); raise it "
                   f"to at least {describe(min_bits)}" + note, min_bits, budget_bits)


class Instance:
    """The table reduced to undominated configurations, sorted deterministically, with each matrix's lower hull."""

    def __init__(self, table: pd.DataFrame):
        if not isinstance(table, pd.DataFrame) or table.empty:
            raise UserError("the profile table is empty; profile at least one matrix before planning")
        missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
        if missing:
            raise UserError(f"the profile table lacks columns {missing}; re-create it with `lqplan profile`")
        df = table.loc[:, list(REQUIRED_COLUMNS)].copy()
        df["matrix"] = df["matrix"].astype(str)
        df["label"] = df["label"].astype(str)
        err = pd.to_numeric(df["error"], errors="coerce").to_numpy(dtype=np.float64)
        if not np.isfinite(err).all() or (err < 0).any():
            bad = df.loc[~(np.isfinite(err) & (err >= 0)), ["matrix", "label"]].iloc[0]
            raise UserError(f"profile error of {bad['matrix']} / {bad['label']} is not a finite non-negative number; "
                            "re-profile that matrix")
        bits = pd.to_numeric(df["storage_bits"], errors="coerce").to_numpy(dtype=np.float64)
        if not np.isfinite(bits).all() or (bits < 0).any() or (bits != np.round(bits)).any():
            raise UserError("profile storage_bits must be non-negative integers; re-create the table with "
                            "`lqplan profile`")
        df["error"], df["storage_bits"] = err, bits.astype(np.int64)
        dup = df.duplicated(["matrix", "label"])
        if dup.any():
            row = df.loc[dup].iloc[0]
            raise UserError(f"the profile table lists {row['matrix']} / {row['label']} twice; drop the duplicate rows")

        self.n_configs = len(df)
        self.params = table_params(table)
        df = df.sort_values(["matrix", "storage_bits", "error", "label"], kind="mergesort", ignore_index=True)
        self.names = list(pd.unique(df["matrix"]))
        # Dominance: sorted by (size, error, label), a row is kept only if it beats every smaller-or-equal row.
        self.alike_order = _alike_order(df)
        best_before = df.groupby("matrix", sort=False)["error"].cummin().groupby(df["matrix"], sort=False).shift(1)
        keep = best_before.isna().to_numpy() | (df["error"].to_numpy() < best_before.to_numpy())
        df = df.loc[keep].reset_index(drop=True)
        self.n_dominated = self.n_configs - len(df)

        self.mat = pd.Categorical(df["matrix"], categories=self.names).codes.astype(np.int64)
        self.s = df["storage_bits"].to_numpy(dtype=np.int64)
        self.e = df["error"].to_numpy(dtype=np.float64)
        self.label = df["label"].to_numpy(dtype=object)
        bounds = np.flatnonzero(np.diff(self.mat)) + 1
        self.start = np.concatenate(([0], bounds))
        self.stop = np.concatenate((bounds, [len(df)]))
        self.min_bits = int(self.s[self.start].sum())
        self._build_increments()

    def _build_increments(self) -> None:
        # Hand-written lower convex hull (monotone chain): no library solves the MCKP LP by hull greedy.
        src, dst = [], []
        s, e = self.s.tolist(), self.e.tolist()
        for lo, hi in zip(self.start.tolist(), self.stop.tolist()):
            hull = lower_hull(s, e, range(lo, hi))
            src.extend(hull[:-1])
            dst.extend(hull[1:])
        src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
        ds = self.s[dst] - self.s[src]
        de = self.e[dst] - self.e[src]
        eff = -de / ds
        # Most error removed per bit first; ties in (matrix, position) order so the result is deterministic.
        order = np.lexsort((src, -eff))
        self.inc_src, self.inc_dst, self.inc_ds, self.inc_de, self.inc_eff = (
            src[order], dst[order], ds[order], de[order], eff[order])
        self.inc_cum = np.cumsum(self.inc_ds)

    # ---- LP relaxation and greedy incumbent -------------------------------------------------------------------
    def relax(self, budget_bits: int):
        """Exact LP optimum: (bound, multiplier, integral part of the LP solution as row indices per matrix)."""
        cap = budget_bits - self.min_bits
        k = int(np.searchsorted(self.inc_cum, cap, side="right"))  # increments that fit whole
        rows = self.start.copy()
        taken = self.inc_dst[:k]
        np.maximum.at(rows, self.mat[taken], taken)  # a matrix's hull steps are taken in order: keep the furthest
        terms = self.e[rows].tolist()
        if k < len(self.inc_ds):
            used = int(self.inc_cum[k - 1]) if k else 0
            frac = (cap - used) / int(self.inc_ds[k])
            terms.append(frac * float(self.inc_de[k]))
            multiplier = float(self.inc_eff[k])
        else:
            multiplier = 0.0
        return math.fsum(terms), multiplier, rows, k

    def greedy(self, budget_bits: int, rows: np.ndarray, k: int) -> np.ndarray:
        """The LP's integral part, then every later hull step that still fits, in the same order."""
        out = rows.tolist()
        mat = self.mat.tolist()
        left = budget_bits - int(self.s[rows].sum())
        for src, dst, ds in zip(self.inc_src[k:].tolist(), self.inc_dst[k:].tolist(), self.inc_ds[k:].tolist()):
            if ds <= left and out[mat[src]] == src:
                out[mat[src]] = dst
                left -= ds
        return np.asarray(out, dtype=np.int64)

    def improve(self, rows: np.ndarray, candidates: np.ndarray, budget_bits: int) -> np.ndarray:
        """Local search: apply the best improving move of one or two matrices among `candidates` until none is left.

        A better incumbent shrinks the reduced-cost window, so the solver gets fewer variables."""
        cand = np.flatnonzero(candidates)
        if len(cand) > 4000:  # the pair table is len(cand)^2; beyond this the solver is the cheaper tool
            return rows
        rows = rows.copy()
        mat = self.mat[cand]
        other = mat[:, None] != mat[None, :]
        for _ in range(100):
            cur = rows[mat]
            ds, de = self.s[cand] - self.s[cur], self.e[cand] - self.e[cur]
            left = budget_bits - int(self.s[rows].sum())
            tiny = 1e-12 * abs(float(self.e[rows].sum()))
            pair = np.where(other & (ds[:, None] + ds[None, :] <= left), de[:, None] + de[None, :], np.inf)
            u, v = np.unravel_index(int(np.argmin(pair)), pair.shape)
            single = np.where(ds <= left, de, np.inf)
            w = int(np.argmin(single))
            if single[w] <= pair[u, v] and single[w] < -tiny:
                rows[mat[w]] = cand[w]
            elif pair[u, v] < -tiny:
                rows[mat[u]], rows[mat[v]] = cand[u], cand[v]
            else:
                break
        return rows


def _alike_order(df: pd.DataFrame) -> np.ndarray:
    """The matrices (sorted by name) reordered so alike ones are adjacent, for the exact solver's search (see
    planner.plan.mckp.solve): grouped by their storage table (same shape, same grid), then by the error of the
    cheapest configuration (a transformer's layers of one role come together), then by name."""
    bits = df["storage_bits"].to_numpy(dtype=np.int64)
    lo, hi = matrix_spans(pd.Categorical(df["matrix"]).codes)  # df is sorted by (matrix, storage_bits, error)
    tables: dict[bytes, int] = {}
    group = np.array([tables.setdefault(bits[a:b].tobytes(), len(tables)) for a, b in zip(lo, hi)])
    first_error = df["error"].to_numpy(dtype=np.float64)[lo]
    return np.lexsort((np.arange(len(lo)), first_error, group))


def table_params(table: pd.DataFrame) -> int | None:
    if "m" not in table.columns or "n" not in table.columns:
        return None
    shapes = table.drop_duplicates("matrix")
    return int((shapes["m"].astype(np.int64) * shapes["n"].astype(np.int64)).sum())


def default_describe(params: int | None) -> Callable[[int], str]:
    def describe(bits: int) -> str:
        per = f" = {bits / params:.6f} bits/param" if params else ""
        return f"{bits:,} bits ({math.ceil(bits / 8):,} bytes of planned matrices{per})"
    return describe


def lower_hull(s: list, e: list, rows) -> list[int]:
    """The lower convex hull (monotone chain) of the points (s[k], e[k]) for `rows` in ascending storage order:
    a row is dropped unless the slope into it is strictly steeper than the slope out of it (s up, e down)."""
    hull: list[int] = []
    for k in rows:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (e[b] - e[a]) * (s[k] - s[b]) >= (e[k] - e[b]) * (s[b] - s[a]):
                hull.pop()
            else:
                break
        hull.append(k)
    return hull


def matrix_spans(mats: np.ndarray) -> tuple[list[int], list[int]]:
    """[lo, hi) of each matrix's run in a matrix-sorted row array."""
    bounds = np.flatnonzero(np.diff(mats)) + 1
    return np.concatenate(([0], bounds)).tolist(), np.concatenate((bounds, [len(mats)])).tolist()
