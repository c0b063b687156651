"""Scopes a call is charged to: each open session, the active MLflow run, the process.

The ``autolog()`` limits apply to the *innermost unit of work*: the most recently
entered of the open sessions and the active MLflow run, else the process. A
session may override them with its own keywords. An outer scope enforces only the
limits given to it explicitly.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import itertools
import sys
import time
from typing import Any

from ._config import LIMITS, SharedSpec, explicit_limits, parse_window, session_shared
from ._counters import COUNTER_OF_LIMIT, COUNTERS, CounterView
from ._errors import RunGuardConfigError, RunGuardTripped
from ._runtime import RUNTIME

_INF = float("inf")
_AUTOLOG = object()  # a scope whose window is autolog()'s


def _checks(limits: dict[str, Any]) -> tuple:
    return tuple(
        (COUNTER_OF_LIMIT[name], value) for name, value in limits.items() if name in COUNTER_OF_LIMIT and value != _INF
    )


class Scope:
    """Counters and the circuit of one unit of work."""

    __slots__ = (
        "__weakref__",
        "_effective",
        "entered",
        "epoch",
        "owner",
        "loops",
        "name",
        "own",
        "own_checks",
        "reserved",
        "shared",
        "shared_budget",
        "throttled",
        "tripped",
        "used",
        "window",
        "window_end",
    )

    def __init__(
        self, name: str, own: dict[str, Any] | None = None, entered: float | None = None, window: Any = _AUTOLOG
    ) -> None:
        self.name = name
        # fixed windows (seconds): counters and circuit start afresh at each boundary. A session
        # has its own (or none); the process and run scopes take autolog()'s (RUNGUARD_WINDOW).
        self.window = window
        self.window_end = 0.0
        self.owner: Any = None  # the session object that opened it
        self.own = dict(own or {})
        self.own_checks = _checks(self.own)
        self.entered = time.time() if entered is None else entered
        self.used = [0] * len(COUNTERS)
        self.reserved = [0] * len(COUNTERS)
        self.tripped = None
        self.throttled = 0  # consecutive 429 responses; a successful call ends the run
        self.loops = None  # _loops.LoopWatch, created when the first tool call or request is watched
        self.epoch = 0  # the store's reset count when this scope was last reset
        self._effective: tuple[int, Any, Any] = (-1, None, None)
        self.shared: SharedSpec | None = None  # a shared budget this session charges too (see _shared)
        self.shared_budget: Any = None  # that budget as the store resolved it, kept for later calls

    def effective(self) -> tuple[dict[str, Any], tuple]:
        """Limits when this scope is the innermost unit of work: autolog's, overridden by its own."""
        version, limits, checks = self._effective
        if version != RUNTIME.version:
            limits = RUNTIME.limits()
            limits["on_trip"] = RUNTIME.on_trip
            limits["unpriced"] = RUNTIME.settings["unpriced"].value
            limits.update(self.own)
            checks = _checks(limits)
            self._effective = (RUNTIME.version, limits, checks)
        return limits, checks

    def current_window(self) -> int | None:
        """This scope's window in seconds, ``None`` for none."""
        return RUNTIME.settings["window"].value if self.window is _AUTOLOG else self.window

    def __repr__(self) -> str:
        return f"<runguard scope {self.name}>"


PROCESS = RUNTIME.process = Scope("process", entered=0.0)
_SESSIONS: contextvars.ContextVar[tuple] = contextvars.ContextVar("runguard_sessions", default=())
_anonymous = itertools.count(1)


_UNKNOWN = object()


# An MLflow run becomes a scope once runguard has seen a run start (its start_run patch) or
# found one active in the installing thread (RUNTIME.runs_seen). Until then calls skip
# mlflow's active_run(), which costs a getpid() system call per call. (A run started in
# another thread before runguard.autolog() is therefore not seen; see README.)
def note_runs_seen() -> None:
    RUNTIME.runs_seen = True


def _active_run():
    if not RUNTIME.runs_seen:
        return None
    fluent = sys.modules.get("mlflow.tracking.fluent")
    if fluent is None:
        return None
    return fluent.active_run()


def run_scope(run) -> Scope:
    run_id = run.info.run_id
    runs = RUNTIME.runs
    scope = runs.get(run_id)
    if scope is None:
        with RUNTIME.runs_lock:
            scope = runs.get(run_id)
            if scope is None:
                entered = RUNTIME.run_starts.pop(run_id, None)
                if entered is None:
                    entered = (run.info.start_time or 0) / 1000.0
                scope = runs[run_id] = Scope(f"run:{run_id}", entered=entered)
    return scope


def note_run_started(run_id: str) -> None:
    """Remember when a run began, so it is ordered correctly against sessions."""
    note_runs_seen()
    RUNTIME.run_starts[run_id] = time.time()


def drop_run(run_id: str) -> Scope | None:
    RUNTIME.run_starts.pop(run_id, None)
    with RUNTIME.runs_lock:
        return RUNTIME.runs.pop(run_id, None)


def set_evaluating(chain: tuple) -> tuple:
    """Publish ``chain`` as the evaluation in progress (see _evaluation); returns the previous
    one to restore. MLflow scores rows in its own threads, which inherit no context: a call
    from a thread with no session of its own counts toward the evaluation. One evaluation at a
    time per process (see README)."""
    previous, RUNTIME.evaluating = RUNTIME.evaluating, chain
    return previous


def open_scopes(run: Any = _UNKNOWN) -> list[Scope]:
    """Scopes charged by a call here, outermost first; the last is the innermost unit of work."""
    scopes = [PROCESS, *(_SESSIONS.get() or RUNTIME.evaluating)]
    if run is _UNKNOWN:
        run = _active_run()
    if run is not None:
        scope = run_scope(run)
        position = len(scopes)
        while position > 1 and scopes[position - 1].entered > scope.entered:
            position -= 1
        scopes.insert(position, scope)
    return scopes


_process_only: list[Any] = [-1, None, None, None]  # (version, charges, limits) when no session or run is open


def roll(scope: Scope, window: int, now: float) -> None:
    """A windowed scope whose window ended: fresh counters and a closed circuit (the store
    checks again under its lock, so concurrent callers roll it once)."""
    RUNTIME.store.roll(scope, now, (now // window + 1) * window)


def retry_after(scope_name: str, charges: Any) -> float | None:
    """Seconds until the named scope's window rolls over (``None``: not windowed). The scope may
    be a shared budget's (``shared:<name>``): the process-wide one (which a session naming the
    same budget charges with the process's window), or a session's own."""
    budget = getattr(RUNTIME.store, "budget", None)
    if budget is not None and budget.scope.name == scope_name:
        return budget.retry_after()
    for scope, _ in charges:
        if scope.name == scope_name:
            return max(0.0, scope.window_end - time.time()) if scope.current_window() else None
        budget = scope.shared_budget
        if budget is not None and budget.scope.name == scope_name:
            return budget.retry_after()
    return None


def charges_for(scopes: list[Scope]) -> tuple[list[tuple[Scope, tuple]], dict[str, Any]]:
    """Pair each scope with the limits it enforces on this call; also the innermost's limits."""
    now = 0.0
    for scope in scopes:
        window = scope.current_window()
        if window:
            now = now or time.time()
            if now >= scope.window_end:
                roll(scope, window, now)
    limits, checks = scopes[-1].effective()
    charges = [(scope, scope.own_checks) for scope in scopes[:-1]]
    charges.append((scopes[-1], checks))
    return charges, limits


def current_charges() -> tuple[Any, dict[str, Any]]:
    """``charges_for(open_scopes())``, with the common process-only case cached per configuration."""
    run = None
    if RUNTIME.runs_seen:  # _active_run(), inlined
        fluent = sys.modules.get("mlflow.tracking.fluent")
        run = None if fluent is None else fluent.active_run()
    if run is None and not _SESSIONS.get() and not RUNTIME.evaluating:
        cached = _process_only
        if cached[0] != RUNTIME.version:
            limits, checks = PROCESS.effective()
            cached[1:] = [((PROCESS, checks),), limits, PROCESS.current_window()]
            cached[0] = RUNTIME.version
        window = cached[3]
        if window:
            now = time.time()
            if now >= PROCESS.window_end:
                roll(PROCESS, window, now)
        return cached[1], cached[2]
    return charges_for(open_scopes(run))


def innermost() -> Scope:
    return open_scopes()[-1]


class Snapshot(CounterView):
    """What ``runguard.current()`` returns: a read-only view of one scope."""

    __slots__ = ("consecutive_429s", "limits", "scope", "tripped")
    scope: str
    consecutive_429s: int
    limits: dict[str, Any]
    tripped: RunGuardTripped | None

    def __init__(self, scope: Scope, is_innermost: bool = True) -> None:
        used, trip, self.consecutive_429s = RUNTIME.store.snapshot(scope)
        self.scope = scope.name
        self._show(used)
        limits = scope.effective()[0] if is_innermost else {**scope.own}
        self.limits = {k: v for k, v in limits.items() if k in LIMITS or k == "on_trip"}
        self.tripped = None if trip is None else RunGuardTripped.from_trip(trip)

    def __repr__(self) -> str:
        return (
            f"Snapshot(scope={self.scope!r}, calls={self.calls}, input_tokens={self.input_tokens}, "
            f"output_tokens={self.output_tokens}, cost_usd={self.cost_usd:.6g}, tripped={self.tripped!r})"
        )


def current() -> Snapshot:
    """A snapshot of the innermost scope (session, MLflow run, or process)."""
    return Snapshot(innermost())


def reset() -> None:
    """Zero the innermost scope's counters and close its circuit: calls go through again."""
    RUNTIME.store.reset(innermost())


class session:
    """A unit of work with its own counters: context manager and decorator, sync and async.

    ``runguard.session("agent-7", max_calls=10)`` limits that unit of work; sessions
    nest, and asyncio tasks started inside inherit the session (contextvars). A thread
    pool does not inherit context: submit ``contextvars.copy_context().run`` (see README).
    Each entry (and each call of a decorated function) starts fresh counters.

    ``shared_budget="tenant:acme"`` (with ``shared_max_*`` limits and ``shared_window``) makes
    every call in the session also charge that shared budget, beside the process-wide one: a
    budget named at run time, e.g. one per tenant. It needs a shared store (``autolog(store=…)``).
    """

    def __init__(self, name: str | None = None, *, window: str | int | None = None, **limits: Any) -> None:
        self.name = name
        self.window = parse_window(window, "window")
        self._keywords = dict(limits)
        self.shared = session_shared(limits)
        self.limits = explicit_limits(limits)
        self.scope: Scope | None = None  # the last one entered (one object may be entered by many tasks)

    def _enter(self) -> session:
        if self.shared is not None and RUNTIME.enabled and not hasattr(RUNTIME.store, "client"):
            raise RunGuardConfigError(
                f"runguard: session(shared_budget={self.shared.name!r}) needs a shared store: "
                "runguard.autolog(store='redis://host:6379/0') or RUNGUARD_STORE"
            )
        name = self.name if self.name is not None else f"anonymous-{next(_anonymous)}"
        scope = self.scope = Scope(f"session:{name}", self.limits, window=self.window)
        scope.owner = self
        scope.shared = self.shared
        _SESSIONS.set((*_SESSIONS.get(), scope))
        return self

    def _exit(self) -> None:
        """Close the innermost scope this object opened *in this context*: threads and tasks that
        enter the same object each have their own (no token shared between contexts)."""
        chain = _SESSIONS.get()
        for position in range(len(chain) - 1, -1, -1):
            if chain[position].owner is self:
                _SESSIONS.set(chain[:position] + chain[position + 1 :])
                return

    def __enter__(self) -> session:
        return self._enter()

    def __exit__(self, *exc: object) -> None:
        self._exit()

    async def __aenter__(self) -> session:
        return self._enter()

    async def __aexit__(self, *exc: object) -> None:
        self._exit()

    def snapshot(self) -> Snapshot:
        if self.scope is None:
            raise RuntimeError("runguard: this session has not been entered yet")
        return Snapshot(self.scope)

    def __call__(self, func):
        name, keywords, window = self.name or func.__qualname__, self._keywords, self.window

        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def run_async(*args, **kwargs):
                async with session(name, window=window, **keywords):
                    return await func(*args, **kwargs)

            return run_async

        @functools.wraps(func)
        def run(*args, **kwargs):
            with session(name, window=window, **keywords):
                return func(*args, **kwargs)

        return run


def _reset_process() -> None:
    """Fresh counters, no holds, closed circuit and no loop history for the process scope."""
    PROCESS.used[:] = [0] * len(COUNTERS)
    PROCESS.reserved[:] = [0] * len(COUNTERS)
    PROCESS.tripped = None
    PROCESS.throttled = 0
    PROCESS.loops = None
    PROCESS.window_end = 0.0


RUNTIME.on_reset(_reset_process)
