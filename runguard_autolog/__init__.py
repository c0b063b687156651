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

import os
from collections.abc import Callable, Iterable
from typing import Any

from . import _patching, _recording
from ._config import env_flag, resolve
from ._errors import RunGuardConfigError, RunGuardTripped
from ._evaluation import guarded_evaluate
from ._runtime import RUNTIME, logger
from ._scopes import Snapshot, current, reset, session
from ._shared import SharedSnapshot, flush_all, use_shared
from .pricing import register_price
from .tokens import register_encoding

__all__ = [
    "RunGuardConfigError",
    "RunGuardTripped",
    "Snapshot",
    "autolog",
    "config",
    "current",
    "current_shared",
    "flush",
    "guarded_evaluate",
    "register_encoding",
    "register_price",
    "reset",
    "reset_shared",
    "session",
]
__version__ = "0.1.0"


def autolog(
    *,
    disable: bool = False,
    max_calls: float | str | None = None,
    max_input_tokens: float | str | None = None,
    max_output_tokens: float | str | None = None,
    max_total_tokens: float | str | None = None,
    max_cost_usd: float | str | None = None,
    max_requests: float | str | None = None,
    max_consecutive_429s: float | str | None = None,
    max_request_latency_s: float | str | None = None,
    max_artifact_writes: float | str | None = None,
    max_artifact_bytes: float | str | None = None,
    max_eval_llm_calls: float | str | None = None,
    loop_repeats: float | str | None = None,
    loop_identical_requests: float | str | None = None,
    max_context_fraction: float | str | None = None,
    on_trip: str | Callable[[RunGuardTripped], Any] | None = None,
    artifact_breach: str | None = None,
    disabled_integrations: Iterable[str] | str | None = None,
    unpriced: str | None = None,
    window: str | int | None = None,
    agent: str | None = None,
    store: Any = None,
    shared_budget: str | None = None,
    shared_max_calls: float | str | None = None,
    shared_max_requests: float | str | None = None,
    shared_max_input_tokens: float | str | None = None,
    shared_max_output_tokens: float | str | None = None,
    shared_max_total_tokens: float | str | None = None,
    shared_max_cost_usd: float | str | None = None,
    shared_max_request_latency_s: float | str | None = None,
    shared_window: str | int | None = None,
    store_outage: str | None = None,
    shared_lease_s: float | None = None,
) -> None:
    """Enable (or with ``disable=True`` remove) the breaker on every supported SDK.

    Each limit: explicit keyword > ``RUNGUARD_<KEYWORD>`` > built-in default; ``None``
    means "not given here", ``math.inf`` or ``"none"`` lifts it. A bad value raises
    :class:`RunGuardConfigError` naming the keyword or variable. Calling it again
    replaces the configuration (it never double-patches or double-counts).
    ``RUNGUARD_DISABLE=1`` is a kill switch: autolog() then leaves every SDK unpatched.
    ``disabled_integrations`` (``RUNGUARD_DISABLED_INTEGRATIONS=artifacts,evaluation``): integrations
    left unpatched, by the names ``runguard config`` lists (openai, anthropic, litellm, langchain,
    deployments, evaluation, artifacts, runs, serving); an unknown name is an error.
    ``window`` (``RUNGUARD_WINDOW``): ``"minute"``, ``"hour"``, ``"day"`` or seconds: the process
    and run scopes count in fixed windows, starting afresh (counters and circuit) at each
    boundary, so a long-running service is not stopped for good; ``None``: for the process's life.
    ``agent`` (``RUNGUARD_AGENT``): this program's name, the run tag ``runguard.agent`` that
    ``runguard report`` groups trips by (else the run name).
    ``unpriced`` (``RUNGUARD_UNPRICED``): ``"allow"`` (the default: a model with no known price
    costs 0 USD) or ``"refuse"`` (refused before sending while a cost limit is set, with
    ``limit="unpriced"``). Prices: :func:`register_price`, or ``RUNGUARD_PRICES`` naming a JSON file.
    ``artifact_breach`` (``RUNGUARD_ARTIFACT_BREACH``): past the artifact budget, outputs are
    consolidated (``"consolidate"``, the default) or consolidated and ``RunGuardTripped``
    raised (``"raise"``).

    Shared budgets (many processes, many machines; see README): ``store="redis://…"``
    (``RUNGUARD_STORE``) and ``shared_budget="name"`` (``RUNGUARD_SHARED_BUDGET``) make every
    call also charge that budget, with limits ``shared_max_*`` (``RUNGUARD_SHARED_MAX_*``),
    fixed windows ``shared_window`` ("minute", "hour", "day" or seconds), the outage policy
    ``store_outage`` ("fail_closed", the default, or "fail_open") and ``shared_lease_s``, the
    bound after which a dead process's reservations are reclaimed (default 30 s).
    """
    keywords = {name: value for name, value in locals().items() if name != "disable"}
    with RUNTIME.lock:
        if disable or env_flag("RUNGUARD_DISABLE"):
            if not disable:
                logger.warning("runguard: RUNGUARD_DISABLE is set; the breaker is off")
            RUNTIME.enabled = False
            _patching.uninstall_all()
            use_shared(None)
            return
        settings = resolve(keywords)  # raises before anything changes
        _register_prices(settings)
        RUNTIME.configure(settings)
        use_shared(settings)
        RUNTIME.enabled = True
        _patching.install_all()


def _register_prices(settings: dict) -> None:
    """The prices file's entries (``RUNGUARD_PRICES``), models first, then the aliases of them."""
    table = settings["prices"].value
    if not table:
        return
    path = os.environ.get("RUNGUARD_PRICES", "")
    try:
        waiting = dict(table)
        while waiting:  # models first, then aliases whose target is priced by now (any key order)
            ready = [
                model for model, entry in waiting.items() if "same_as" not in entry or entry["same_as"] not in waiting
            ]
            for model in ready or list(waiting)[:1]:  # none ready: a cycle, reported by register_price
                register_price(model, **waiting.pop(model))
    except RunGuardConfigError as error:
        raise RunGuardConfigError(
            f"runguard: RUNGUARD_PRICES={path!r}: {str(error).removeprefix('runguard: ')}"
        ) from None


def _switch(on: bool) -> None:
    """How layers below the API turn the breaker on or off (``guarded_evaluate`` without
    ``autolog()``)."""
    autolog(disable=not on)


RUNTIME.switch = _switch


def _budget_named(name: str | None, store: str | None):
    """The configured shared budget when it matches, else the budget ``name`` on ``store`` (else
    autolog()'s store, else ``RUNGUARD_STORE``); and the client to close after, if one was opened."""
    from ._config import parse_budget_name, parse_store
    from ._shared import SharedClient

    configured = getattr(RUNTIME.store, "budget", None)
    if configured is not None and name in (None, configured.name) and store in (None, configured.url):
        return configured, None
    if name is None:
        raise RunGuardConfigError("runguard: no shared budget is configured here; pass its name")
    name = parse_budget_name(name, "name")
    client = getattr(RUNTIME.store, "client", None)
    if store is None and client is not None:
        return client.budget(str(name), {}), None
    if store is None:
        if "RUNGUARD_STORE" not in os.environ:
            raise RunGuardConfigError(
                "runguard: which store holds the shared budget? pass store='redis://…' or set RUNGUARD_STORE"
            )
        store = parse_store(os.environ["RUNGUARD_STORE"], "RUNGUARD_STORE")
    else:
        store = parse_store(store)
    if store == "memory":
        raise RunGuardConfigError("runguard: shared budgets live in Redis; store='memory' holds none")
    if client is not None and client.url == store:
        return client.budget(str(name), {}), None
    temporary = SharedClient(str(store))
    return temporary.budget(str(name), {}), temporary


def reset_shared(name: str | None = None, store: str | None = None) -> None:
    """Zero a shared budget's counters and close its circuit, for every process on it.

    ``name`` defaults to the budget ``autolog()`` configured; ``store`` to autolog()'s store,
    else ``RUNGUARD_STORE``. Calls already in flight settle into the fresh counters."""
    budget, temporary = _budget_named(name, store)
    try:
        budget.flush(2.0)  # this process's queued settles belong to the counters being reset
        budget.reset()
    finally:
        if temporary is not None:
            temporary.close()


def current_shared(name: str | None = None, store: str | None = None) -> SharedSnapshot:
    """The shared budget's counters in its current window (one round trip to the store). A
    budget this process does not configure itself (a tenant's, say) is read in its latest window."""
    budget, temporary = _budget_named(name, store)
    try:
        budget.flush()  # this process's own settles first
        known = temporary is None and budget is getattr(RUNTIME.store, "budget", None)
        return SharedSnapshot(budget, window_known=known)
    finally:
        if temporary is not None:
            temporary.close()


def flush(timeout: float = 10.0) -> bool:
    """Wait up to ``timeout`` seconds for runguard's background writes: settles on the shared
    budget, then tags and metrics on MLflow runs. True when everything was written."""
    shared = flush_all(timeout)
    return _recording.flush(timeout) and shared


def config() -> str:
    """The effective limits and where each came from (keyword, environment, default), as
    ``runguard config`` prints them: the active ``autolog()`` configuration, else what
    the environment would give."""
    from ._config import describe

    with RUNTIME.lock:
        settings = RUNTIME.settings if RUNTIME.enabled else resolve({})
    return describe(settings)
