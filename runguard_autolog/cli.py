"""The ``runguard`` command: ``runguard demo``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="runguard", description="runguard-autolog: a circuit breaker beside mlflow.autolog()")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run a looping agent offline and watch the breaker stop it")
    demo.add_argument("--dir", help="where to keep the sqlite tracking store (default: a new temp dir)")
    demo.add_argument("--max-calls", type=int, default=25, help="the call ceiling for the demo (default 25)")
    commands.add_parser("version", help="print the version")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.dir, max_calls=args.max_calls)
        return 0
    if args.command == "version":
        from . import __version__

        print(__version__)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
