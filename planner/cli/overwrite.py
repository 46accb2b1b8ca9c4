"""One plan per output folder: `lqplan plan` refuses to replace a plan.json made for another request unless
given --force (docs/conventions.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..fsio import read_json
from ..profile.objective import plan_objective


def _field(doc, *keys):
    for key in keys:
        doc = doc.get(key) if isinstance(doc, dict) else None
    return doc


def refuse_another_plan(folder, *, budget: str, fingerprint: Callable[[], str], method: dict,
                        objective: str) -> None:
    """`lqplan plan` into a folder that holds a plan.json made for another request (another budget, model weights,
    grid or objective) is refused, so that following commands in order never picks up whichever plan ran last;
    --force replaces it, and rerunning the same request (to resume or refresh it) is always allowed. A plan.json
    that cannot be read as a plan (no budget and model records) is not one to protect: it is replaced.
    `objective`: the requested one (ProfileSettings.objective), compared with the recorded plan's (plan_objective).
    `fingerprint()` gives the requested model's; it is only called when the rest of the request matches."""
    path = Path(folder) / "plan.json"
    if not path.is_file():
        return
    try:
        old = read_json(path, "it is replaced")
    except UserError:
        return
    if not (isinstance(_field(old, "budget"), dict) and isinstance(_field(old, "model"), dict)):
        return
    recorded = _field(old, "method") or {}
    same = {"budget": _field(old, "budget", "spec") == budget,
            "grid or solver": isinstance(recorded, dict) and ("tie" in recorded) == ("tie" in method)
                              and all(recorded.get(k) == v for k, v in method.items()),
            "objective": isinstance(recorded, dict) and plan_objective(recorded) == objective}
    differs = [what for what, ok in same.items() if not ok]
    if not differs and _field(old, "model", "fingerprint") != fingerprint():
        differs = ["model"]
    if differs:
        raise UserError(f"{path} holds another plan (budget {_field(old, 'budget', 'spec')}; this run differs in its "
                        f"{', '.join(differs)}); pass --force to replace it, or choose another folder with --out")
