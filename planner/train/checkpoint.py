"""Training checkpoints: the state a run continues from (TrainState: adapters, optimizer, scheduler, step, data
position, history, RNG states), saved to one file atomically and loaded with its settings checked."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..dist import RankInfo
from ..errors import UserError
from ..fsio import atomic_path
from .parallel import gather

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


@dataclass
class TrainState:
    """What a run needs to continue exactly where a saved one stood. `data` is the batch stream (state() /
    load_state()); `identity` the settings a resume must match (check_resume_settings); `step` the last finished
    optimizer step; `resumed_from` the step of the checkpoint it was loaded from."""

    adapters: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data: object
    identity: dict
    step: int = 0
    history: list[dict] = field(default_factory=list)
    resumed_from: int | None = None

    def save(self, path, info: RankInfo, device) -> None:
        """Write the checkpoint to `path` atomically (temp + rename: a killed write leaves the previous one).
        Every rank must call (each rank's RNG state is saved); rank 0 writes."""
        rng = gather(rng_state(device), info)
        if not info.main:
            return
        state = {"schema": CHECKPOINT_SCHEMA, "step": self.step, "settings": self.identity,
                 "adapters": {name: p.detach() for name, p in self.adapters.items()},
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "data": self.data.state(), "rng": rng, "history": self.history}
        with atomic_path(path) as tmp:
            try:
                torch.save(state, tmp)
            except RuntimeError as e:  # torch reports a full disk as a RuntimeError from its zip writer
                raise OSError(f"writing checkpoint {path} failed: {e}") from None

    def load(self, path, info: RankInfo, device) -> bool:
        """Continue from the checkpoint at `path` (False when there is none); a checkpoint written with other
        settings is refused in one line."""
        state = load_checkpoint(path, device)
        if state is None:
            return False
        check_resume_settings(state["settings"], self.identity, path)
        with torch.no_grad():
            for name, p in self.adapters.items():
                p.copy_(state["adapters"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.data.load_state(state["data"])
        set_rng_state(state["rng"][info.rank], device)
        self.history = list(state["history"])
        self.step = self.resumed_from = int(state["step"])
        return True
