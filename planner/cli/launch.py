"""`plan` / `profile` across processes: launching torchrun for --distributed N, and the command's
run inside a torchrun job (profile spread over the ranks, then rank 0 plans)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

from ..corpus import load_calib
from ..dist import init, shutdown, threads_per_rank, under_torchrun
from ..errors import UserError
from ..fsio import write_json
from ..model.discover import discover_matrices
from ..model.resolve import resolve_model
from ..plan.budget import resolve_budget
from ..profile.distributed import profile_distributed, share_fisher


def run_cli_distributed(args, command: Callable) -> int:
    """`lqplan plan|profile` inside a torchrun job: the profile is spread over the ranks, then rank 0 runs the
    ordinary command, which finds every point in the cache."""

    settings = args.settings
    ctx = init(args.device)
    try:
        source = resolve_model(args.model)
        matrices = discover_matrices(source, include_head=settings.include_head)
        if args.command == "plan":  # infeasible: fail now, not after the profile
            resolve_budget(source, matrices, settings.grid, args.budget_spec, settings.tie)
        progress = not args.quiet
        variants = [(None, None)]
        if settings.calib:
            variants = [share_fisher(ctx, source, matrices, settings, Path(args.cache), progress)[:2]]
            if args.command == "plan":
                variants.append((None, None))  # make_plan also solves the data-free plan for its comparison
        summaries = []
        for fisher, fkey in variants:
            s = profile_distributed(ctx, source, matrices, settings if fisher is not None else settings.data_free(),
                                    fisher, fkey, Path(args.cache), progress)
            if s is not None:
                summaries.append(s)
                print(s.line(), file=sys.stderr)
    finally:
        shutdown()
    if ctx.info.rank != 0:
        return 0
    write_json(Path(args.out) / "distributed.json", {"schema": "lqplan.distributed/1",
                                                     "runs": [s.to_dict() for s in summaries]})
    args.device = ctx.device
    return command(args)


def strip_distributed(argv: Sequence[str]) -> list[str]:
    """argv without `--distributed N` / `--distributed=N` (argparse also accepts unique prefixes, e.g. --dist)."""
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
            continue
        opt = tok.split("=", 1)[0]
        if len(opt) >= 4 and "--distributed".startswith(opt):
            skip = "=" not in tok
            continue
        out.append(tok)
    return out


def launch_command(argv: Sequence[str], nproc: int) -> list[str]:
    """The torchrun command line that runs `lqplan <argv>` in `nproc` processes on this host."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "planner", *strip_distributed(argv)]


def launch(argv: Sequence[str], nproc: int) -> int:
    """Run `lqplan <argv>` under torchrun with `nproc` processes; returns torchrun's exit code."""
    env = dict(os.environ)
    # torchrun would set 1 and warn; each rank sets its own share of the cores anyway
    env.setdefault("OMP_NUM_THREADS", str(threads_per_rank(nproc)))
    proc = subprocess.Popen(launch_command(argv, nproc), env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached torchrun too (same process group); let it stop its workers before we leave
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise


def cli_entry(args, argv: Sequence[str], command: Callable) -> int | None:
    """The CLI's hook for `plan` and `profile`: under torchrun, the distributed run; with --distributed N > 1,
    launch torchrun; otherwise None (run the command in this process)."""
    n = getattr(args, "distributed", None)
    if under_torchrun():
        return run_cli_distributed(args, command)
    if n is None:
        return None
    if n < 1:
        raise UserError(f"--distributed {n} is not a process count; use 2 or more (one per GPU), or leave it out")
    if n == 1:
        return None
    _check_inputs(args)
    return launch(argv, n)


def _check_inputs(args) -> None:
    """What the parent can check before starting the workers (where each rank would print the error and torchrun
    add its own traceback): the model, the budget against the grid's cheapest plan, the calibration text."""

    source = resolve_model(args.model)
    matrices = discover_matrices(source, include_head=args.settings.include_head)
    if args.command == "plan":
        resolve_budget(source, matrices, args.settings.grid, args.budget_spec, args.settings.tie)
    if args.settings.calib:
        load_calib(args.settings.calib)
