"""Crash safety of profiling (issue 8): a profile run SIGKILLed at several points leaves only complete cache files,
and a rerun recomputes exactly the matrices that were not finished (none that were) and produces a profile.csv
byte-identical to an uninterrupted run's.

Each killed run is a real `python -m planner profile` process on the embedded MiniLM (36 matrices) with a two-point
grid and one LoftQ iteration, pinned to one CPU thread like the test process itself (conftest.py), because BLAS
reductions split differently with more threads (see tests/test_determinism.py). The uninterrupted reference runs
in-process through the same CLI: a process start (importing torch and transformers) is most of each run's time."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import subprocess_env

from planner import cli

MATRICES = 36  # all-MiniLM-L6-v2: 6 layers x 6 projections
# Two points per matrix: ~60 ms of work each on one core, so polling every 5 ms kills where intended.
GRID = ["--bits", "2,4", "--blocks", "64", "--ranks", "8", "--iters", "1"]
POINTS = 2
ENV = subprocess_env(MKL_NUM_THREADS="1")


def _args(cache: Path, out: Path) -> list[str]:
    return ["profile", *GRID, "--quiet", "--cache", str(cache), "--out", str(out)]


def _command(cache: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "planner", *_args(cache, out)]


def _results(cache: Path) -> dict[str, Path]:
    """Result files of the profile cache (<cache>/<fingerprint>/<settings>/<matrix>.json), temp files excluded."""
    return {p.name: p for p in cache.glob("*/*/*.json") if not p.name.startswith(".")}


def _state(files: dict[str, Path]) -> dict[str, tuple[int, bytes]]:
    return {name: (p.stat().st_mtime_ns, p.read_bytes()) for name, p in files.items()}


def _check_complete(cache: Path) -> None:
    """Every result file is whole: valid JSON holding every grid point; leftovers are hidden temp files only."""
    for name, path in _results(cache).items():
        doc = json.loads(path.read_text())
        assert len(doc["points"]) == POINTS, name
        assert all(isinstance(v["error"], float) for v in doc["points"].values()), name
    for leftover in cache.glob("*/*/.*"):
        assert leftover.name.endswith(".tmp"), leftover  # a killed atomic write; never read as a result


def _kill_after(k: int, cache: Path, out: Path) -> int:
    """Start a profile, SIGKILL it once at least k matrices are cached; returns how many were cached then."""
    proc = subprocess.Popen(_command(cache, out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while len(_results(cache)) < k and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, f"the run ended before the kill: {proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # killed mid-profile: nothing reached the output folder
    return len(_results(cache))


@pytest.mark.slow  # four `python -m planner` starts and a full profile
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "out"
    finished: dict[str, tuple[int, bytes]] = {}
    for k in (1, 10, 25):
        done = _kill_after(max(k, len(finished) + 1), cache, out)
        assert k <= done < MATRICES
        _check_complete(cache)
        now = _state(_results(cache))
        # no finished matrix was recomputed (or touched) by the run that was just killed
        assert {n: now[n] for n in finished} == finished
        finished = now

    rerun = subprocess.run(_command(cache, out), env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    counts = re.search(r"(\d+) of \d+ \(matrix, config\) points computed on \d+ of \d+ matrices, (\d+) from cache",
                       rerun.stdout)
    computed, cached = map(int, counts.groups())
    assert (computed, cached) == ((MATRICES - len(finished)) * POINTS, len(finished) * POINTS)
    final = _state(_results(cache))
    assert len(final) == MATRICES
    rewritten = {n for n in final if finished.get(n) != final[n]}
    assert rewritten == set(final) - set(finished)  # exactly the unfinished matrices were computed
    _check_complete(cache)

    capsys.readouterr()
    assert cli.main(_args(tmp_path / "ref-cache", tmp_path / "ref-out")) == 0
    printed = capsys.readouterr().out
    assert f"{MATRICES * POINTS} of {MATRICES * POINTS} (matrix, config) points computed" in printed
    assert "matrices, 0 from cache" in printed
    assert (out / "profile.csv").read_bytes() == (tmp_path / "ref-out" / "profile.csv").read_bytes()


def test_stale_temp_files_are_removed_but_live_ones_kept(tmp_path):
    """What a SIGKILL can leave behind is a hidden temp file; fsio.remove_stale_temps clears old ones only, since a
    live writer (another process of a distributed profile) may own a recent one."""
    from planner import fsio

    stale, live = tmp_path / ".m.json.abc.tmp", tmp_path / ".n.json.def.tmp"
    result = tmp_path / "m.json"
    for p in (stale, live, result):
        p.write_text("{}")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    os.utime(result, (old, old))
    assert fsio.remove_stale_temps(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".n.json.def.tmp", "m.json"]


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path):
    """An exception inside the write (as a kill would cut it) leaves the previous version whole and no temp file."""
    from planner import fsio

    target = tmp_path / "plan.json"
    fsio.write_json(target, {"v": 1})
    with pytest.raises(KeyboardInterrupt):
        with fsio.atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "half')
            raise KeyboardInterrupt
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~fsio._umask()  # mkstemp's 0600 is not passed on
