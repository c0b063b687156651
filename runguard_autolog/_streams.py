"""The stream driver: count output as chunks arrive, cut the stream on a breach.

One meter serves every streaming entry point: the openai SDK's ``Stream``/``AsyncStream``
(the request already sent), and generators that send their request when first iterated
(LangChain's ``stream``/``astream``, Databricks' ``predict_stream``), which are admitted at
the first chunk asked for (:func:`lazy_stream`). The endpoint reads each chunk.

Accounting is guarded *inside* each chunk step (a guard around a generator only protects
its creation). On an internal failure the proxy logs once, stops accounting and keeps
yielding chunks. When an output or cost limit is crossed mid-stream the underlying stream is
closed (the HTTP response is released, so the provider stops generating), the call is
settled with what arrived, and the iterator raises ``RunGuardTripped``. The call is settled
exactly once: at exhaustion, error, ``close()``, ``__exit__``/``__aexit__``, a cut, or when
an abandoned stream is garbage-collected.
"""

from __future__ import annotations

import weakref
from typing import Any

import wrapt

from ._call import Call, Endpoint, admit_shared, begin, failed, settle_quietly, watch_tool_calls
from ._counters import COST, OUTPUT, TOTAL, stream_cut
from ._errors import RunGuardTripped
from ._runtime import RUNTIME, internal_error, log_once
from .tokens import counter_for

_STREAM_COUNTERS = (OUTPUT, TOTAL, COST)


class StreamMeter:
    """State of one stream's accounting (kept apart from the proxy so a finalizer can settle it).
    ``pending`` holds the request of a lazy stream until its first chunk is asked for."""

    __slots__ = (
        "broken",
        "call",
        "checks",
        "chunks",
        "count",
        "done",
        "fresh",
        "output",
        "pending",
        "tool_calls",
        "usage",
    )

    def __init__(self, call: Call | None, pending: tuple | None = None) -> None:
        self.call = call
        self.pending = pending
        self.output = 0
        self.usage: tuple | None = None
        self.fresh = False  # no text arrived after the reply's usage (else that usage is provisional)
        self.done = False
        self.broken = False
        self.chunks = 0
        self.count: Any = None
        self.checks: list = []
        self.tool_calls: dict | None = None
        if call is not None:
            self._watch(call)

    def _watch(self, call: Call) -> None:
        self.count = counter_for(call.model)
        self.tool_calls = {} if call.loop_repeats != float("inf") else None  # for loop detection
        self.checks = [
            (scope, index, threshold)
            for scope, scope_checks in call.charges
            for index, threshold in scope_checks
            if index in _STREAM_COUNTERS
        ]

    def start(self, defer: bool = False) -> None:
        """A lazy stream's first chunk is asked for: admit its call (a refusal raises here, and
        nothing is sent). If runguard fails, the stream goes on unmetered. ``defer`` (an async
        stream): the shared store's reserve is left for :meth:`astart` to await."""
        endpoint, instance, args, kwargs = self.pending  # type: ignore[misc]
        self.pending = None
        try:
            call = begin(endpoint, instance, args, kwargs, defer)
        except BaseException:
            self.done = True
            raise
        if call is None:
            self.done = True
            return
        self.call = call
        try:
            self._watch(call)
        except Exception as error:
            self.broken = True
            internal_error("stream accounting", error)

    async def astart(self) -> None:
        """:meth:`start` for an async stream: the shared store's reserve awaited off the loop."""
        self.start(True)
        call = self.call
        if call is not None and call.deferred is not None:
            try:
                admitted = await admit_shared(call)
            except BaseException:
                self.done = True
                raise
            if not admitted:  # runguard failed: the stream goes on unmetered
                self.call = None
                self.done = True

    def account(self, chunk: Any) -> tuple | None:
        """Count one chunk; ``(scope, trip, what a callable on_trip raised or None)`` when the stream
        must be cut."""
        self.chunks += 1
        if self.broken or self.done:
            return None
        try:
            endpoint = self.call.endpoint  # type: ignore[union-attr]
            if self.tool_calls is not None:
                endpoint.chunk_tool_calls(chunk, self.tool_calls)
            usage = endpoint.chunk_usage(chunk, self.usage)
            text = endpoint.chunk_text(chunk)
            if usage is not self.usage:
                self.usage, self.fresh = usage, True
            elif text:
                self.fresh = False
            if text:
                self.output += max(1, self.count(text))
                if self.checks:
                    return self._breach()
        except Exception as error:
            self.broken = True
            internal_error("stream accounting", error)
        return None

    def _breach(self) -> tuple | None:
        call = self.call
        assert call is not None
        now = call.amounts(call.prompt, self.output)
        forecast = call.forecast
        for scope, index, threshold in self.checks:
            # what the scope's counter would be if this stream settled now (no lock: a read)
            would_be = scope.used[index] + scope.reserved[index] - forecast[index] + now[index]
            if would_be > threshold:
                policy = call.on_trip
                if policy == "raise":
                    return scope, stream_cut(scope.name, index, threshold, would_be, scope.used), None
                if callable(policy):  # the callable decides: raising cuts the stream, returning lets it go on
                    try:
                        policy(
                            RunGuardTripped.from_trip(
                                stream_cut(scope.name, index, threshold, would_be, scope.used, False), shadow=True
                            )
                        )
                    except BaseException as raised:
                        return scope, stream_cut(scope.name, index, threshold, would_be, scope.used), raised
                trip = stream_cut(scope.name, index, threshold, would_be, scope.used, False)
                error = RunGuardTripped.from_trip(trip, shadow=True)
                RUNTIME.events.refused(error, trip, True, call.endpoint.name)
                log_once(
                    ("warn-stream", scope.name, trip.limit),
                    "runguard (shadow mode): would cut a stream of %s: %s; it went on",
                    call.endpoint.name,
                    trip.reason,
                )
                self.checks = []
                return None
        return None

    def finish(self) -> None:
        """Settle what arrived, exactly once: the reply's own usage when it gave one. Output that
        arrived after the last usage the reply gave (a stream cut, closed or broken before its
        final usage; Anthropic's ``message_start`` says 1 output token) counts, if it is more."""
        if self.done:
            return
        self.done = True
        call = self.call
        if call is None:
            return
        usage = self.usage
        if usage is None:
            usage = (call.prompt, self.output, 0)
        elif not self.fresh and self.output > usage[1]:
            usage = (usage[0], self.output, *usage[2:])
        settle_quietly(call, usage)
        if self.tool_calls:
            try:
                watch_tool_calls(call, call.endpoint.stream_tool_calls(list(self.tool_calls.values())))
            except Exception as error:
                internal_error("loop detection", error)

    def fail(self) -> RunGuardTripped | None:
        """The stream raised. Before any chunk arrived it failed like a call (its attempts are
        charged, its hold dropped); after, what arrived is settled."""
        if self.done or self.call is None:
            return None
        if self.chunks:
            self.finish()
            return None
        self.done = True
        return failed(self.call)


def _cut(meter: StreamMeter, found: tuple) -> RunGuardTripped:
    """Settle what arrived, open the circuit, record: the caller then raises the trip (or what a
    callable ``on_trip`` raised)."""
    scope, trip, _ = found
    call = meter.call
    assert call is not None
    opened = RUNTIME.store.trip(scope, trip)
    meter.finish()
    error = RunGuardTripped.from_trip(opened)
    try:
        RUNTIME.events.refused(error, opened, opened is trip, call.endpoint.name)
    except Exception as failure:
        internal_error("recording a cut", failure)
    return error


class SyncStreamProxy(wrapt.ObjectProxy):  # type: ignore[misc]
    def __init__(self, stream: Any, meter: StreamMeter) -> None:
        super().__init__(stream)
        self._self_meter = meter
        weakref.finalize(self, meter.finish)

    def __iter__(self) -> SyncStreamProxy:
        return self

    def __next__(self) -> Any:
        meter = self._self_meter
        if meter.pending is not None:
            meter.start()
        call = meter.call
        if call is None or meter.done:
            return self.__wrapped__.__next__()
        mark = RUNTIME.in_sync_call
        outer, mark.call = mark.call, call  # the request goes out in here: it is this call's
        try:
            chunk = self.__wrapped__.__next__()
        except StopIteration:
            meter.finish()
            raise
        except BaseException:
            stopped = meter.fail()
            if stopped is not None:
                raise stopped from None
            raise
        finally:
            mark.call = outer
        found = meter.account(chunk)
        if found is not None:
            error = _cut(meter, found)
            try:
                self.__wrapped__.close()
            except Exception as failure:
                internal_error("closing a stream", failure)
            raise error if found[2] is None else found[2]
        return chunk

    def __enter__(self) -> SyncStreamProxy:
        self.__wrapped__.__enter__()
        return self

    def __exit__(self, *exc: object) -> Any:
        try:
            return self.__wrapped__.__exit__(*exc)
        finally:
            self._self_meter.finish()

    def close(self) -> Any:
        try:
            return self.__wrapped__.close()
        finally:
            self._self_meter.finish()


class AsyncStreamProxy(wrapt.ObjectProxy):  # type: ignore[misc]
    def __init__(self, stream: Any, meter: StreamMeter) -> None:
        super().__init__(stream)
        self._self_meter = meter
        weakref.finalize(self, meter.finish)

    def __aiter__(self) -> AsyncStreamProxy:
        return self

    async def __anext__(self) -> Any:
        meter = self._self_meter
        if meter.pending is not None:
            await meter.astart()
        call = meter.call
        if call is None or meter.done:
            return await self.__wrapped__.__anext__()
        token = RUNTIME.in_call.set(call)
        try:
            chunk = await self.__wrapped__.__anext__()
        except StopAsyncIteration:
            meter.finish()
            raise
        except BaseException:
            stopped = meter.fail()
            if stopped is not None:
                raise stopped from None
            raise
        finally:
            RUNTIME.in_call.reset(token)
        found = meter.account(chunk)
        if found is not None:
            error = _cut(meter, found)
            try:
                await _aclose(self.__wrapped__)
            except Exception as failure:
                internal_error("closing a stream", failure)
            raise error if found[2] is None else found[2]
        return chunk

    async def __aenter__(self) -> AsyncStreamProxy:
        await self.__wrapped__.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> Any:
        try:
            return await self.__wrapped__.__aexit__(*exc)
        finally:
            self._self_meter.finish()

    async def aclose(self) -> Any:
        try:
            return await _aclose(self.__wrapped__)
        finally:
            self._self_meter.finish()

    async def close(self) -> Any:
        return await self.aclose()


async def _aclose(stream: Any) -> Any:
    """An async generator closes with ``aclose()``, openai's ``AsyncStream`` with ``close()``."""
    closer = getattr(stream, "aclose", None) or stream.close
    return await closer()


def _proxy(stream: Any, meter: StreamMeter, is_async: bool | None = None) -> Any:
    """The proxy for how the stream will be read: ``is_async`` when the call that made it says
    (litellm's stream is both an iterator and an async iterator), else what it supports."""
    if hasattr(stream, "__anext__") and (is_async is not False or not hasattr(stream, "__next__")):
        return AsyncStreamProxy(stream, meter)
    return SyncStreamProxy(stream, meter)


def meter_stream(stream: Any, call: Call, is_async: bool | None = None) -> Any:
    """Meter a stream whose request has been sent (the call is admitted)."""
    return _proxy(stream, StreamMeter(call), is_async)


def lazy_stream(stream: Any, endpoint: Endpoint, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Meter a generator that sends its request when first iterated: admitted then."""
    return _proxy(stream, StreamMeter(None, (endpoint, instance, args, kwargs)))
