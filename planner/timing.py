"""Wall seconds of a command's phases and of its start-up, for run.json."""

from __future__ import annotations

import time
from contextlib import contextmanager


def seconds_since_process_start() -> float | None:
    """Wall seconds since this process started (psutil, which accelerate requires anyway): what ran before the
    first line of a command (interpreter start-up, imports, argument parsing). None where it cannot be read."""
    try:
        import psutil

        return max(0.0, time.time() - psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - a timing only: never a reason to fail
        return None


class PhaseClock:
    """Wall seconds of each named phase of a command, and the seconds from process start to the clock's creation,
    for run.json: `with clock("profile"): ...`; record() gives flat keys (run.json's values are plain numbers)."""

    def __init__(self):
        self.started = time.perf_counter()
        self.before = seconds_since_process_start()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def record(self) -> dict:
        out = {f"phase_{name}_seconds": round(v, 2) for name, v in self.seconds.items()}
        if self.before is not None:
            out["phase_startup_seconds"] = round(self.before, 2)
            out["seconds_from_process_start"] = round(self.before + time.perf_counter() - self.started, 2)
        return out
