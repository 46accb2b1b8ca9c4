"""`plan` / `profile` across processes: launching torchrun for --distributed N, and the command's
run inside a torchrun job (profile spread over the ranks, then rank 0 plans)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

from ..api import profile_on_ranks, resolve_inputs
from ..corpus import load_calib
from ..dist import init, shutdown, threads_per_rank, under_torchrun
from ..errors import UserError
from ..fsio import write_json


def run_cli_distributed(args, command: Callable) -> int:
    """`lqplan plan|profile` inside a torchrun job: the model and budget are resolved once (a bad budget fails now,
    not after the profile), the profile is spread over the ranks, then rank 0 runs the ordinary command on the same
    resolved inputs (args.inputs), and it finds every point in the cache."""
    ctx = init(args.device)
    try:
        args.inputs = _resolve(args)
        summaries = profile_on_ranks(ctx, args.inputs, cache_dir=args.cache, progress=not args.quiet,
                                     for_plan=args.command == "plan")
        for s in summaries:
            print(s.line(), file=sys.stderr)
    finally:
        shutdown()
    if ctx.info.rank != 0:
        return 0
    write_json(Path(args.out) / "distributed.json", {"schema": "lqplan.distributed/1",
                                                     "runs": [s.to_dict() for s in summaries]})
    args.device = ctx.device
    return command(args)


def _resolve(args):
    """The command's model, settings and (for `plan`) budget, resolved as make_plan and profile_model resolve them."""
    plan = args.command == "plan"
    return resolve_inputs(args.model, args.settings, args.budget_spec if plan else None,
                          args.train_shape if plan else None)


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
    _resolve(args)
    if args.settings.calib:
        load_calib(args.settings.calib)
