"""Counter store: atomic *reserve before the call / settle after it / release on failure*.

The guard never asks "how much is left?" and then sends; it reserves. A call is
admitted only if, for every scope it is charged to and every limit that scope
enforces, ``used + reserved + forecast <= limit``; the forecast (1 call, the
prompt estimate, the request's max-token cap, their cost) is then held as
*reserved* until the call settles. So N concurrent callers cannot overshoot a
ceiling: the check and the hold are one atomic step (LiteLLM's proxy uses the
same design).

Contract of a store (the in-memory one here; a shared store implements the same):

``reserve(reservation, enforce) -> Refusal | None``
    ``reservation.charges`` is ``[(scope, checks), ...]`` where ``checks`` is a
    tuple of ``(counter_index, threshold, limit_name)``; ``reservation.forecast``
    the amounts to hold. Scopes already tripped, or a limit the forecast would
    cross, give a ``Refusal``. With ``enforce=True`` a refusal reserves nothing;
    with ``enforce=False`` (shadow mode) the call is reserved anyway. A refusal that
    the committed usage alone causes (not other calls still in flight) trips the
    scope: it is sticky.
``settle(reservation, actual) -> [Trip, ...]``
    Moves the forecast out of *reserved* and adds the actual usage to *used*;
    every scope whose counter reached a limit (``>=``) trips (sticky) and is
    returned, so the *next* call is refused. Settling twice is a no-op.
``release(reservation)``
    The call never billed (it failed before a response): drop the hold.
``reset(scope)``
    Zero the scope's used counters and close its circuit.

All amounts are 6-tuples in :data:`COUNTERS` order.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Sequence

COUNTERS = ("calls", "requests", "input_tokens", "output_tokens", "total_tokens", "cost_usd")
CALLS, REQUESTS, INPUT, OUTPUT, TOTAL, COST = range(6)
COUNTER_OF_LIMIT = {
    "max_calls": CALLS,
    "max_requests": REQUESTS,
    "max_input_tokens": INPUT,
    "max_output_tokens": OUTPUT,
    "max_total_tokens": TOTAL,
    "max_cost_usd": COST,
}
_WHAT = {
    CALLS: "call ceiling",
    REQUESTS: "request ceiling",
    INPUT: "input-token ceiling",
    OUTPUT: "output-token ceiling",
    TOTAL: "total-token ceiling",
    COST: "cost ceiling (USD)",
}


def _fmt(value: float) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.6g}"
    return str(int(value))


@dataclass(frozen=True)
class Trip:
    """Why a scope's circuit opened."""

    scope: str
    limit: str
    threshold: Any
    observed: Any
    reason: str
    used: tuple = ()


def make_trip(scope_name: str, index: int, threshold: float, observed: float, limit: str, used, forecast=False) -> Trip:
    if forecast:
        reason = f"{_WHAT[index]} would be exceeded by this call ({_fmt(observed)} > {_fmt(threshold)})"
    else:
        reason = f"{_WHAT[index]} hit ({_fmt(observed)}/{_fmt(threshold)})"
    return Trip(scope_name, limit, threshold, observed, reason, tuple(used))


@dataclass
class Refusal:
    scope: Any
    trip: Trip
    sticky: bool  # the scope's circuit is open (not just other calls in flight)
    new: bool = False  # this reservation is what opened it


class Reservation:
    """What one admitted call holds in each scope until it settles or is released."""

    __slots__ = ("charges", "forecast", "settled")

    def __init__(self, charges: Sequence[tuple[Any, tuple]], forecast: tuple) -> None:
        self.charges = charges
        self.forecast = forecast
        self.settled = False


def _add(counters: list, amounts: tuple) -> None:
    # NB: unrolled and in place (called under the store's lock on every call)
    counters[0] += amounts[0]
    counters[1] += amounts[1]
    counters[2] += amounts[2]
    counters[3] += amounts[3]
    counters[4] += amounts[4]
    counters[5] += amounts[5]


def _sub(counters: list, amounts: tuple) -> None:
    counters[0] -= amounts[0]
    counters[1] -= amounts[1]
    counters[2] -= amounts[2]
    counters[3] -= amounts[3]
    counters[4] -= amounts[4]
    counters[5] -= amounts[5]


def _refusal(scope, index: int, threshold: float, limit: str, wanted: float) -> Refusal:
    """Why ``wanted`` does not fit; opens the circuit when the committed usage alone forbids it."""
    used, reserved = scope.used, scope.reserved
    alone = used[index] + wanted
    sticky = alone > threshold  # not merely other calls still in flight
    if used[index] >= threshold:  # already at the ceiling (e.g. charged while an outer scope)
        trip = make_trip(scope.name, index, threshold, used[index], limit, used)
    else:
        observed = alone if sticky else used[index] + reserved[index] + wanted
        trip = make_trip(scope.name, index, threshold, observed, limit, used, forecast=True)
    if sticky:
        scope.tripped = trip
    return Refusal(scope, trip, sticky, sticky)


class MemoryStore:
    """In-process counters behind one lock: exact under threads and asyncio."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def reserve(self, reservation, enforce=True):
        charges, forecast = reservation.charges, reservation.forecast
        refusal = None
        with self._lock:
            for scope, checks in charges:
                if scope.tripped is not None:
                    refusal = Refusal(scope, scope.tripped, True, False)
                    break
                used, reserved = scope.used, scope.reserved
                for index, threshold, limit in checks:
                    wanted = forecast[index]
                    if used[index] + reserved[index] + wanted > threshold:
                        refusal = _refusal(scope, index, threshold, limit, wanted)
                        break
                if refusal is not None:
                    break
            if refusal is not None and enforce:
                reservation.settled = True  # nothing is held
                return refusal
            for scope, _ in charges:
                _add(scope.reserved, forecast)
        return refusal

    def settle(self, reservation, actual):
        trips = ()
        with self._lock:
            if reservation.settled:
                return trips
            reservation.settled = True
            forecast = reservation.forecast
            for scope, checks in reservation.charges:
                used = scope.used
                _sub(scope.reserved, forecast)
                _add(used, actual)
                if checks and scope.tripped is None:
                    for index, threshold, limit in checks:
                        if used[index] >= threshold:
                            scope.tripped = make_trip(scope.name, index, threshold, used[index], limit, used)
                            trips += ((scope, scope.tripped),)
                            break
        return trips

    def release(self, reservation):
        with self._lock:
            if reservation.settled:
                return
            reservation.settled = True
            forecast = reservation.forecast
            for scope, _ in reservation.charges:
                _sub(scope.reserved, forecast)

    def reset(self, scope):
        with self._lock:
            scope.used[:] = [0] * 6
            scope.tripped = None

    def trip(self, scope, trip):
        """Open a scope's circuit for a reason found outside the counters (first one wins)."""
        with self._lock:
            if scope.tripped is None:
                scope.tripped = trip
            return scope.tripped

    def snapshot(self, scope):
        with self._lock:
            return tuple(scope.used), scope.tripped
