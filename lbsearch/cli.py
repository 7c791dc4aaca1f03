"""The ``lbsearch`` command line: parse, run one command (see :mod:`lbsearch.commands`), print.

Bad input is one line on stderr and exit code 2; no traceback.
"""
from __future__ import annotations

import argparse
import sys

from .errors import LBSearchError


def build_parser() -> argparse.ArgumentParser:
    from .commands import COMMANDS

    parser = argparse.ArgumentParser(
        prog="lbsearch", description="Choose softmax, linear sliding-window (LSWA) or no attention per layer of an "
        "LLM: sensitivity analysis, healing, multi-objective search, serving benchmark, export.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_args(p)
        p.set_defaults(func=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    args.argv = argv
    try:
        args.func(args)
    except LBSearchError as exc:
        print(f"lbsearch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lbsearch: interrupted; finished steps are kept, run the same command again to continue", file=sys.stderr)
        return 130
    except OSError as exc:  # disk full, permissions, vanished files: where and why, not a traceback
        name = str(exc.filename or "")
        where = f"{name if len(name) <= 200 else name[:200] + '...'}: " if name else ""
        print(f"lbsearch: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
