"""runguard's zero-code bootstrap.

With this directory first on ``PYTHONPATH`` (``runguard-run`` puts it there; ``runguard
bootstrap-path`` prints it), Python imports this module at start-up, before any user
code. With ``RUNGUARD_AUTOLOG=1`` it calls ``runguard.autolog()`` from the ``RUNGUARD_*``
variables alone; SDKs imported later are patched by post-import hooks. Then it runs the
``sitecustomize`` that would have run without it, if any. Child Python processes inherit
the environment, so they are guarded too. Without ``RUNGUARD_AUTOLOG`` nothing is
imported (it would cost every Python start-up tens of milliseconds).
"""

import importlib.machinery
import importlib.util
import os
import sys


def _start() -> None:
    if os.environ.get("RUNGUARD_AUTOLOG", "").strip().lower() not in ("", "0", "false", "no", "off"):
        try:
            from runguard_autolog._bootstrap import start
        except ImportError as error:  # this interpreter lacks the package: never run unguarded
            sys.stderr.write(
                f"runguard: RUNGUARD_AUTOLOG is set but {sys.executable} cannot import runguard_autolog "
                f"({type(error).__name__}); install it in this environment or unset RUNGUARD_AUTOLOG "
                "(the program was not started)\n"
            )
            sys.stderr.flush()
            os._exit(2)
        start()  # a bad configuration ends the process here (exit 2)


def _chain() -> None:
    """Run the next ``sitecustomize`` on ``sys.path`` (the one this one shadows), if any."""
    here = os.path.dirname(os.path.abspath(__file__))
    search = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", search)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    ours = sys.modules.get("sitecustomize")
    sys.modules["sitecustomize"] = module  # while it runs, it is "the" sitecustomize
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # as Python itself would: report it and go on
        if ours is not None:
            sys.modules["sitecustomize"] = ours
        sys.stderr.write(f"Error in sitecustomize; set PYTHONVERBOSE for traceback:\n{type(error).__name__}: {error}\n")


_start()
_chain()
del _start, _chain
