"""Training checkpoints: adapters, optimizer, scheduler, data position, history and RNG states
in one file, written atomically; settings checked on resume."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_SCHEMA = "lqplan.train-checkpoint/1"


def rng_state(device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def load_checkpoint(path, device="cpu") -> dict | None:
    """The checkpoint at `path` (a dict), or None when there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same answer
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}); delete it to start over") from None
    if not isinstance(state, dict) or state.get("schema") != CHECKPOINT_SCHEMA:
        raise UserError(f"{path} is not an lqplan training checkpoint ({CHECKPOINT_SCHEMA}); delete it or use "
                        "another output folder")
    return state


def check_resume_settings(saved: dict, now: dict, path) -> None:
    diff = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diff:
        k = diff[0]
        raise UserError(f"checkpoint {path} was written with {k}={saved.get(k)!r}, this run has {k}={now.get(k)!r}; "
                        "resume with the same settings, or drop --resume / use another output folder")


def clean_stale_temps(folder: Path) -> None:
    """Temp files of checkpoint writes killed before their rename (never a complete checkpoint) are removed."""
    for tmp in folder.glob(f".{CHECKPOINT}.*.tmp"):
        tmp.unlink(missing_ok=True)
