"""The counters every scope keeps, and why a scope's circuit opens.

Core layer: no MLflow, wrapt or Redis. Counters travel through the stores as plain tuples
in :data:`COUNTERS` order (the hot path indexes them by the named constants below); every
value that leaves the store (a trip, a snapshot) is a :class:`Counters` with named fields.
A limit's identity is :attr:`Trip.limit`, never read back out of a reason's text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple


class Counters(NamedTuple):
    """A scope's usage: calls, HTTP requests, tokens, USD and seconds spent in requests."""

    calls: float = 0
    requests: float = 0
    input_tokens: float = 0
    output_tokens: float = 0
    total_tokens: float = 0
    cost_usd: float = 0.0
    request_seconds: float = 0.0


COUNTERS: tuple[str, ...] = Counters._fields
CALLS, REQUESTS, INPUT, OUTPUT, TOTAL, COST, SECONDS = range(len(COUNTERS))
ZERO = Counters()
COUNTER_OF_LIMIT = {
    "max_calls": CALLS,
    "max_requests": REQUESTS,
    "max_input_tokens": INPUT,
    "max_output_tokens": OUTPUT,
    "max_total_tokens": TOTAL,
    "max_cost_usd": COST,
    "max_request_latency_s": SECONDS,
}
LIMIT_OF_COUNTER = {index: name for name, index in COUNTER_OF_LIMIT.items()}
_WHAT = {
    CALLS: "call ceiling",
    REQUESTS: "request ceiling",
    INPUT: "input-token ceiling",
    OUTPUT: "output-token ceiling",
    TOTAL: "total-token ceiling",
    COST: "cost ceiling (USD)",
    SECONDS: "request-latency budget (s)",
}


def fmt(value: Any) -> str:
    """A limit or a count as people read it (a lifted limit is ``none``)."""
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return "none"
        if not value.is_integer():
            return f"{value:.6g}"
    try:
        return str(int(value))
    except (TypeError, ValueError, OverflowError):
        return str(value)


@dataclass(frozen=True)
class Trip:
    """Why a scope's circuit opened (or, for a refusal that trips nothing, why a call was refused).

    ``cut`` marks a stream cut mid-flight (its output arrived in part); ``retry_after`` is
    the last ``Retry-After`` a provider sent, in seconds, when known."""

    scope: str
    limit: str
    threshold: Any
    observed: Any
    reason: str
    used: Counters = field(default=ZERO)
    consecutive_429s: int = 0
    cut: bool = False


def as_counters(used: Any) -> Counters:
    return used if type(used) is Counters else Counters(*used)


def make_trip(
    scope_name: str,
    index: int,
    threshold: float,
    observed: float,
    used: Any,
    *,
    forecast: bool = False,
    limit: str | None = None,
    prefix: str = "",
) -> Trip:
    """The trip of counter ``index`` at ``threshold`` (``forecast``: this call would cross it)."""
    if forecast:
        reason = f"{_WHAT[index]} would be exceeded by this call ({fmt(observed)} > {fmt(threshold)})"
    else:
        reason = f"{_WHAT[index]} hit ({fmt(observed)}/{fmt(threshold)})"
    return Trip(scope_name, limit or LIMIT_OF_COUNTER[index], threshold, observed, prefix + reason, as_counters(used))


def stream_cut(scope_name: str, index: int, threshold: float, observed: float, used: Any, closed: bool = True) -> Trip:
    """Counter ``index`` crossed ``threshold`` while a stream arrived (``closed``: the stream was
    cut there; else, in shadow mode, it went on)."""
    what = (
        "the stream was closed after part of its output had arrived" if closed else "the stream went on (shadow mode)"
    )
    return Trip(
        scope_name,
        LIMIT_OF_COUNTER[index],
        threshold,
        observed,
        f"{_WHAT[index]} crossed mid-stream ({fmt(observed)}/{fmt(threshold)}); {what}",
        as_counters(used),
        cut=True,
    )


class CounterView:
    """Read-only counters of a scope, by name (base of the snapshots users read)."""

    __slots__ = COUNTERS
    calls: float
    requests: float
    input_tokens: float
    output_tokens: float
    total_tokens: float
    cost_usd: float
    request_seconds: float

    def _show(self, used: Any) -> None:
        for name, value in zip(COUNTERS, used):
            object.__setattr__(self, name, value)

    @property
    def counters(self) -> Counters:
        return Counters(*(getattr(self, name) for name in COUNTERS))


def in_flight_used(used: Any) -> Counters:
    """``used`` counting the first attempt of the call in flight (held until it settles), for
    trips that happen during a call."""
    counted = as_counters(used)
    return counted._replace(requests=counted.requests + 1)


__all__ = ["COUNTERS", "Counters", "Trip", "fmt", "in_flight_used", "make_trip", "replace", "stream_cut"]
