"""Process-wide state of the breaker: the active configuration, the store, the switch."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from ._config import LIMITS, Setting, resolve
from ._store import MemoryStore

logger = logging.getLogger("runguard_autolog")


class Runtime:
    def __init__(self) -> None:
        self.enabled = False  # call-time switch read by every wrapper
        self.version = 0  # bumped whenever the configuration changes
        self.settings: dict[str, Setting] = resolve({}, environ={})
        self.local = self.store = MemoryStore()  # store: local, or local + a shared budget (_shared)
        self.lock = threading.RLock()

    def configure(self, settings: dict[str, Setting]) -> None:
        self.settings = settings
        self.version += 1

    def use_shared(self, budget) -> None:
        """Charge every call to ``budget`` too (``None``: local scopes only)."""
        previous = getattr(self.store, "budget", None)
        if budget is None:
            self.store = self.local
        else:
            from ._shared import SharedStore

            self.store = SharedStore(self.local, budget)
        if previous is not None and previous is not budget:
            previous.close()

    def limits(self) -> dict[str, Any]:
        return {name: self.settings[name].value for name in LIMITS}

    @property
    def on_trip(self):
        return self.settings["on_trip"].value


RUNTIME = Runtime()

# Private test hook (like MLflow's is_testing()): internal errors re-raise instead of degrading.
_STRICT = [os.environ.get("_RUNGUARD_STRICT", "") == "1"]


def strict() -> bool:
    return _STRICT[0]


def set_strict(value: bool) -> None:
    _STRICT[0] = bool(value)


_logged: set = set()
_logged_lock = threading.Lock()


def log_once(key: Any, message: str, *args: Any, level: int = logging.WARNING, exc_info: Any = None) -> None:
    """Log a message once per key: runguard sits on hot loops."""
    if key in _logged:  # the common case, without the lock (a set lookup is atomic)
        return
    with _logged_lock:
        if key in _logged:
            return
        _logged.add(key)
    logger.log(level, message, *args, exc_info=exc_info)


def internal_error(stage: str, error: BaseException) -> None:
    """A failure inside runguard: re-raise in strict mode, else log once and carry on unguarded."""
    if strict():
        raise error
    log_once(
        ("internal", stage, type(error).__name__),
        "runguard: internal error during %s (%s: %s); the call continues unguarded. "
        "This is logged once.",
        stage,
        type(error).__name__,
        error,
        exc_info=error,
    )
