"""Every HTTP attempt of a guarded call: the retries SDKs make inside one call, 429 runs,
refusals that retrying cannot fix, and the time spent inside LLM requests.

A retry storm against a shared gateway route happens *inside* one SDK call (the openai
client's ``max_retries`` loop, urllib3's ``Retry`` under MLflow's ``http_request``), so
the call guard alone cannot stop it. Each SDK integration therefore also wraps its
transport's per-attempt function (``SyncAPIClient._send_request`` for openai, urllib3's
``HTTPConnectionPool._make_request`` for MLflow's deployments client) with
:func:`sync_attempt` / :func:`async_attempt`, giving a ``Reader`` for its response type.
Outside a guarded call those wrappers pass straight through.

Per attempt of a guarded call:

- before a retry (an attempt after one that failed): charge the seconds spent so far and
  admit the retry as one more request, or refuse it: after a trip no further attempt
  leaves the process;
- after it: its seconds (measured around the attempt only, so span export and the tracking
  server never count), and for a 4xx the verdict: a 429 lengthens the scope's run of
  consecutive 429s and trips at ``max_consecutive_429s``; a 429 that is a budget or quota
  rejection trips at once, because retrying cannot succeed. Either raises
  ``RunGuardTripped`` right there, before the SDK sleeps its backoff. A 401/402/403 (bad
  key, no credit, no permission) also opens the circuit at once, but the SDK's own error
  reaches the caller (no SDK retries those): the next call is refused. Other statuses
  (404 and 400 are about one request; 5xx and 408 are transient) only count.

The first attempt is held by the call's own reservation (one request), so the hot path
adds only the bookkeeping on the ``Call``.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
import time
from collections.abc import Callable
from typing import Any

from ._call import Call, refuse
from ._counters import Trip, in_flight_used
from ._errors import RunGuardTripped
from ._runtime import RUNTIME, internal_error

_perf = time.perf_counter
_INF = float("inf")

# statuses no request from this caller can get past (bad key, no credit, no permission)
NEVER_SUCCEEDS = frozenset((401, 402, 403))
# words of a 429 that is a spending refusal, not a throttle (MLflow gateway budget policies
# answer "Budget limit exceeded ..."; OpenAI answers quota exhaustion with "insufficient_quota")
_REFUSAL_WORDS = ("budget", "quota")


class Reader:
    """How to read one transport's response: status, a header, and (rare path) the body."""

    status_attribute = "status"  # the response attribute holding the HTTP status
    in_tuple = False  # the attempt function returns (response, ...) (anthropic's _attempt_request)

    def response_of(self, error: BaseException) -> Any:
        """The error response an attempt function raised with (litellm's client raises for a
        4xx/5xx itself), judged like a returned one; ``None``: not one."""
        return None

    def status(self, response: Any) -> int:
        return getattr(response, self.status_attribute)

    def header(self, response: Any, name: str) -> str | None:
        raise NotImplementedError

    def text(self, response: Any) -> tuple[Any, str]:
        """(the response to hand back, its body as text); reading must not lose the body."""
        raise NotImplementedError

    def close(self, response: Any) -> None:
        raise NotImplementedError

    async def aclose(self, response: Any) -> None:
        self.close(response)


class HttpxReader(Reader):
    """An httpx response (the openai and anthropic clients, litellm's own)."""

    status_attribute = "status_code"

    def __init__(self, in_tuple: bool = False) -> None:
        self.in_tuple = in_tuple

    def header(self, response: Any, name: str) -> str | None:
        return response.headers.get(name)

    def text(self, response: Any) -> tuple[Any, str]:
        try:
            response.read()  # cached by httpx: the SDK reads the same bytes afterwards
            return response, response.text
        except Exception:  # an async stream's body cannot be read here: judged by status alone
            return response, ""

    def close(self, response: Any) -> None:
        response.close()

    async def aclose(self, response: Any) -> None:
        await response.aclose()


# NB: the two wrappers below run on every HTTP attempt of the openai hot path: the status
# is read with getattr() and the sync call's mark inline (each Python function touched per
# call costs in situ; see _guard). Keep them in step.
def sync_attempt(reader: Reader, current: Callable[[], Call | None] | None = None):
    """A wrapt wrapper for a transport's per-attempt function. ``current`` finds the guarded
    call this attempt belongs to (``None``: not an LLM attempt, pass through); by default,
    the sync call in flight in this thread."""
    status_of = reader.status_attribute
    in_tuple = reader.in_tuple
    mark = RUNTIME.in_sync_call
    in_call = RUNTIME.in_call

    def attempt(wrapped, instance, args, kwargs):
        call = mark.call if current is None else current()
        if call is None:  # a sync SDK call run in a thread for an async guarded call (an executor)
            call = in_call.get()
        if call is None or call.settled:
            return wrapped(*args, **kwargs)
        if call.retry_due:
            before_retry(call)
        call.attempts += 1
        call.retry_due = True  # until this attempt is seen to succeed
        started = _perf()
        try:
            result = wrapped(*args, **kwargs)
        except Exception as error:
            call.seconds += _perf() - started
            judge_raised(call, reader, error)
            raise
        call.seconds += _perf() - started
        try:
            response = result[0] if in_tuple else result
            if getattr(response, status_of) < 400:
                call.retry_due = False
                return result
        except Exception as error:  # not a response we know: degrade, uncounted verdict
            internal_error("reading an attempt's status", error)
            return result
        response, trip = judge(call, reader, response)
        if trip is not None:
            try:
                reader.close(response)
            except Exception as error:
                internal_error("closing a refused response", error)
            stop(call, *trip)
        return (response, *result[1:]) if in_tuple else response

    return attempt


def async_attempt(reader: Reader):
    """:func:`sync_attempt` for a coroutine function: the call in flight in this task."""
    status_of = reader.status_attribute
    in_tuple = reader.in_tuple
    in_call = RUNTIME.in_call

    async def attempt(wrapped, instance, args, kwargs):
        call = in_call.get()
        if call is None or call.settled:
            return await wrapped(*args, **kwargs)
        if call.retry_due:
            if RUNTIME.store.remote:  # a shared store: its round trip is awaited off the loop
                await abefore_retry(call)
            else:
                before_retry(call)
        call.attempts += 1
        call.retry_due = True
        started = _perf()
        try:
            result = await wrapped(*args, **kwargs)
        except Exception as error:
            call.seconds += _perf() - started
            judge_raised(call, reader, error)
            raise
        call.seconds += _perf() - started
        try:
            response = result[0] if in_tuple else result
            if getattr(response, status_of) < 400:
                call.retry_due = False
                return result
        except Exception as error:  # not a response we know: degrade, uncounted verdict
            internal_error("reading an attempt's status", error)
            return result
        response, trip = judge(call, reader, response)
        if trip is not None:
            try:
                await reader.aclose(response)
            except Exception as error:
                internal_error("closing a refused response", error)
            stop(call, *trip)
        return (response, *result[1:]) if in_tuple else response

    return attempt


def before_retry(call: Call) -> None:
    """Admit one more attempt of ``call`` (raises ``RunGuardTripped`` when refused). In shadow
    mode a refused attempt still goes, and is counted like any other."""
    try:
        refusal = RUNTIME.store.retry(call, call.seconds, call.on_trip == "raise")
        call.seconds = 0.0  # charged
    except Exception as error:
        internal_error("admitting a retry", error)
        return
    if refusal is not None:
        stop(call, refusal.scope, refusal.trip, refusal.new, refusal.sticky)


async def abefore_retry(call: Call) -> None:
    """:func:`before_retry` for an async call on a shared store (``SharedStore.aretry``)."""
    try:
        refusal = await RUNTIME.store.aretry(call, call.seconds, call.on_trip == "raise")
        call.seconds = 0.0
    except Exception as error:
        internal_error("admitting a retry", error)
        return
    if refusal is not None:
        stop(call, refusal.scope, refusal.trip, refusal.new, refusal.sticky)


def judge_raised(call: Call, reader: Reader, error: BaseException) -> None:
    """An attempt raised with its error response: judged as if returned (a trip raises here)."""
    try:
        response = reader.response_of(error)
    except Exception as failure:
        internal_error("reading a failed attempt", failure)
        return
    if response is None:
        return
    _, trip = judge(call, reader, response)
    if trip is not None:
        stop(call, *trip)


def judge(call: Call, reader: Reader, response: Any) -> tuple[Any, tuple | None]:
    """A 4xx/5xx attempt: (the response to hand back, ``(scope, trip, newly)`` when it must
    stop here)."""
    try:
        status = reader.status(response)
        if status == 429 or status == 529:  # 529: Anthropic's "overloaded", a throttle too
            response, text = reader.text(response)
            retry_after = parse_retry_after(reader.header(response, "retry-after"))
            if any(word in text.lower() for word in _REFUSAL_WORDS):
                trip = _refused(call, status, text, retry_after, "max_consecutive_429s")
            else:
                trip = _throttled(call, retry_after)
        elif status in NEVER_SUCCEEDS:  # open the circuit; the SDK's own error goes to the caller
            response, text = reader.text(response)
            scope, trip, newly = _refused(call, status, text, None, "request_refused")
            if newly:
                RUNTIME.events.tripped(trip, scope)
            return response, None
        else:  # 404, 400, 422, 5xx, 408, 409 ...: counted as a request; the SDK decides on retrying
            return response, None
    except Exception as error:
        internal_error("reading a failed attempt", error)
        return response, None
    return response, trip


def _throttled(call: Call, retry_after: float | None):
    # the innermost scope enforces autolog's limits (as overridden by its own); outer scopes
    # only their own (rare path: looked up here rather than carried by every call)
    innermost = len(call.charges) - 1
    limits = [
        scope.effective()[0]["max_consecutive_429s"]
        if position == innermost
        else scope.own.get("max_consecutive_429s", _INF)
        for position, (scope, _) in enumerate(call.charges)
    ]
    trips = RUNTIME.store.throttled(call, limits, retry_after)
    for scope, trip in trips[1:]:
        RUNTIME.events.tripped(trip, scope)
    if trips:
        scope, trip = trips[0]
        return scope, trip, True
    # a scope tripped earlier (by another call in flight) also stops this call's retries
    for scope, _ in call.charges:
        if scope.tripped is not None:
            return scope, scope.tripped, False
    return None


def _refused(call: Call, status: int, text: str, retry_after: float | None, limit: str):
    """A refusal retrying cannot fix trips the innermost scope at once."""
    scope = call.charges[-1][0]
    what = "a budget/quota refusal" if status == 429 else "a refusal"
    detail = error_kind(text)
    note = "" if retry_after is None else f"; Retry-After: {retry_after:g} s"
    trip = Trip(
        scope.name,
        limit,
        None,
        status,
        f"{call.endpoint.name} answered HTTP {status}, {what} that retrying cannot fix{detail}{note}",
        in_flight_used(scope.used),
        scope.throttled,
    )
    opened = RUNTIME.store.trip(scope, trip)
    return scope, opened, opened is trip


_IDENTIFIER = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def error_kind(text: str) -> str:
    """A provider error described by its type and code only (``" (type=..., code=...)"``), never
    its message: that may quote a key or the prompt."""
    try:
        body = json.loads(text)
    except ValueError:
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, str):
        error = {"type": error}
    if not isinstance(error, dict):
        return ""
    parts = [
        f"{name}={error[name]}"
        for name in ("type", "code")
        if isinstance(error.get(name), str) and _IDENTIFIER.fullmatch(error[name])
    ]
    return f" ({', '.join(parts)})" if parts else ""


def stop(call: Call, scope: Any, trip: Trip, newly: bool, sticky: bool = True) -> None:
    """Record the trip; then raise it (remembered on the call, for SDKs that wrap it) or, in
    shadow mode, let the attempt go ahead."""
    try:
        refuse(call, trip, newly=newly, target=call.endpoint.name, sticky=sticky)
    except RunGuardTripped as error:
        error.details["attempts"] = call.attempts  # sent before the trip: the message says so
        error.args = (error._message(),)
        call.stopped = error if call.stopped is None else call.stopped
        raise


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (seconds or an HTTP-date); ``None`` if malformed."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when is None or when.tzinfo is None:
            return None
        seconds = when.timestamp() - time.time()
    if math.isnan(seconds) or seconds in (_INF, -_INF):
        return None
    return max(0.0, seconds)
