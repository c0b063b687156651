"""Process-wide state of the breaker, on one object: the switch, the configuration, the
store, the scopes' registry, the call in flight, and where events go.

Core layer: it imports nothing of MLflow, wrapt or Redis, and nothing above it. The layers
above plug in: the stores set :attr:`Runtime.store`, the recorder sets
:attr:`Runtime.events`. Tests reset everything with :meth:`Runtime.reset`.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

from ._config import LIMITS, Setting, resolve

logger = logging.getLogger("runguard_autolog")


def log_trip(trip: Any) -> None:
    """The one log line of a scope's circuit opening."""
    logger.warning(
        "runguard: %s in scope %s; further calls there are refused until reset (in a windowed scope: until its "
        "window rolls over)",
        trip.reason,
        trip.scope,
    )


class Events:
    """Where trips and refusals go. The default only logs; the recorder (``_recording``)
    replaces it with one that also writes MLflow. Implementations never raise."""

    def tripped(self, trip: Any, scope: Any = None, where: Any = None) -> None:
        """A scope's circuit just opened (``where``: the MLflow run to record it on, when the
        trip was found off the call's thread)."""
        log_trip(trip)

    def refused(
        self, error: BaseException, trip: Any, newly: bool, target: str, request: Any = None, sticky: bool = True
    ) -> None:
        """A call was refused (or, in shadow mode, would have been); ``request``: the call's, when
        there is one (the recorder finds MLflow's span of the call through it); ``sticky``: the
        scope's circuit is open (not a call refused for its own forecast or for calls in flight)."""
        if newly:
            self.tripped(trip)

    def run_info(self) -> Any:
        """This thread's MLflow run, for trips recorded later off this thread (None: none)."""
        return None


def _no_switch(on: bool) -> None:
    raise RuntimeError("runguard: the public API is not loaded (import runguard_autolog)")


class _ThreadMark(threading.local):
    call: Any = None


class Runtime:
    """Everything runguard keeps per process."""

    def __init__(self) -> None:
        self.enabled = False  # call-time switch read by every wrapper
        self.version = 0  # bumped whenever the configuration changes
        self.settings: dict[str, Setting] = resolve({}, environ={})
        self.local: Any = None  # the in-memory store (set by _store)
        self.store: Any = None  # local, or local + a shared budget (_shared)
        self.lock = threading.RLock()  # configuration changes
        self.events: Events = Events()
        self.strict = os.environ.get("_RUNGUARD_STRICT", "") == "1"  # tests: internal errors re-raise
        self.logged: set = set()
        self.logged_lock = threading.Lock()
        # scopes (see _scopes): the process scope, MLflow runs seen, the evaluation in progress
        self.process: Any = None
        self.runs: dict[str, Any] = {}
        self.run_starts: dict[str, float] = {}
        self.runs_lock = threading.Lock()
        self.runs_seen = False
        self.evaluating: tuple = ()
        # the guarded call in flight: async calls in a ContextVar (tasks interleave on a thread),
        # sync calls in a thread-local (cheaper, and exact: a sync call never yields its thread)
        self.in_call: contextvars.ContextVar[Any] = contextvars.ContextVar("runguard_in_call", default=None)
        self.in_sync_call = _ThreadMark()
        self.switch: Callable[[bool], None] = _no_switch  # autolog() on/off, set by the public API
        self._resets: list[Callable[[], None]] = []
        self._fork_locks: list[tuple[weakref.ref, str, Callable[[], Any]]] = []
        self._fork_kept = 0  # entries after the last pruning

    def configure(self, settings: dict[str, Setting]) -> None:
        self.settings = settings
        self.version += 1

    def limits(self) -> dict[str, Any]:
        return {name: self.settings[name].value for name in LIMITS}

    @property
    def on_trip(self) -> Any:
        return self.settings["on_trip"].value

    def in_flight(self) -> Any:
        """The guarded call running in this thread/task, if any. A mark whose call has settled
        is stale (LangChain ends a call in a copy of the context it started in): it no longer
        counts."""
        call = self.in_sync_call.call or self.in_call.get()
        return call if call is not None and not call.settled else None

    # -- lifecycle ---------------------------------------------------------------------------
    def on_reset(self, clear: Callable[[], None]) -> None:
        """Register state of a module that :meth:`reset` must clear too."""
        self._resets.append(clear)

    def reset(self) -> None:
        """Forget every scope, counter, log-once key and cache (for tests)."""
        self.runs.clear()
        self.run_starts.clear()
        self.runs_seen = False
        self.evaluating = ()
        with self.logged_lock:
            self.logged.clear()
        for clear in self._resets:
            clear()

    def fork_safe(self, owner: Any, attribute: str, factory: Callable[[], Any]) -> None:
        """Re-create ``owner.<attribute>`` (a lock, a queue) in a forked child: a lock held by
        another thread at fork() would otherwise stay held for ever in the child."""
        self._remember((weakref.ref(owner), attribute, factory))

    def at_fork(self, owner: Any, method: str) -> None:
        """Call ``owner.<method>()`` in a forked child (for state more involved than a lock)."""
        self._remember((weakref.ref(owner), "", lambda: method))

    def _remember(self, entry: tuple) -> None:
        """Keep a fork entry; entries of owners gone are dropped as the list doubles (bounded)."""
        with self.logged_lock:
            self._fork_locks.append(entry)
            if len(self._fork_locks) > max(64, 2 * self._fork_kept):
                self._fork_locks[:] = [item for item in self._fork_locks if item[0]() is not None]
                self._fork_kept = len(self._fork_locks)

    def _after_fork(self) -> None:
        self.lock = threading.RLock()
        self.logged_lock = threading.Lock()
        self.runs_lock = threading.Lock()
        alive = []
        for ref, attribute, factory in self._fork_locks:
            owner = ref()
            if owner is not None:
                if attribute:
                    setattr(owner, attribute, factory())
                else:
                    getattr(owner, factory())()
                alive.append((ref, attribute, factory))
        self._fork_locks[:] = alive


RUNTIME = Runtime()
os.register_at_fork(after_in_child=RUNTIME._after_fork)


def strict() -> bool:
    return RUNTIME.strict


def set_strict(value: bool) -> None:
    RUNTIME.strict = bool(value)


def log_once(key: Any, message: str, *args: Any, level: int = logging.WARNING, exc_info: Any = None) -> None:
    """Log a message once per key: runguard sits on hot loops."""
    logged = RUNTIME.logged
    if key in logged:  # the common case, without the lock (a set lookup is atomic)
        return
    with RUNTIME.logged_lock:
        if key in logged:
            return
        logged.add(key)
    logger.log(level, message, *args, exc_info=exc_info)


def internal_error(stage: str, error: BaseException) -> None:
    """A failure inside runguard: re-raise in strict mode, else log once and carry on. The
    message names the exception's type only: its text may quote a request or a reply."""
    if RUNTIME.strict:
        raise error
    log_once(
        ("internal", stage, type(error).__name__),
        "runguard: internal error during %s (%s); the call continues unguarded. This is logged once.",
        stage,
        type(error).__name__,
    )
