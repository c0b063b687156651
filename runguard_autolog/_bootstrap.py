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
from collections.abc import Mapping

from ._config import env_flag, resolve
from ._errors import RunGuardConfigError

BAD_CONFIG_EXIT = 2  # a bad RUNGUARD_* value, or the package cannot start: the program is not run
USAGE_EXIT = 64  # the command line is wrong (no program given): EX_USAGE of sysexits.h


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
        sys.stderr.write(
            "usage: runguard-run <command> [args...]\n"
            "Runs the command with runguard.autolog() enabled from RUNGUARD_* in every Python "
            "process it starts.\n"
        )
        return 0 if argv else USAGE_EXIT
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
