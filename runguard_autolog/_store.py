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
    tuple of ``(counter_index, threshold)`` pairs (the limit's name is
    ``LIMIT_OF_COUNTER[counter_index]``); ``reservation.forecast``
    the amounts to hold. Only checked counters are held: nothing else reads them. Scopes already tripped, or a limit the forecast would
    cross, give a ``Refusal``. With ``enforce=True`` a refusal reserves nothing;
    with ``enforce=False`` (shadow mode) the call is reserved anyway. A refusal that
    the committed usage alone causes (not other calls still in flight) trips the
    scope: it is sticky.
``settle(reservation, actual, ok=True) -> [Trip, ...]``
    Moves the forecast out of *reserved* and adds the actual usage to *used*;
    every scope whose counter reached a limit (``>=``) trips (sticky) and is
    returned, so the *next* call is refused. Settling twice is a no-op. A
    successful call (``ok``) ends each scope's run of consecutive 429s; a call that
    failed after sending (``ok=False``) settles what its attempts used.
``release(reservation)``
    The call never reached the network (it failed before sending): drop the hold.
``retry(reservation, seconds) -> Refusal | None``
    One more HTTP attempt of an admitted call (an SDK's internal retry): commit the
    ``seconds`` its earlier attempts spent, then admit the attempt as one more
    request (``used`` at once: it is about to leave) or refuse it.
``throttled(reservation, limits, retry_after) -> [(scope, Trip), ...]``
    An attempt got a 429: lengthen each scope's run of consecutive 429s and trip
    those that reached their ``max_consecutive_429s`` (``limits``: one per scope).
``reset(scope)``
    Zero the scope's used counters, forget its loop history and close its circuit.

Amounts travel as tuples in :data:`~runguard_autolog._counters.COUNTERS` order
(``request_seconds`` is the time spent inside LLM HTTP attempts); what leaves the store
(trips, snapshots) is a named :class:`~runguard_autolog._counters.Counters`.

A refusal trips a scope (sticky) only when its committed usage has reached the limit: a
call refused because its own forecast would cross a limit (a huge prompt, a huge
``max_tokens``) is refused, and the scope stays open, since nothing was spent.
``reset`` (and a window's roll-over) also drops the holds of calls in flight: a call reserved
before a scope's reset settles without touching that scope's fresh counters or holds.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Any

from ._counters import (
    COUNTERS,
    REQUESTS,
    SECONDS,
    Trip,
    as_counters,
    fmt,
    in_flight_used,
    make_trip,
)
from ._runtime import RUNTIME


def _retry_after_note(retry_after: float | None) -> str:
    if retry_after is None:
        return ""
    return f"; the last one said Retry-After: {fmt(round(retry_after, 3))} s"


@dataclass
class Refusal:
    scope: Any
    trip: Trip
    sticky: bool  # the scope's circuit is open (not just other calls in flight)
    new: bool = False  # this reservation is what opened it


class Reservation:
    """What one admitted call holds in each scope until it settles or is released:
    ``charges`` and ``forecast`` as described above, and ``settled`` (False until the
    store settles or releases it); ``lease``, what a shared store holds for it (see _shared)."""

    __slots__ = ("charges", "epoch", "forecast", "lease", "settled")
    charges: Any
    epoch: int
    forecast: tuple
    lease: Any
    settled: bool


def _refusal(scope, index: int, threshold: float, wanted: float) -> Refusal:
    """Why ``wanted`` does not fit; opens the circuit when the committed usage alone forbids it."""
    used, reserved = scope.used, scope.reserved
    if used[index] >= threshold:  # committed usage is at the ceiling: the circuit opens
        scope.tripped = trip = make_trip(scope.name, index, threshold, used[index], used)
        return Refusal(scope, trip, True, True)
    # this call's own forecast (or it with the calls in flight) does not fit: refused, not tripped
    observed = used[index] + reserved[index] + wanted
    return Refusal(scope, make_trip(scope.name, index, threshold, observed, used, forecast=True), False, False)


class MemoryStore:
    """In-process counters behind one lock: exact under threads and asyncio."""

    remote = False  # nothing to wait for: async calls reserve inline

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._epoch = 0  # resets so far: a reservation older than a scope's reset holds nothing there
        RUNTIME.fork_safe(self, "_lock", threading.Lock)

    # NB: reserve() and settle() run under the lock around every billed call: plain
    # indexing only (each bytecode counts; C helpers such as map() cost more here).
    def reserve(self, reservation, enforce=True):
        charges, forecast = reservation.charges, reservation.forecast
        with self._lock:
            reservation.epoch = self._epoch
            # one pass that tests and holds each checked counter; a refusal (rare) undoes it
            for scope, checks in charges:
                if scope.tripped is not None:
                    failed = None
                    break
                used, reserved = scope.used, scope.reserved
                for failed, threshold in checks:
                    held = reserved[failed] + forecast[failed]
                    if used[failed] + held > threshold:
                        break
                    reserved[failed] = held
                else:
                    continue
                break
            else:
                return None
            return self._refuse(reservation, scope, failed, enforce)

    def _refuse(self, reservation, stopped_at, failed, enforce) -> Refusal | None:
        """Undo the holds the pass made before ``stopped_at``, then say why (under the lock)."""
        charges, forecast = reservation.charges, reservation.forecast
        for scope, checks in charges:
            if scope is stopped_at:
                indices = [index for index, _ in checks]
                checks = () if failed is None else checks[: indices.index(failed)]
            reserved = scope.reserved
            for index, _ in checks:
                reserved[index] -= forecast[index]
            if scope is stopped_at:
                break
        refusal = None
        for scope, checks in charges:
            if scope.tripped is not None:
                refusal = Refusal(scope, scope.tripped, True, False)
                break
            used, reserved = scope.used, scope.reserved
            for index, threshold in checks:
                if used[index] + (reserved[index] + forecast[index]) > threshold:  # as in reserve()
                    refusal = _refusal(scope, index, threshold, forecast[index])
                    break
            if refusal is not None:
                break
        if enforce:
            reservation.settled = True  # nothing is held
        else:  # shadow mode: the call goes ahead, so it holds its forecast like any other
            for scope, checks in charges:
                reserved = scope.reserved
                for index, _ in checks:
                    reserved[index] += forecast[index]
        return refusal

    def settle(self, reservation, actual, ok=True):
        trips = ()
        with self._lock:
            if reservation.settled:
                return trips
            reservation.settled = True
            forecast = reservation.forecast
            stale = reservation.epoch != self._epoch
            for scope, checks in reservation.charges:
                used, reserved = scope.used, scope.reserved
                if stale and scope.epoch > reservation.epoch:
                    continue  # reserved before this scope was reset (a new window): not its usage
                used[0] += actual[0]
                used[1] += actual[1]
                used[2] += actual[2]
                used[3] += actual[3]
                used[4] += actual[4]
                used[5] += actual[5]
                used[6] += actual[6]
                if ok:
                    scope.throttled = 0
                for index, threshold in checks:
                    reserved[index] -= forecast[index]
                    if used[index] >= threshold and scope.tripped is None:
                        scope.tripped = make_trip(scope.name, index, threshold, used[index], used)
                        trips += ((scope, scope.tripped),)
        return trips

    def release(self, reservation):
        with self._lock:
            if reservation.settled:
                return
            reservation.settled = True
            forecast = reservation.forecast
            for scope, checks in reservation.charges:
                if scope.epoch > reservation.epoch:
                    continue  # its holds went with the reset
                reserved = scope.reserved
                for index, _ in checks:
                    reserved[index] -= forecast[index]

    def retry(self, reservation, seconds, enforce=True):
        with self._lock:
            charges = reservation.charges
            for scope, _ in charges:
                scope.used[SECONDS] += seconds
            refusal = None
            for scope, checks in charges:
                used, reserved = scope.used, scope.reserved
                if scope.tripped is None:
                    for index, threshold in checks:
                        if index == SECONDS and used[SECONDS] >= threshold:
                            trip = make_trip(scope.name, SECONDS, threshold, used[SECONDS], used)
                            scope.tripped = replace(trip, used=in_flight_used(used), consecutive_429s=scope.throttled)
                            refusal = Refusal(scope, scope.tripped, True, True)
                            break
                        if index == REQUESTS and used[REQUESTS] + reserved[REQUESTS] + 1 > threshold:
                            refusal = _refusal(scope, REQUESTS, threshold, 1)
                            if refusal.new:
                                scope.tripped = refusal.trip = replace(
                                    refusal.trip, used=in_flight_used(used), consecutive_429s=scope.throttled
                                )
                            break
                else:
                    refusal = Refusal(scope, scope.tripped, True, False)
                if refusal is not None:
                    break
            if refusal is None or not enforce:  # shadow mode: a refused attempt goes too, and counts
                for scope, _ in charges:
                    scope.used[REQUESTS] += 1
            return refusal

    def unretry(self, reservation):
        """Take back the request :meth:`retry` counted for an attempt that was not sent after all
        (a shared budget refused it)."""
        with self._lock:
            for scope, _ in reservation.charges:
                scope.used[REQUESTS] -= 1

    def throttled(self, reservation, limits, retry_after=None):
        trips = []
        with self._lock:
            for (scope, _), limit in zip(reservation.charges, limits):
                scope.throttled += 1
                if scope.throttled >= limit and scope.tripped is None:
                    scope.tripped = Trip(
                        scope.name,
                        "max_consecutive_429s",
                        limit,
                        scope.throttled,
                        f"{scope.throttled} consecutive 429 (rate-limited) responses ({scope.throttled}/{fmt(limit)})"
                        + _retry_after_note(retry_after),
                        in_flight_used(scope.used),
                        scope.throttled,
                    )
                    trips.append((scope, scope.tripped))
        return trips

    def reset(self, scope):
        with self._lock:
            self._reset(scope)

    def _reset(self, scope):
        """(under the lock) Fresh counters, no holds, closed circuit, no loop history; calls in
        flight belong to the counters before: they settle without touching these."""
        self._epoch += 1
        scope.epoch = self._epoch
        scope.used[:] = [0] * len(COUNTERS)
        scope.reserved[:] = [0] * len(COUNTERS)
        scope.throttled = 0
        scope.tripped = None
        scope.loops = None  # the loop history goes with the circuit

    def roll(self, scope, now: float, window_end: float) -> None:
        """A new fixed window: reset the scope (once, however many callers see the boundary, and
        in the same locked step, so no call is admitted against the old counters in between)."""
        with self._lock:
            if now < scope.window_end:
                return
            scope.window_end = window_end
            self._reset(scope)

    def trip(self, scope, trip):
        """Open a scope's circuit for a reason found outside the counters (first one wins)."""
        with self._lock:
            if scope.tripped is None:
                scope.tripped = trip
            return scope.tripped

    def snapshot(self, scope):
        with self._lock:
            return as_counters(scope.used), scope.tripped, scope.throttled


RUNTIME.local = RUNTIME.store = MemoryStore()
