"""Stream proxies: count output as chunks arrive, cut the stream on a breach.

Accounting is guarded *inside* each chunk step (a guard around a generator only
protects its creation). On an internal failure the proxy logs once, stops
accounting and keeps yielding chunks. The call is settled exactly once: at
exhaustion, error, ``close()``, ``__exit__``/``__aexit__``, a mid-stream trip, or
when an abandoned stream is garbage-collected.
"""

from __future__ import annotations

import weakref
from typing import Any

import wrapt

from . import _recording
from ._errors import RunGuardTripped
from ._guard import IN_CALL, IN_SYNC_CALL, Call, settle_quietly, trip_exception, watch_tool_calls
from ._runtime import RUNTIME, internal_error, log_once
from ._store import COST, LIMIT_OF_COUNTER, OUTPUT, TOTAL, make_trip
from .tokens import counter_for

_STREAM_COUNTERS = (OUTPUT, TOTAL, COST)


class StreamMeter:
    """State of one stream's accounting (kept apart from the proxy so a finalizer can settle it)."""

    __slots__ = ("call", "output", "usage", "done", "broken", "count", "checks", "tool_calls")

    def __init__(self, call: Call) -> None:
        self.call = call
        self.output = 0
        self.usage = None
        self.done = False
        self.broken = False
        self.count = counter_for(call.model)
        self.tool_calls = {} if call.loop_repeats != float("inf") else None  # for loop detection
        self.checks = [
            (scope, index, threshold, LIMIT_OF_COUNTER[index])
            for scope, scope_checks in call.charges
            for index, threshold in scope_checks
            if index in _STREAM_COUNTERS
        ]

    def account(self, chunk: Any) -> "RunGuardTripped | None":
        """Count one chunk; return the trip to raise when a limit is crossed mid-stream."""
        if self.broken or self.done:
            return None
        try:
            endpoint = self.call.endpoint
            if self.tool_calls is not None:
                endpoint.chunk_tool_calls(chunk, self.tool_calls)
            usage = endpoint.chunk_usage(chunk)
            if usage is not None:
                self.usage = usage
                return None
            text = endpoint.chunk_text(chunk)
            if text:
                self.output += max(1, self.count(text))
                if self.checks:
                    return self._breach()
        except Exception as error:
            self.broken = True
            internal_error("stream accounting", error)
        return None

    def _breach(self):
        call = self.call
        now = call.amounts(call.prompt, self.output)
        forecast = call.forecast
        for scope, index, threshold, limit in self.checks:
            # what the scope's counter would be if this stream settled now (no lock: a read)
            would_be = scope.used[index] + scope.reserved[index] - forecast[index] + now[index]
            if would_be > threshold:
                trip = make_trip(scope.name, index, threshold, would_be, limit, scope.used)
                trip = type(trip)(trip.scope, trip.limit, trip.threshold, trip.observed,
                                  trip.reason.replace(" hit ", " crossed mid-stream ", 1), trip.used)
                if call.on_trip == "raise":
                    return scope, trip
                _recording.refused(trip_exception(trip), trip, newly=True, target=call.endpoint.name)
                log_once(("warn-stream", scope.name, limit), "runguard (shadow mode): would cut stream: %s", trip.reason)
                self.checks = []
                return None
        return None

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        usage = self.usage
        if usage is None:
            usage = (self.call.prompt, self.output, 0)
        settle_quietly(self.call, usage)
        if self.tool_calls:
            try:
                watch_tool_calls(self.call, [tuple(entry) for entry in self.tool_calls.values()])
            except Exception as error:
                internal_error("loop detection", error)


def _cut(meter: StreamMeter, found, close) -> RunGuardTripped:
    """Close the HTTP response (the provider stops generating), settle, open the circuit."""
    scope, trip = found
    try:
        close()
    except Exception as error:
        internal_error("closing a stream", error)
    opened = RUNTIME.store.trip(scope, trip)
    meter.finish()
    error = trip_exception(opened)
    _recording.refused(error, opened, newly=opened is trip, target=meter.call.endpoint.name)
    return error


class SyncStreamProxy(wrapt.ObjectProxy):
    def __init__(self, stream: Any, meter: StreamMeter) -> None:
        super().__init__(stream)
        self._self_meter = meter
        weakref.finalize(self, meter.finish)

    def __iter__(self):
        return self

    def __next__(self):
        meter = self._self_meter
        mark = IN_SYNC_CALL
        outer, mark.call = mark.call, meter.call  # MLflow's span may end inside: it sees this call
        try:
            chunk = self.__wrapped__.__next__()
        except BaseException:
            meter.finish()
            raise
        finally:
            mark.call = outer
        found = meter.account(chunk)
        if found is not None:
            raise _cut(meter, found, self.__wrapped__.close)
        return chunk

    def __enter__(self):
        self.__wrapped__.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            return self.__wrapped__.__exit__(*exc)
        finally:
            self._self_meter.finish()

    def close(self):
        try:
            return self.__wrapped__.close()
        finally:
            self._self_meter.finish()


class AsyncStreamProxy(wrapt.ObjectProxy):
    def __init__(self, stream: Any, meter: StreamMeter) -> None:
        super().__init__(stream)
        self._self_meter = meter
        weakref.finalize(self, meter.finish)

    def __aiter__(self):
        return self

    async def __anext__(self):
        meter = self._self_meter
        token = IN_CALL.set(meter.call)
        try:
            chunk = await self.__wrapped__.__anext__()
        except BaseException:
            meter.finish()
            raise
        finally:
            IN_CALL.reset(token)
        found = meter.account(chunk)
        if found is not None:
            closing = []
            error = _cut(meter, found, lambda: closing.append(self.__wrapped__.close()))
            for pending in closing:
                try:
                    await pending
                except Exception as close_error:
                    internal_error("closing a stream", close_error)
            raise error
        return chunk

    async def __aenter__(self):
        await self.__wrapped__.__aenter__()
        return self

    async def __aexit__(self, *exc):
        try:
            return await self.__wrapped__.__aexit__(*exc)
        finally:
            self._self_meter.finish()

    async def close(self):
        try:
            return await self.__wrapped__.close()
        finally:
            self._self_meter.finish()


def wrap_stream(stream: Any, call: Call):
    meter = StreamMeter(call)
    if hasattr(stream, "__anext__"):
        return AsyncStreamProxy(stream, meter)
    return SyncStreamProxy(stream, meter)
