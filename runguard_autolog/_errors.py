"""Exceptions raised by runguard.

::

    RuntimeError
     └── RunGuardTripped        a breaker refused a call (the only exception raised by design)
    ValueError
     └── RunGuardConfigError    a keyword or RUNGUARD_* variable holds a bad value
"""

from __future__ import annotations

from typing import Any

__all__ = ["RunGuardConfigError", "RunGuardTripped"]


class RunGuardTripped(RuntimeError):
    """A guard refused an LLM call before it was sent (or cut a stream mid-flight).

    Attributes:
        reason: a human sentence, e.g. ``"call ceiling hit (50/50)"``.
        limit: the keyword that tripped, e.g. ``"max_calls"``.
        threshold: the limit's value.
        observed: the value that reached or would cross it.
        scope: ``"session:<name>"``, ``"run:<run_id>"``, ``"process"`` or ``"shared:<name>"``.
    """

    def __init__(
        self,
        reason: str,
        *,
        limit: str,
        threshold: Any,
        observed: Any,
        scope: str,
        details: dict[str, Any] | None = None,
    ) -> None:
        self.reason = reason
        self.limit = limit
        self.threshold = threshold
        self.observed = observed
        self.scope = scope
        self.details = dict(details or {})
        super().__init__(self._message())

    @classmethod
    def from_trip(cls, trip: Any, *, shadow: bool = False) -> RunGuardTripped:
        """The exception for a :class:`~runguard_autolog._counters.Trip` (``shadow``: handed to a
        ``warn`` or callable ``on_trip``, so the call may still be sent)."""
        details: dict[str, Any] = {}
        if getattr(trip, "cut", False):
            details["cut"] = True
        if shadow:
            details["shadow"] = True
        return cls(
            trip.reason,
            limit=trip.limit,
            threshold=trip.threshold,
            observed=trip.observed,
            scope=trip.scope,
            details=details,
        )

    def _message(self) -> str:
        sent = self.details.get("attempts")
        if sent:  # stopped between the HTTP attempts of one call
            return (
                f"runguard: {self.reason} in scope {self.scope}. {sent} attempt(s) of this call had been sent; "
                f"no further one was. Fix the cause or raise the limit ({self.limit}), then call "
                f"runguard.reset() or open a new runguard.session()."
            )
        if self.scope.startswith("shared:"):
            name = self.scope[len("shared:") :]
            if self.limit == "store_outage":
                return f"runguard: {self.reason}. The call was not sent."
            return (
                f"runguard: {self.reason} in scope {self.scope}. The call was not sent, and no process "
                f"on this budget may send one. Raise the limit with runguard.autolog({self.limit}=...) or "
                f"RUNGUARD_{self.limit.upper()}=..., or reset the budget for every process with "
                f"runguard.reset_shared({name!r}) or `runguard reset --shared {name}`."
            )
        if self.details.get("shadow"):
            return (
                f"runguard: {self.reason} in scope {self.scope}. on_trip is not 'raise' (shadow mode): "
                f"the call is sent unless on_trip raises. Enforce with on_trip='raise'."
            )
        if self.details.get("cut"):
            return (
                f"runguard: {self.reason} in scope {self.scope}. Raise the limit with "
                f"runguard.autolog({self.limit}=...) or RUNGUARD_{self.limit.upper()}=..., open a new "
                f"runguard.session(), or call runguard.reset() to close the circuit."
            )
        if self.threshold is None:  # the provider refused in a way retrying cannot fix
            return (
                f"runguard: {self.reason} in scope {self.scope}. No further request was sent. "
                f"Fix the cause, then call runguard.reset() or open a new runguard.session()."
            )
        return (
            f"runguard: {self.reason} in scope {self.scope}. The call was not sent. "
            f"Raise the limit with runguard.autolog({self.limit}=...) or "
            f"RUNGUARD_{self.limit.upper()}=..., open a new runguard.session(), "
            f"or call runguard.reset() to close the circuit."
        )

    def __reduce__(self):  # keep the keyword-only fields across pickling (multiprocessing)
        return (
            _rebuild_trip,
            (self.reason, self.limit, self.threshold, self.observed, self.scope, self.details),
        )


def _rebuild_trip(reason, limit, threshold, observed, scope, details):
    return RunGuardTripped(reason, limit=limit, threshold=threshold, observed=observed, scope=scope, details=details)


class RunGuardConfigError(ValueError):
    """A limit or option has a value runguard cannot use; the message names it and the value."""


_MAX_CHAIN = 64  # exceptions examined along __cause__ / __context__ / groups: a bound, not a search


def tripped_in(error: BaseException) -> RunGuardTripped | None:
    """The :class:`RunGuardTripped` behind ``error``: itself, else the first one along its
    ``__cause__`` / ``__context__`` chain (a framework may wrap it; a context suppressed with
    ``raise ... from None`` is not followed) or inside an exception group. None: not a trip."""
    pending: list[BaseException] = [error]
    seen: set[int] = set()
    while pending and len(seen) < _MAX_CHAIN:
        exc = pending.pop()
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, RunGuardTripped):
            return exc
        linked: list[BaseException] = []
        grouped = getattr(exc, "exceptions", None)  # BaseExceptionGroup (or its 3.10 backport)
        if isinstance(grouped, tuple):
            linked.extend(e for e in grouped if isinstance(e, BaseException))
        if exc.__cause__ is not None:
            linked.append(exc.__cause__)
        if exc.__context__ is not None and not exc.__suppress_context__:
            linked.append(exc.__context__)
        pending.extend(reversed(linked))  # depth first, in the order above
    return None


for _cls in (RunGuardTripped, RunGuardConfigError):
    _cls.__module__ = "runguard_autolog"
