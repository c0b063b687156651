"""The one guarded-call driver every LLM patch goes through.

NB: BE CAREFUL HERE. This runs on the user's hot path around every billed call.
Rules it keeps:
- The only exception it originates is ``RunGuardTripped``. Any other failure inside
  runguard degrades to the unguarded call, which is called exactly once, and is
  logged once (strict mode, for tests, re-raises instead).
- Exceptions of the SDK call itself propagate unchanged.
- A call whose result the user has paid for is never turned into an exception
  (a stream cut mid-flight is the one exception).
- No I/O; one lock, taken once to reserve and once to settle; MLflow writes are handed to
  a background worker.
"""

from __future__ import annotations

import contextvars
import threading
from typing import Any

from . import _recording
from ._errors import RunGuardTripped
from ._runtime import RUNTIME, internal_error, log_once
from ._scopes import current_charges
from ._loops import observe_request, observe_tool_calls
from ._store import Reservation, Trip
from .pricing import rates_for

# The call in flight in this context: a nested patched call (stacked patches, a
# LangChain model over the openai SDK) passes straight through, so it counts once. A mark
# whose call has settled is stale (LangChain ends a call in a copy of the context it
# started in, so the mark cannot always be reset there): it no longer counts.
# Async calls are marked in a ContextVar (tasks interleave on one thread); sync calls in a
# thread-local, which is cheaper and exact because a sync call never yields its thread.
IN_CALL: contextvars.ContextVar["Call | None"] = contextvars.ContextVar("runguard_in_call", default=None)


class _ThreadMark(threading.local):
    call: "Call | None" = None


IN_SYNC_CALL = _ThreadMark()


def in_flight() -> "Call | None":
    """The guarded call running in this thread/task, if any."""
    call = IN_SYNC_CALL.call or IN_CALL.get()
    return call if call is not None and not call.settled else None


_INF = float("inf")
_UNPRICED = (0.0, 0.0, 0.0)  # a model genai-prices does not know costs 0 (documented)
_MISSING = object()


class Call(Reservation):
    """One admitted call: what it reserved, and how to price and settle it. Built by
    :func:`admit` (no ``__init__``: one Python frame less per billed call)."""

    __slots__ = (
        "endpoint", "model", "rates", "flat", "prompt", "cap", "on_trip", "loop_repeats",
        # its HTTP attempts (see _attempts): how many left the process, whether the next one is
        # a retry, seconds spent in them not yet charged, the trip that stopped a retry
        "attempts", "retry_due", "seconds", "stopped",
    )

    def amounts(self, input_tokens: float, output_tokens: float, cached: float = 0) -> tuple:
        """The counters (see ``_store.COUNTERS``) this usage adds, priced."""
        flat = self.flat
        if flat is not None:
            cost = (input_tokens - cached) * flat[0] + output_tokens * flat[1] + cached * flat[2]
        else:
            cost = self.rates.cost(input_tokens, output_tokens, cached)
        return (1, 1, input_tokens, output_tokens, input_tokens + output_tokens, cost, self.seconds)


def trip_exception(trip) -> RunGuardTripped:
    return RunGuardTripped(
        trip.reason, limit=trip.limit, threshold=trip.threshold, observed=trip.observed, scope=trip.scope
    )


# NB: admit() and _finish() run around every billed call. Between two SDK calls the CPU
# caches are cold, so what costs here is mostly how many distinct functions and objects a
# call touches (each Python function is a few cache misses, ~0.5 us in situ), far more than
# how many lines run: helpers are inlined on purpose (see benchmarks/README.md).
def admit(endpoint, kwargs: dict) -> Call:
    """Reserve this call in every open scope, or raise ``RunGuardTripped`` before it is sent."""
    charges, limits = current_charges()
    model, prompt, cap = endpoint.forecast(kwargs)
    rates = endpoint.prices.get(model, _MISSING)
    if rates is _MISSING:
        rates = rates_for(model, endpoint.provider)
    flat = _UNPRICED if rates is None else rates.flat  # None: tiered prices
    call = Call()
    call.charges = charges
    call.settled = False
    call.endpoint = endpoint
    call.model = model
    call.rates = rates
    call.flat = flat
    call.prompt = prompt
    call.cap = cap
    call.on_trip = on_trip = limits["on_trip"]
    call.loop_repeats = limits["loop_repeats"]
    call.attempts = 0
    call.retry_due = False
    call.seconds = 0.0
    call.stopped = None
    cost = prompt * flat[0] + cap * flat[1] if flat is not None else rates.cost(prompt, cap)
    call.forecast = (1, 1, prompt, cap, prompt + cap, cost, 0)
    # signals that are not counters open the innermost scope's circuit first; reserve() then
    # refuses the call like any other in a tripped scope
    window = None if rates is None else rates.context_window
    if window:
        if prompt > limits["max_context_fraction"] * window:
            open_circuit(charges[-1][0], _context_trip(charges[-1][0], model, prompt, window, limits))
    else:
        log_once(("no-window", model), "runguard: no context window known for model %r; context "
                 "overflow is not checked for it. Logged once.", model)
    if limits["loop_identical_requests"] != _INF:
        payload = endpoint.request_payload(kwargs)
        if payload is not None:
            trip = observe_request(charges[-1][0], model, payload, limits["loop_identical_requests"])
            if trip is not None:
                open_circuit(charges[-1][0], trip)
    refusal = RUNTIME.store.reserve(call, on_trip == "raise")
    if refusal is not None:
        refuse(call, refusal.trip, newly=refusal.new, target=endpoint.name)
    return call


def _context_trip(scope, model: str, prompt: int, window: int, limits: dict) -> Trip:
    fraction = limits["max_context_fraction"]
    return Trip(
        scope.name, "max_context_fraction", fraction, prompt,
        f"context overflow: the prompt is forecast at {prompt} tokens, over {fraction:g} of "
        f"{model}'s {window}-token context window ({int(fraction * window)} tokens)",
        tuple(scope.used),
    )


def open_circuit(scope, trip: Trip) -> None:
    """Open a scope's circuit for a signal that is not a counter; record it if it is new."""
    if RUNTIME.store.trip(scope, trip) is trip:
        _recording.tripped(trip, scope)


def refuse(call: Call, trip, newly: bool, target: str) -> None:
    """Record a refusal, then apply the on_trip policy: raise, warn, or ask the callable."""
    error = trip_exception(trip)
    _recording.refused(error, trip, newly=newly, target=target)
    policy = call.on_trip
    if policy == "raise":
        raise error
    if policy == "warn":
        log_once(("warn", trip.scope, trip.limit), "runguard (shadow mode): would refuse %s: %s", target, error)
        return
    try:
        policy(error)
    except BaseException:
        RUNTIME.store.release(call)
        raise


def settle(call: Call, usage: tuple | None) -> None:
    """Charge the actual usage (or, lacking it, the forecast) and trip scopes that reached a limit."""
    if usage is None:
        log_once(
            ("no-usage", call.endpoint.name),
            "runguard: %s returned no usage; the call is charged its forecast instead",
            call.endpoint.name,
        )
        usage = (call.prompt, call.cap, 0)
    for scope, trip in RUNTIME.store.settle(call, call.amounts(*usage)):
        _recording.tripped(trip, scope)


def settle_quietly(call: Call, usage: tuple | None = None) -> None:
    try:
        settle(call, usage)
    except Exception as error:
        try:
            RUNTIME.store.release(call)
        finally:
            internal_error("settle", error)


def release_quietly(call: Call) -> None:
    try:
        RUNTIME.store.release(call)
    except Exception as error:
        internal_error("release", error)


def failed(call: Call) -> "RunGuardTripped | None":
    """The SDK call raised. Charge what its HTTP attempts used (a request and their seconds,
    no tokens), or drop the hold if none left the process. Returns the trip that stopped it
    when runguard did: an SDK that wraps transport errors (MLflow's deployments client) must
    not hide it."""
    try:
        if call.attempts:
            failure = (0, 1, 0, 0, 0, 0, call.seconds)
            for scope, trip in RUNTIME.store.settle(call, failure, ok=False):
                _recording.tripped(trip, scope)
        else:
            RUNTIME.store.release(call)
    except Exception as error:
        internal_error("release", error)
    return call.stopped


def _finish(call: Call, result: Any, kwargs: dict) -> Any:
    """After the SDK returned: wrap a stream, or settle. Never raises (except in strict mode)."""
    try:
        if "stream" in kwargs and kwargs["stream"] is True:
            if _is_stream(result):
                from ._streams import wrap_stream

                return wrap_stream(result, call)
            settle(call, None)  # a raw streaming response we cannot meter: charge the forecast
            return result
        usage = call.endpoint.usage(result)
        if usage is None:
            settle(call, None)
            return result
        for scope, trip in RUNTIME.store.settle(call, call.amounts(*usage)):  # settle(), inlined
            _recording.tripped(trip, scope)
        if call.loop_repeats != _INF:
            tool_calls = call.endpoint.tool_calls(result)
            if tool_calls:
                watch_tool_calls(call, tool_calls)
    except Exception as error:
        try:
            if not call.settled:
                RUNTIME.store.settle(call, call.amounts(call.prompt, call.cap))
        except Exception:
            pass
        internal_error("settle", error)
    return result


def watch_tool_calls(call: Call, tool_calls: list) -> None:
    """Feed the tool calls a reply asks for, ``(name, arguments)``, to the innermost scope's loop watch."""
    if tool_calls:
        scope = call.charges[-1][0]
        trip = observe_tool_calls(scope, tool_calls, call.loop_repeats)
        if trip is not None:
            open_circuit(scope, trip)


def _is_stream(result: Any) -> bool:
    return hasattr(result, "__next__") or hasattr(result, "__anext__")


# NB: the two drivers below are deliberately parallel and inline (hot path): the only
# difference is ``await``. Keep them in step.
def make_sync_guard(endpoint):
    def guard(wrapped, instance, args, kwargs):
        mark = IN_SYNC_CALL
        if not RUNTIME.enabled or mark.call is not None or ((outer := IN_CALL.get()) is not None and not outer.settled):
            return wrapped(*args, **kwargs)
        try:
            call = admit(endpoint, kwargs)
        except RunGuardTripped:
            raise
        except Exception as error:
            internal_error("preflight", error)
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
        return _finish(call, result, kwargs)

    guard.runguard_endpoint = endpoint
    return guard


def make_async_guard(endpoint):
    # NB: openai's Async*.create are plain functions returning coroutines, so the
    # wrapper itself must be ``async def``; the check runs when the caller awaits,
    # which is still before any byte is sent.
    async def guard(wrapped, instance, args, kwargs):
        if not RUNTIME.enabled or ((outer := IN_CALL.get()) is not None and not outer.settled) or IN_SYNC_CALL.call is not None:
            return await wrapped(*args, **kwargs)
        try:
            call = admit(endpoint, kwargs)
        except RunGuardTripped:
            raise
        except Exception as error:
            internal_error("preflight", error)
            return await wrapped(*args, **kwargs)
        token = IN_CALL.set(call)
        try:
            result = await wrapped(*args, **kwargs)
        except BaseException:
            IN_CALL.reset(token)
            stopped = failed(call)
            if stopped is not None:
                raise stopped from None
            raise
        IN_CALL.reset(token)
        return _finish(call, result, kwargs)

    guard.runguard_endpoint = endpoint
    return guard
