"""Reading a profile table back (profile.csv): the one check every reader goes through, so a table without a
column the reports need, or with a non-finite error, is one line naming the problem instead of a crash later."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import UserError
from ..fsio import TABLE_CAP, read_regular

# What a reader of profile.csv needs: the ILP's columns plus the matrix shape.
READ_COLUMNS = ("matrix", "m", "n", "label", "rank", "error", "storage_bits")
_REMAKE = "re-create it with `lqplan profile`"


def read_profile_csv(csv: Path, with_digest: bool = False):
    """profile.csv as a checked DataFrame (see check_profile_table); with_digest: (table, sha256 of the file)."""
    csv = Path(csv)
    if not csv.exists() and not csv.is_symlink():
        raise UserError(f"no profile table at {csv}; pass --profile with the profile.csv written by `lqplan plan` "
                        "or `lqplan profile`")
    raw = read_regular(csv, f"pass --profile with the profile.csv written by `lqplan plan`, or {_REMAKE}",
                       "profile table", TABLE_CAP)
    try:
        table = pd.read_csv(io.BytesIO(raw))
    except (ValueError, UnicodeDecodeError, OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise UserError(f"{csv} is not a readable profile table ({type(e).__name__}); {_REMAKE}") from None
    table = check_profile_table(table, csv)
    return (table, hashlib.sha256(raw).hexdigest()) if with_digest else table


def check_profile_table(table: pd.DataFrame, where: Path | str = "the profile table") -> pd.DataFrame:
    """Required columns present, shapes and storage positive integers, errors finite and >= 0, no row twice."""
    if table.empty:
        raise UserError(f"{where} has no rows; {_REMAKE}")
    missing = [c for c in READ_COLUMNS if c not in table.columns]
    if missing:
        raise UserError(f"{where} is not a readable profile table: it lacks the column(s) {', '.join(missing)}; {_REMAKE}")
    table = table.assign(matrix=table["matrix"].astype(str), label=table["label"].astype(str))
    for col, low in (("m", 1), ("n", 1), ("rank", 0), ("storage_bits", 0)):
        v = pd.to_numeric(table[col], errors="coerce").to_numpy(dtype=np.float64)
        if not (np.isfinite(v) & (v >= low) & (v == np.round(v))).all():
            raise UserError(f"{where}: column {col} must hold integers >= {low}; {_REMAKE}")
        table[col] = v.astype(np.int64)
    for col in ("error", "error_unweighted"):
        if col not in table.columns:
            continue
        v = pd.to_numeric(table[col], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~(np.isfinite(v) & (v >= 0))
        if bad.any():
            row = table.loc[bad].iloc[0]
            raise UserError(f"{where}: {col} of {row['matrix']} / {row['label']} is not a finite number >= 0; "
                            f"{_REMAKE}")
        table[col] = v
    dup = table.duplicated(["matrix", "label"])
    if dup.any():
        row = table.loc[dup].iloc[0]
        raise UserError(f"{where} lists {row['matrix']} / {row['label']} twice; {_REMAKE}")
    shapes = table.groupby("matrix")[["m", "n"]].nunique()
    if (shapes > 1).any(axis=None):
        raise UserError(f"{where} gives matrix {shapes.index[(shapes > 1).any(axis=1)][0]} two shapes; {_REMAKE}")
    return table
