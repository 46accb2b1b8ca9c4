"""Command line: a thin layer over the library. Bad input -> one line on stderr and exit code 2."""

from __future__ import annotations

import logging
import sys

from ..errors import UserError
from .commands import COMMANDS, prepare
from .launch import cli_entry
from .parser import build_parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 with a one-line usage error
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        if args.command in ("plan", "profile"):
            prepare(args)  # bad input fails here, once, before torchrun or the model
            code = cli_entry(args, list(sys.argv[1:] if argv is None else argv), COMMANDS[args.command])
            if code is not None:
                return code
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"lqplan: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lqplan: interrupted; {_RESUME.get(args.command, 'nothing was written')}", file=sys.stderr)
        return 130


# What survives a Ctrl-C, per verb: only the profile is cached; training resumes only from checkpoints it wrote.
_RESUME = {
    "plan": "finished matrices are cached in --cache, rerun the same command to resume",
    "profile": "finished matrices are cached in --cache, rerun the same command to resume",
    "train": "training resumes only from a checkpoint: rerun with --resume if --save-every wrote one to --out, "
             "otherwise it starts over",
    "export": "every file written is whole but the folder may lack some; rerun the same command",
}


def plan_main(argv: list[str] | None = None) -> int:
    """The `plan` console script: `plan --budget 2.75bits --model llama2-13b` == `lqplan plan ...`."""
    return main(["plan", *(sys.argv[1:] if argv is None else argv)])
