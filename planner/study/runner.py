"""Tasks run as processes side by side on one GPU: each starts once the tasks it needs have finished, by priority,
while a slot is free, its GPU-memory estimate fits what the running ones leave, and it can end before the deadline.
At the deadline what still runs is stopped, so a study always ends with its results written. A task whose output
already exists is done (a rerun resumes); one that fails takes down only the tasks that need it; one that runs out
of GPU memory is tried once more with twice the estimate."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

OOM_MARKERS = ("CUDA out of memory", "OutOfMemoryError")


@dataclass
class Task:
    key: str
    kind: str  # what durations are learned by, e.g. "train:smollm2-135m"
    argv: list[str] | None = None  # a process; None: `fn` in this process
    fn: Callable[[], None] | None = None
    deps: tuple[str, ...] = ()
    priority: tuple = ()
    est_s: float = 30.0
    gpu_gb: float = 0.0
    done: Path | None = None  # exists: the task's output is there
    log: Path | None = None
    on_done: Callable[["Task"], None] | None = None
    state: str = "pending"  # pending, running, ok, failed, skipped, stopped, not started
    reason: str = ""
    seconds: float | None = None
    retried: bool = False
    _proc: subprocess.Popen | None = field(default=None, repr=False)
    _t0: float = 0.0


class Runner:
    def __init__(self, slots: int, gpu_gb: float | None, deadline: float, env: dict, cwd: Path, log: Callable,
                 stop_margin_s: float = 20.0):
        self.slots, self.gpu_gb, self.deadline, self.env, self.cwd = slots, gpu_gb, deadline, env, cwd
        self.log, self.stop_margin = log, stop_margin_s
        self.tasks: dict[str, Task] = {}
        self.order: list[str] = []
        self.durations: dict[str, list[float]] = {}
        self.commands: list[dict] = []

    def add(self, task: Task) -> Task:
        if task.key in self.tasks:
            return self.tasks[task.key]
        self.tasks[task.key] = task
        self.order.append(task.key)
        if task.done is not None and task.done.exists():
            task.state, task.reason = "ok", "output already there"
            if task.on_done:
                task.on_done(task)
        return task

    def estimate(self, task: Task) -> float:
        seen = self.durations.get(task.kind)
        return max(seen) * 1.1 if seen else task.est_s

    def _finish(self, task: Task, state: str, reason: str = "") -> None:
        task.state, task.reason = state, reason
        if task._proc is not None or task.fn is not None:
            task.seconds = time.monotonic() - task._t0
        if state == "ok":
            if task.seconds is not None and task.argv is not None:
                self.durations.setdefault(task.kind, []).append(task.seconds)
            if task.on_done:
                try:
                    task.on_done(task)
                except Exception as e:  # noqa: BLE001  (a collector's failure is the task's failure)
                    task.state, task.reason = "failed", f"after it ran: {type(e).__name__}: {e}"
        self.log(f"[{task.state}] {task.key}" + (f" ({task.seconds:.0f} s)" if task.seconds else "")
                 + (f": {task.reason}" if task.reason and task.state != "ok" else ""))

    def _launch(self, task: Task) -> None:
        task._t0 = time.monotonic()
        if task.argv is None:
            task.state = "running"
            try:
                task.fn()
            except Exception as e:  # noqa: BLE001  (reported as the task's failure; the study goes on)
                self._finish(task, "failed", f"{type(e).__name__}: {e}")
                return
            self._finish(task, "ok")
            return
        task.log.parent.mkdir(parents=True, exist_ok=True)
        with open(task.log, "w") as f:
            f.write("$ " + " ".join(task.argv) + "\n")
            f.flush()
            task._proc = subprocess.Popen(task.argv, stdout=f, stderr=subprocess.STDOUT, cwd=self.cwd, env=self.env,
                                          start_new_session=True)
        task.state = "running"
        self.commands.append({"key": task.key, "argv": task.argv})

    def _blocked(self, task: Task) -> str | None:
        bad = [d for d in task.deps if d not in self.tasks or self.tasks[d].state in
               ("failed", "skipped", "stopped", "not started")]
        if bad:
            return f"needs {bad[0]} ({self.tasks[bad[0]].state if bad[0] in self.tasks else 'absent'})"
        return None

    def _ready(self, task: Task) -> bool:
        return all(self.tasks[d].state == "ok" for d in task.deps)

    def _stop(self, task: Task, why: str) -> None:
        try:
            os.killpg(task._proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            task._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(task._proc.pid, signal.SIGKILL)
            task._proc.wait()
        self._finish(task, "stopped", why)

    def run(self) -> None:
        while True:
            now = time.monotonic()
            running = [t for t in self.tasks.values() if t.state == "running"]
            if now >= self.deadline - self.stop_margin:
                for t in running:
                    self._stop(t, "stopped at the deadline")
                for t in self.tasks.values():
                    if t.state == "pending":
                        t.state, t.reason = "not started", "the deadline came first"
                return
            for t in running:
                rc = t._proc.poll()
                if rc is None:
                    continue
                if rc == 0:
                    self._finish(t, "ok")
                elif not t.retried and _ran_out_of_memory(t.log):
                    t.retried, t.gpu_gb, t.state, t._proc = True, t.gpu_gb * 2, "pending", None
                    self.log(f"[retry] {t.key}: out of GPU memory, again with {t.gpu_gb:.1f} GB reserved")
                else:
                    self._finish(t, "failed", f"exit {rc}; see {t.log}: {_tail(t.log)}")
            for t in self.tasks.values():
                if t.state == "pending" and (why := self._blocked(t)):
                    t.state, t.reason = "skipped", why
            pending = sorted((t for t in self.tasks.values() if t.state == "pending"),
                             key=lambda t: (t.priority, self.order.index(t.key)))
            running = [t for t in self.tasks.values() if t.state == "running"]
            if not pending and not running:
                return
            used = sum(t.gpu_gb for t in running)
            for t in pending:
                if not self._ready(t):
                    continue
                if t.argv is None:
                    self._launch(t)
                    continue
                if len(running) >= self.slots:
                    break
                if time.monotonic() + self.estimate(t) > self.deadline - self.stop_margin:
                    t.state, t.reason = "not started", (f"would end after the deadline (about "
                                                        f"{self.estimate(t):.0f} s)")
                    self.log(f"[not started] {t.key}: {t.reason}")
                    continue
                if self.gpu_gb is not None and running and used + t.gpu_gb > self.gpu_gb:
                    continue
                self._launch(t)
                running.append(t)
                used += t.gpu_gb
            time.sleep(0.2)

    def summary(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tasks.values():
            out[t.state] = out.get(t.state, 0) + 1
        return out


def _tail(path: Path | None, n: int = 240) -> str:
    try:
        text = Path(path).read_text(errors="replace").strip()
    except (OSError, TypeError):
        return ""
    return " ".join(text[-n:].split())


def _ran_out_of_memory(path: Path | None) -> bool:
    try:
        text = Path(path).read_text(errors="replace")
    except (OSError, TypeError):
        return False
    return any(m in text for m in OOM_MARKERS)
