"""runguard-autolog: the circuit breaker beside ``mlflow.autolog()``.

MLflow records what an agent does; runguard stops it. One line patches the same SDK
entry points MLflow's autologgers patch and refuses the next billed call *before* it
leaves the process when a call, token, cost, gateway, evaluation, artifact, loop or
context limit is reached::

    import mlflow
    import runguard_autolog as runguard

    mlflow.openai.autolog()
    runguard.autolog(max_calls=50, max_cost_usd=2.00)

    with runguard.session("agent-7", max_calls=10):
        ...

Limits come from keywords, else ``RUNGUARD_<KEYWORD>`` variables, else defaults; see
README for the table.
"""

from __future__ import annotations

from typing import Any, Callable

from . import _patching
from ._config import env_flag, resolve
from ._errors import RunGuardConfigError, RunGuardTripped
from ._evaluation import guarded_evaluate
from ._recording import flush
from ._runtime import RUNTIME, logger
from ._scopes import Snapshot, current, reset, session
from .tokens import register_encoding

__all__ = [
    "autolog",
    "session",
    "current",
    "reset",
    "guarded_evaluate",
    "flush",
    "register_encoding",
    "config",
    "RunGuardTripped",
    "RunGuardConfigError",
    "Snapshot",
]
__version__ = "0.1.0"


def autolog(
    *,
    disable: bool = False,
    max_calls: int | float | str | None = None,
    max_input_tokens: int | float | str | None = None,
    max_output_tokens: int | float | str | None = None,
    max_total_tokens: int | float | str | None = None,
    max_cost_usd: float | str | None = None,
    max_requests: int | float | str | None = None,
    max_consecutive_429s: int | float | str | None = None,
    max_request_latency_s: float | str | None = None,
    max_artifact_writes: int | float | str | None = None,
    max_artifact_bytes: int | float | str | None = None,
    max_eval_llm_calls: int | float | str | None = None,
    loop_repeats: int | float | str | None = None,
    loop_identical_requests: int | float | str | None = None,
    max_context_fraction: float | str | None = None,
    on_trip: str | Callable[[RunGuardTripped], Any] | None = None,
    artifact_breach: str | None = None,
) -> None:
    """Enable (or with ``disable=True`` remove) the breaker on every supported SDK.

    Each limit: explicit keyword > ``RUNGUARD_<KEYWORD>`` > built-in default; ``None``
    means "not given here", ``math.inf`` or ``"none"`` lifts it. A bad value raises
    :class:`RunGuardConfigError` naming the keyword or variable. Calling it again
    replaces the configuration (it never double-patches or double-counts).
    ``RUNGUARD_DISABLE=1`` is a kill switch: autolog() then leaves every SDK unpatched.
    ``artifact_breach`` (``RUNGUARD_ARTIFACT_BREACH``): past the artifact budget, outputs are
    consolidated (``"consolidate"``, the default) or consolidated and ``RunGuardTripped``
    raised (``"raise"``).
    """
    keywords = {name: value for name, value in locals().items() if name != "disable"}
    with RUNTIME.lock:
        if disable or env_flag("RUNGUARD_DISABLE"):
            if not disable:
                logger.warning("runguard: RUNGUARD_DISABLE is set; the breaker is off")
            RUNTIME.enabled = False
            _patching.uninstall_all()
            return
        settings = resolve(keywords)  # raises before anything changes
        RUNTIME.configure(settings)
        RUNTIME.enabled = True
        _patching.install_all()


def config() -> str:
    """The effective limits and where each came from (keyword, environment, default), as
    ``runguard config`` prints them: the active ``autolog()`` configuration, else what
    the environment would give."""
    from ._bootstrap import describe

    with RUNTIME.lock:
        settings = RUNTIME.settings if RUNTIME.enabled else resolve({})
    return describe(settings)
