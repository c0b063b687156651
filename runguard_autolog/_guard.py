"""The guarded-call protocol, written once: every patched LLM entry point goes through it.

NB: BE CAREFUL HERE. This runs on the user's hot path around every billed call.

An integration declares *what* to patch (a ``PATCHES`` table) and *how to read* its SDK
(an :class:`~runguard_autolog._call.Endpoint`: the forecast of a request, the usage and
tool calls of a reply, the text and usage of a stream chunk). It holds no failure policy;
the drivers here (and the stream driver in ``_streams``) own all of it:

- **Before the call** (``_call.begin``): forecast, reserve in every open scope, and apply
  the ``on_trip`` policy to a refusal. A refusal raises ``RunGuardTripped`` (or whatever a
  callable ``on_trip`` raises) and nothing is sent. Any *other* failure here is runguard's
  own: it is logged once and the call is made once, unguarded.
- **The call** sits outside every ``try`` that degrades to "unguarded", so it is made
  exactly once. Its exceptions are the SDK's: they propagate untouched, and the reservation
  is settled for the HTTP attempts that actually left the process (``_call.failed``),
  unless runguard stopped one of them, in which case the caller sees that trip.
- **After the call** (:func:`finish`): settle the usage, feed the loop watch, or wrap a
  stream in its meter. A failure here returns the user's result all the same, charged its
  forecast, logged once. A result the user has paid for never becomes an exception (a
  stream cut mid-flight is the one exception).

The sync and async drivers share these three steps; only the call itself differs (``await``).
No I/O on this path: one lock to reserve and one to settle (the in-memory store); trips and
refusals are handed to ``RUNTIME.events`` (the recorder writes MLflow off this path).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._call import Call, Endpoint, _last_resort, admit_shared, begin, failed, settle, watch_tool_calls
from ._runtime import RUNTIME, internal_error
from ._streams import lazy_stream, meter_stream
from .pricing import learn_reply_model

_INF = float("inf")


def finish(call: Call, result: Any, is_async: bool = False) -> Any:
    """After the SDK returned: wrap a stream in its meter (read as the call was made: sync or
    async), or settle. Returns the result."""
    endpoint = call.endpoint
    try:
        key = endpoint.stream_key
        if key is not None and call.request.get(key) is True:
            streaming = endpoint.streams(call.request, result)
            if streaming:
                return meter_stream(result, call, is_async)
            if streaming is None:  # a stream it cannot meter: charged its forecast
                settle(call, None)
                return result
        usage, tool_calls = endpoint.reply(result, call.loop_repeats != _INF)
        if call.rates is None:  # an unpriced name (a deployment): priced by the model its reply names
            _price_by_reply(call, result)
        if usage is None:
            settle(call, None)
        else:
            for scope, trip in RUNTIME.store.settle(call, call.amounts(*usage)):  # settle(), inlined
                RUNTIME.events.tripped(trip, scope)
        if tool_calls:
            watch_tool_calls(call, tool_calls)
        if endpoint.learns:
            endpoint.learn(call.request, result)
    except Exception as error:
        _last_resort(call)
        internal_error("settle", error)
    return result


def _price_by_reply(call: Call, result: Any) -> None:
    endpoint = call.endpoint
    rates = learn_reply_model(endpoint.provider, call.model, endpoint.reply_model(result))
    if rates is not None:
        call.rates, call.flat = rates, rates.flat


# -- the drivers ---------------------------------------------------------------------------
# NB: the two drivers differ only in how the call is made (``await``) and how it is marked
# in flight (a thread-local for sync calls, a ContextVar for async ones). A nested patched
# call (stacked patches, a LangChain model over the openai SDK) passes straight through, so
# it counts once.
def sync_driver(endpoint: Endpoint) -> Callable[..., Any]:
    mark = RUNTIME.in_sync_call
    in_call = RUNTIME.in_call

    def guard(wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
        # RUNTIME.in_flight(), inlined (hot path): a call of this thread or task still in flight
        if not RUNTIME.enabled or mark.call is not None or ((outer := in_call.get()) is not None and not outer.settled):
            return wrapped(*args, **kwargs)
        call = begin(endpoint, instance, args, kwargs)
        if call is None:
            return wrapped(*args, **kwargs)
        mark.call = call
        try:
            result = wrapped(*args, **kwargs)
        except BaseException:
            mark.call = None
            stopped = failed(call)
            if stopped is not None:
                raise stopped from None
            raise
        mark.call = None
        return finish(call, result)

    guard.runguard_endpoint = endpoint  # type: ignore[attr-defined]
    return guard


def async_driver(endpoint: Endpoint) -> Callable[..., Any]:
    # NB: openai's Async*.create are plain functions returning coroutines, so the wrapper
    # itself must be ``async def``; the check runs when the caller awaits, which is still
    # before any byte is sent.
    in_call = RUNTIME.in_call
    mark = RUNTIME.in_sync_call

    async def guard(wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
        # RUNTIME.in_flight(), inlined (hot path): a call of this thread or task still in flight
        if not RUNTIME.enabled or mark.call is not None or ((outer := in_call.get()) is not None and not outer.settled):
            return await wrapped(*args, **kwargs)
        call = begin(endpoint, instance, args, kwargs, True)
        if call is None:
            return await wrapped(*args, **kwargs)
        if call.deferred is not None and not await admit_shared(call):  # awaited, never waited for
            return await wrapped(*args, **kwargs)  # runguard failed: once, unguarded
        token = in_call.set(call)
        try:
            result = await wrapped(*args, **kwargs)
        except BaseException:
            in_call.reset(token)
            stopped = failed(call)
            if stopped is not None:
                raise stopped from None
            raise
        in_call.reset(token)
        return finish(call, result, True)

    guard.runguard_endpoint = endpoint  # type: ignore[attr-defined]
    return guard


def lazy_stream_driver(endpoint: Endpoint) -> Callable[..., Any]:
    """For an entry point that returns a generator which sends its request only when iterated
    (LangChain's ``stream``/``astream``, Databricks' ``predict_stream``): the call is admitted
    at the first chunk asked for, then metered like any stream (``_streams``)."""

    def guard(wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
        if not RUNTIME.enabled or RUNTIME.in_flight() is not None:
            return wrapped(*args, **kwargs)
        return lazy_stream(wrapped(*args, **kwargs), endpoint, instance, args, kwargs)

    guard.runguard_endpoint = endpoint  # type: ignore[attr-defined]
    return guard


DRIVERS = {"sync": sync_driver, "async": async_driver, "lazy_stream": lazy_stream_driver}
