"""Command line: a thin layer over the library. Bad input -> one line on stderr and exit code 2.

The verbs' modules (and torch with them) are imported inside main(), under its Ctrl-C and SIGTERM handling, so an
interrupt during start-up is one line too. SIGTERM is handled like Ctrl-C: temp files and half-built output folders
are removed on the way out."""

from __future__ import annotations

import logging
import signal
import sys
import threading

from ..errors import UserError

# Filled by _load_parser() and _load_verbs() on the first main() (a test may have set one already: it is kept).
COMMANDS = prepare = cli_entry = build_parser = None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program stands so that every cleanup a Ctrl-C runs runs for it too."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _load_parser() -> None:
    from . import parser

    global build_parser
    if build_parser is None:
        build_parser = parser.build_parser


def _load_verbs() -> None:
    """The verbs' modules, and torch with them: only once the arguments parsed (`--help` and usage errors are
    answered without them)."""
    from . import commands, launch

    g = globals()
    for name, value in (("COMMANDS", commands.COMMANDS), ("prepare", commands.prepare),
                        ("cli_entry", launch.cli_entry)):
        if g[name] is None:
            g[name] = value


def main(argv: list[str] | None = None) -> int:
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if on_main_thread else None
    command = None
    try:
        _load_parser()
        args = build_parser().parse_args(argv)  # argparse itself exits 2 with a one-line usage error
        _load_verbs()
        command = args.command
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
        if args.command in ("plan", "profile"):
            prepare(args)  # bad input fails here, once, before torchrun or the model
            code = cli_entry(args, list(sys.argv[1:] if argv is None else argv), COMMANDS[args.command])
            if code is not None:
                return code
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"lqplan: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        print(f"lqplan: {what}; {_RESUME.get(command, 'nothing was written')}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


# What survives a Ctrl-C, per verb: only the profile is cached; training resumes only from checkpoints it wrote.
_RESUME = {
    "plan": "finished matrices are cached in --cache, rerun the same command to resume",
    "profile": "finished matrices are cached in --cache, rerun the same command to resume",
    "train": "training resumes only from a checkpoint: rerun with --resume if --save-every wrote one to --out, "
             "otherwise it starts over",
    "export": "the output folder is as it was before; rerun the same command",
}


def plan_main(argv: list[str] | None = None) -> int:
    """The `plan` console script: `plan --budget 2.75bits --model llama2-13b` == `lqplan plan ...`."""
    return main(["plan", *(sys.argv[1:] if argv is None else argv)])
