"""The ``runguard`` command: ``demo``, ``run``, ``config``, ``reset --shared``, ``bootstrap-path``, ``version``."""

from __future__ import annotations

import argparse
import json
import sys

from ._bootstrap import USAGE_EXIT


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":  # everything after "run" is the command, untouched
        from ._bootstrap import run

        return run(argv[1:])
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="runguard",
        description="runguard-autolog: a circuit breaker beside mlflow.autolog()",
        epilog="exit status: 0 ok, 1 a store or tracking server did not answer, 2 bad configuration, "
        "64 bad command line",
    )
    parser.add_argument("--version", action="version", version=f"runguard-autolog {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run a looping agent offline and watch the breaker stop it")
    demo.add_argument("--dir", help="where to keep the sqlite tracking store (default: a new temp dir)")
    demo.add_argument("--max-calls", type=int, default=25, help="the call ceiling for the demo (default 25)")
    commands.add_parser(
        "run", help="run a command with the breaker on in every Python process it starts (as runguard-run)"
    )
    config = commands.add_parser("config", help="print the effective limits and where each came from")
    config.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    commands.add_parser(
        "bootstrap-path",
        help="print the directory to put first on PYTHONPATH "
        "(with RUNGUARD_AUTOLOG=1) to enable the breaker without code",
    )
    reset = commands.add_parser(
        "reset", help="zero a shared budget's counters and close its circuit, for every process on it"
    )
    reset.add_argument("--shared", metavar="NAME", required=True, help="the shared budget's name")
    reset.add_argument("--store", help="the Redis URL holding it (default: RUNGUARD_STORE)")
    commands.add_parser("version", help="print the version")
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse's usage errors are exit 2, which means bad configuration here
        return USAGE_EXIT if stop.code == 2 else int(stop.code or 0)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.dir, max_calls=args.max_calls)
        return 0
    if args.command == "config":
        from ._bootstrap import BAD_CONFIG_EXIT
        from ._config import describe, describe_json, resolve
        from ._errors import RunGuardConfigError

        try:
            settings = resolve({})
            print(json.dumps(describe_json(settings), indent=2) if args.json else describe(settings))
        except RunGuardConfigError as error:
            print(error, file=sys.stderr)
            return BAD_CONFIG_EXIT
        return 0
    if args.command == "reset":
        return _reset_shared(args.shared, args.store)
    if args.command == "bootstrap-path":
        from ._bootstrap import bootstrap_dir

        print(bootstrap_dir())
        return 0
    if args.command == "version":
        print(__version__)
        return 0
    return USAGE_EXIT


def _reset_shared(name: str, store: str | None) -> int:
    from . import reset_shared
    from ._bootstrap import BAD_CONFIG_EXIT
    from ._config import redact
    from ._errors import RunGuardConfigError

    try:
        reset_shared(name, store)
    except RunGuardConfigError as error:
        print(error, file=sys.stderr)
        return BAD_CONFIG_EXIT
    except Exception as error:  # the store did not answer: say so without echoing a password
        print(
            f"runguard: could not reset shared budget {name!r}: {type(error).__name__}: {redact(str(error))}",
            file=sys.stderr,
        )
        return 1
    print(f"runguard: shared budget {name!r} reset (counters zeroed, circuit closed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
