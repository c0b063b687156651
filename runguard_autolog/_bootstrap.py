"""Zero-code enablement: ``runguard-run <command...>`` and the ``sitecustomize`` bootstrap.

``runguard-run`` works like ``opentelemetry-instrument``: it puts :func:`bootstrap_dir`
(which holds a ``sitecustomize.py``) first on ``PYTHONPATH``, sets ``RUNGUARD_AUTOLOG=1``
and execs the command, so every Python process it starts (children included) calls
``runguard.autolog()`` from ``RUNGUARD_*`` before user code runs.

NB: Python swallows an ``Exception`` raised by ``sitecustomize`` (it prints a line and goes
on), which would start the program unguarded. So a bad configuration ends the process
here: one line on stderr naming the variable and the value, exit code 2.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Mapping

from ._config import LIMITS, SHARED_LIMITS, Setting, env_flag, env_name, redact, resolve
from ._errors import RunGuardConfigError

BAD_CONFIG_EXIT = 2


def bootstrap_dir() -> str:
    """The directory to put first on ``PYTHONPATH`` (it holds runguard's ``sitecustomize``)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "bootstrap")


def _die(error: BaseException) -> None:
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    try:
        sys.stderr.write(f"{message} (the program was not started)\n")
        sys.stderr.flush()
    finally:
        os._exit(BAD_CONFIG_EXIT)


def start() -> None:
    """Run by the bootstrap ``sitecustomize`` when ``RUNGUARD_AUTOLOG`` is set: enable the
    breaker from the environment, or end the process on a bad value."""
    try:
        if not env_flag("RUNGUARD_DISABLE") and env_flag("RUNGUARD_AUTOLOG"):
            import runguard_autolog

            runguard_autolog.autolog()
    except RunGuardConfigError as error:
        _die(error)
    except Exception as error:  # runguard itself failed: say so, but never block the program
        sys.stderr.write(f"runguard: the bootstrap could not enable the breaker ({type(error).__name__}: {error})\n")


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    env = dict(environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = bootstrap_dir() + (os.pathsep + path if path else "")
    env["RUNGUARD_AUTOLOG"] = "1"
    return env


def run(argv: list[str] | None = None) -> int:
    """``runguard-run <command...>``: exec the command with the breaker on in every Python
    process it starts. Checks the configuration first (exit 2 on a bad value)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        sys.stderr.write("usage: runguard-run <command> [args...]\n"
                         "Runs the command with runguard.autolog() enabled from RUNGUARD_* in every Python "
                         "process it starts.\n")
        return 0 if argv else BAD_CONFIG_EXIT
    try:
        env_flag("RUNGUARD_DISABLE")
        env_flag("RUNGUARD_AUTOLOG")
        resolve({})
    except RunGuardConfigError as error:
        sys.stderr.write(f"{error} (the program was not started)\n")
        return BAD_CONFIG_EXIT
    executable = shutil.which(argv[0])
    if executable is None:
        sys.stderr.write(f"runguard-run: command not found: {argv[0]}\n")
        return 127
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(executable, argv, child_environment(os.environ))
    return 0  # not reached


SHARED_SETTINGS = ("store", "shared_budget", *SHARED_LIMITS, "shared_window", "store_outage", "shared_lease_s")


def describe(settings: Mapping[str, Setting], environ: Mapping[str, str] | None = None) -> str:
    """The effective limits and where each came from, as a table."""
    environ = os.environ if environ is None else environ
    rows = [("limit", "value", "source")]
    for name in [*LIMITS, "on_trip", "artifact_breach", *SHARED_SETTINGS]:
        setting = settings[name]
        value = setting.value
        if name == "store":
            shown = redact(value)
        elif value is None or value == float("inf"):
            shown = "none"
        elif callable(value):
            shown = getattr(value, "__qualname__", repr(value))
        else:
            shown = str(value)
        source = setting.source
        if source == "environment":
            raw = environ.get(env_name(name), "")
            source = f"environment ({env_name(name)}={redact(raw) if name == 'store' else raw})"
        rows.append((name, shown, source))
    width = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [f"{a:<{width[0]}}  {b:<{width[1]}}  {c}" for a, b, c in rows]
    try:
        autolog = "on" if env_flag("RUNGUARD_AUTOLOG", environ) else "off"
        disabled = "on" if env_flag("RUNGUARD_DISABLE", environ) else "off"
    except RunGuardConfigError as error:
        autolog = disabled = str(error)
    lines += ["", f"RUNGUARD_AUTOLOG (enable at start-up): {autolog}",
              f"RUNGUARD_DISABLE (kill switch): {disabled}"]
    return "\n".join(lines)
