"""The `early-exit` command line: `info`, `agreement`, `train`, `report`, `calibrate`, `verify-calibration`,
`generate`, `push` and `bench` (the benchmarks of `early_exit_cli.benchmarks`).

A package of its own, beside `early_exit` rather than inside it: importing `early_exit` loads torch and registers
the model with `transformers` (seconds), and the arguments are parsed before any of that.
"""

from __future__ import annotations

import sys

from .parser import build_parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `early-exit` console script.

    A mistake the library names (a bad option, an unusable folder or file) ends the command with one line on stderr
    and exit status 1, not a traceback.
    """
    args = build_parser().parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    from early_exit.errors import EarlyExitError

    from .commands import COMMANDS  # the library loads here, after the arguments are known

    try:
        COMMANDS[args.command](args)
    except (EarlyExitError, OSError) as error:
        raise SystemExit(f"early-exit {args.command}: {error}") from error
