"""The ``runguard`` command: ``demo``, ``run``, ``config``, ``report``, ``status --shared``, ``reset --shared``,
``bootstrap-path``, ``version``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

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
    report = commands.add_parser(
        "report",
        help="trip rate over time, calls at trip, ceilings hit and agents, from the MLflow tracking store",
        epilog="exit status: 0 a report (possibly of no runs), 1 the tracking store did not answer, "
        "2 an unknown experiment, a bad --since or an unwritable file",
    )
    report.add_argument(
        "--experiment", nargs="+", action="extend", default=[], metavar="NAME_OR_ID", help="(default: all)"
    )
    report.add_argument("--since", default="30d", help="7d, 24h, 2w or a date such as 2026-11-01 (default 30d)")
    report.add_argument("--tracking-uri", help="(default: MLFLOW_TRACKING_URI, else MLflow's default)")
    report.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    report.add_argument("--plot", metavar="FILE.png", help="write the pictures as a PNG")
    report.add_argument("--html", metavar="FILE.html", help="write one self-contained HTML page")
    status = commands.add_parser("status", help="a shared budget's counters, limits, window and trip")
    status.add_argument("--shared", metavar="NAME", required=True, help="the shared budget's name")
    status.add_argument("--store", help="the Redis URL holding it (default: RUNGUARD_STORE)")
    status.add_argument("--json", action="store_true", help="one JSON object, for scripts")
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
    if args.command == "report":
        return _report(args)
    if args.command == "status":
        return _status(args.shared, args.store, args.json)
    if args.command == "bootstrap-path":
        from ._bootstrap import bootstrap_dir

        print(bootstrap_dir())
        return 0
    if args.command == "version":
        print(__version__)
        return 0
    return USAGE_EXIT


def _on_shared(name: str, store: str | None, verb: str, action: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``action`` on a shared budget: (0, its result), or (exit status, None) after one line
    on stderr: a bad configuration, or a store that did not answer (its password never echoed)."""
    from ._bootstrap import BAD_CONFIG_EXIT
    from ._config import redact
    from ._errors import RunGuardConfigError

    try:
        return 0, action()
    except RunGuardConfigError as error:
        print(error, file=sys.stderr)
        return BAD_CONFIG_EXIT, None
    except Exception as error:
        print(
            f"runguard: could not {verb} shared budget {name!r}: {type(error).__name__}: {redact(str(error))}",
            file=sys.stderr,
        )
        return 1, None


def _reset_shared(name: str, store: str | None) -> int:
    from . import reset_shared

    status, _ = _on_shared(name, store, "reset", lambda: reset_shared(name, store))
    if status == 0:
        print(f"runguard: shared budget {name!r} reset (counters zeroed, circuit closed)")
    return status


def _report(args: argparse.Namespace) -> int:
    import os

    from ._report import ReportError, build, html_page, png, table

    # an unreachable tracking server is an answer in seconds, not minutes of retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        report = build(args.experiment, args.since, args.tracking_uri)
        for path, content in ((args.plot, png), (args.html, html_page)):
            if path:
                data = content(report)
                try:
                    with open(path, "wb") as file:
                        file.write(data if isinstance(data, bytes) else data.encode("utf-8"))
                except OSError as error:
                    raise ReportError(f"runguard: could not write {path}: {error.strerror}", 2) from None
    except ReportError as error:
        print(error, file=sys.stderr)
        return error.status
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


def _status(name: str, store: str | None, as_json: bool) -> int:
    from . import _budget_named
    from ._counters import COUNTERS
    from ._shared import SharedSnapshot

    def read() -> tuple[Any, SharedSnapshot]:
        budget, temporary = _budget_named(name, store)
        try:
            return budget, SharedSnapshot(budget, window_known=False)
        finally:
            if temporary is not None:
                temporary.close()

    status, found = _on_shared(name, store, "read", read)
    if status:
        return status
    budget, snapshot = found
    trip = snapshot.tripped
    state = {
        "budget": budget.name,
        "scope": snapshot.scope,
        "store": budget.client.shown_url,
        "window_s": snapshot.window,
        "window_start": snapshot.window_start if snapshot.window else None,
        "in_flight": snapshot.in_flight,
        **{counter: getattr(snapshot, counter) for counter in COUNTERS},
        "limits": snapshot.limits,
        "tripped": None
        if trip is None
        else {"limit": trip.limit, "reason": trip.reason, "threshold": trip.threshold, "observed": trip.observed},
    }
    if as_json:
        print(json.dumps(state, indent=2))
        return 0
    window = f"window {state['window_s']} s from {state['window_start']}" if state["window_s"] else "no window"
    limits = ", ".join(f"{limit}={value:g}" for limit, value in state["limits"].items()) or "none seen"
    print(f"shared budget {budget.name!r} on {state['store']} ({window})")
    print(
        "  " + ", ".join(f"{counter} {state[counter]:g}" for counter in COUNTERS) + f", in flight {state['in_flight']}"
    )
    print(f"  limits: {limits}")
    print(f"  tripped: {'no' if trip is None else f'{trip.limit}: {trip.reason}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
