"""Per-request budgets for ASGI apps (Starlette, FastAPI, any ASGI 3 app).

Why: in a web service the unit of work is the HTTP request, not the process. A process-wide
ceiling stops every user once one runaway request has spent it; a ceiling per request stops
only that request. So each HTTP request runs inside its own ``runguard.session()``::

    from runguard_autolog.asgi import RunGuardMiddleware

    runguard.autolog()   # the middleware opens sessions; autolog() is what guards the SDK calls
    app = RunGuardMiddleware(app, max_calls=20, max_cost_usd=0.50)   # the whole app, or:
    app.add_middleware(RunGuardMiddleware, max_calls=20)              # Starlette / FastAPI

The middleware does not call ``runguard.autolog()``: without it no SDK call is guarded and the
sessions count nothing.

What it does, request by request:

* Only ``"http"`` scopes get a session; ``lifespan`` and ``websocket`` pass straight through.
* The session is named ``"request:<METHOD> <path>"`` (never the query string, headers or body,
  which may carry user data), or by ``name(scope)``. Its limits are validated once, when the
  middleware is built: a bad keyword or value raises
  :class:`~runguard_autolog.RunGuardConfigError` there, not on the first request.
* The session is open for the whole ``await app(scope, receive, send)``: streaming bodies and
  background tasks run inside it, and tasks the app starts inherit it (contextvars).
* ``shared_budget=`` (with ``shared_max_*`` limits) makes each request also charge a shared
  budget, the same for every request, or named from the request by a callable, one per
  tenant: ``shared_budget=lambda scope: "tenant:" + dict(scope["headers"])[b"x-tenant"].decode()`` (``None``: no shared budget
  for that request). It needs ``runguard.autolog(store="redis://…")``. However many tenants
  appear, the process keeps one connection per thread and one writer thread per store.
* A :class:`~runguard_autolog.RunGuardTripped` that escapes the app (raised directly, or found
  along the ``__cause__`` / ``__context__`` chain of what escapes, or inside an exception group)
  becomes HTTP 429 with the JSON body
  ``{"error": {"type": "runguard_tripped", "limit": ..., "scope": ..., "reason": ...}}`` and a
  ``Retry-After`` header (whole seconds, rounded up) when the trip carries
  ``details["retry_after"]`` (windowed scopes). Any other exception passes through untouched,
  and the server answers 500 as usual.
* Starlette (so FastAPI) answers an unhandled exception with its own 500 *and then* re-raises
  it. So that wrapping a whole Starlette app still yields the 429, a response that starts with
  status 500 is held back (up to 64 KiB of body) until the app returns: a trip then replaces it;
  otherwise it is sent unchanged.
* Once ``http.response.start`` has gone to the server (a streaming response that trips
  mid-body, say), no 429 can be sent: the trip propagates, the server logs it and closes the
  connection (the client sees a truncated response).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from . import RunGuardTripped, session
from ._errors import tripped_in
from ._web import RequestLimits, rejection

__all__ = ["RunGuardMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_HOLD_LIMIT = 64 * 1024  # body bytes of a held-back 500 before it is sent anyway


def request_name(scope: Scope) -> str:
    """``"request:<METHOD> <path>"``; the path without the query string."""
    return f"request:{scope.get('method', '')} {scope.get('path', '')}"


class _Response:
    """One request's ``send``, watched: has ``http.response.start`` reached the server? A
    response starting with status 500 is held back (see the module docstring)."""

    __slots__ = ("_held", "_held_bytes", "_send", "started")

    def __init__(self, send: Send) -> None:
        self._send = send
        self._held: list[Message] | None = None
        self._held_bytes = 0
        self.started = False

    async def send(self, message: Message) -> None:
        if self._held is not None:
            self._held.append(message)
            self._held_bytes += len(message.get("body", b""))
            if self._held_bytes > _HOLD_LIMIT:
                await self.release()
            return
        if not self.started and message["type"] == "http.response.start":
            if message.get("status") == 500:
                self._held = [message]
                return
            self.started = True
        await self._send(message)

    async def release(self) -> None:
        """Send what was held back, as the app sent it."""
        held, self._held = self._held, None
        if held:
            self.started = True
            for message in held:
                await self._send(message)

    async def reject(self, trip: RunGuardTripped) -> None:
        """Send the 429 in place of anything held back."""
        self._held = None
        self.started = True
        status, headers, body = rejection(trip)
        raw = [(key.lower().encode("latin-1"), value.encode("latin-1")) for key, value in headers]
        await self._send({"type": "http.response.start", "status": status, "headers": raw})
        await self._send({"type": "http.response.body", "body": body, "more_body": False})


class RunGuardMiddleware:
    """Run each HTTP request of an ASGI app in its own ``runguard.session(name, **limits)``; a
    trip that escapes becomes HTTP 429. See the module docstring."""

    __slots__ = ("_limits", "_name", "app")

    def __init__(self, app: ASGIApp, *, name: Callable[[Scope], str] | None = None, **limits: Any) -> None:
        self.app = app
        self._limits = RequestLimits(limits, name)
        self._name: Callable[[Scope], str] = name if name is not None else request_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response = _Response(send)
        try:
            with session(self._name(scope), **self._limits(scope)):
                await self.app(scope, receive, response.send)
        except Exception as error:
            trip = tripped_in(error)
            if trip is None or response.started:
                try:
                    await response.release()  # e.g. Starlette's 500 for an error that is not a trip
                except Exception:
                    pass  # the client is gone; the app's own error is the one to report
                raise
            await response.reject(trip)
            return
        await response.release()
