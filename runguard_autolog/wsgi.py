"""Per-request budgets for WSGI apps (Flask, Django, any PEP 3333 app).

Why: in a web service the unit of work is the HTTP request, not the process. A process-wide
ceiling stops every user once one runaway request has spent it; a ceiling per request stops
only that request. So each request runs inside its own ``runguard.session()``::

    from runguard_autolog.wsgi import RunGuardMiddleware

    runguard.autolog()   # the middleware opens sessions; autolog() is what guards the SDK calls
    app.wsgi_app = RunGuardMiddleware(app.wsgi_app, max_calls=20, max_cost_usd=0.50)   # Flask
    application = RunGuardMiddleware(get_wsgi_application(), max_calls=20)              # Django

The middleware does not call ``runguard.autolog()``: without it no SDK call is guarded and the
sessions count nothing.

What it does, request by request:

* The session is named ``"request:<METHOD> <path>"`` (``SCRIPT_NAME + PATH_INFO``; never the
  query string, headers or body, which may carry user data), or by ``name(environ)``. Its
  limits are validated once, when the middleware is built: a bad keyword or value raises
  :class:`~runguard_autolog.RunGuardConfigError` there, not on the first request.
* The session covers the app call *and* the iteration of the response iterable (a streamed
  response's generator runs while the server iterates, after the app has returned) and its
  ``close()``. Everything runs in a copy of the caller's context (``contextvars``), entered for
  the app call, for each chunk and for ``close()``: the session is open exactly while the app's
  code runs and never leaks into the server thread's own context. The session ends after the
  app iterable's ``close()`` (PEP 3333), which the middleware always forwards.
* ``shared_budget=`` (with ``shared_max_*`` limits) makes each request also charge a shared
  budget, the same for every request, or named from the request by a callable, one per
  tenant: ``shared_budget=lambda environ: "tenant:" + environ["HTTP_X_TENANT"]`` (``None``: no shared budget
  for that request). It needs ``runguard.autolog(store="redis://…")``. However many tenants
  appear, the process keeps one connection per thread and one writer thread per store.
* A :class:`~runguard_autolog.RunGuardTripped` that escapes the app (raised directly, or found
  along the ``__cause__`` / ``__context__`` chain of what escapes, or inside an exception group)
  becomes HTTP 429 with the JSON body
  ``{"error": {"type": "runguard_tripped", "limit": ..., "scope": ..., "reason": ...}}`` and a
  ``Retry-After`` header (whole seconds, rounded up) when the trip carries
  ``details["retry_after"]`` (windowed scopes). Any other exception passes through untouched.
* Once the app has produced a body chunk (or used the legacy ``write()`` callable) the headers
  may be on the wire and no 429 can be sent: a trip then propagates, the server logs it and
  closes the connection (the client sees a truncated response). A streamed response that
  trips before its first chunk still becomes a 429 (``start_response`` is called again with
  ``exc_info``, as PEP 3333 allows).

Flask and Django turn exceptions raised in a *view* into their own 500 response before they
leave the app, so nothing escapes for the middleware to see: set Flask's
``PROPAGATE_EXCEPTIONS = True`` (Django: ``DEBUG_PROPAGATE_EXCEPTIONS = True``) to let the trip
escape, or handle ``RunGuardTripped`` in the framework's own error handler. Trips raised while a
streamed body is iterated always escape (the framework is no longer on the stack).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any

from . import RunGuardTripped, session
from ._errors import tripped_in
from ._web import RequestLimits, rejection

__all__ = ["RunGuardMiddleware"]

Environ = dict[str, Any]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

_STATUS_LINE = "429 Too Many Requests"


# -- the WSGI middleware ------------------------------------------------------------------------------
def request_name(environ: Environ) -> str:
    """``"request:<METHOD> <path>"``; the path without the query string (WSGI hands it over as
    latin-1 code points; UTF-8 paths are shown decoded)."""
    path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    try:
        path = path.encode("latin-1").decode("utf-8")
    except UnicodeError:
        pass
    return f"request:{environ.get('REQUEST_METHOD', '')} {path}"


class _Exchange:
    """One request's ``start_response``, watched: has the app set a status, and may the headers
    be on the wire yet (a chunk was handed to the server, or ``write()`` was used)?"""

    __slots__ = ("_start_response", "_write", "sent", "started")

    def __init__(self, start_response: StartResponse) -> None:
        self._start_response = start_response
        self._write: Callable[[bytes], object] | None = None
        self.started = False
        self.sent = False

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None) -> Any:
        if exc_info is None:
            self._write = self._start_response(status, headers)
        else:
            self._write = self._start_response(status, headers, exc_info)
        self.started = True
        return self.write

    def write(self, data: bytes) -> object:
        self.sent = True  # some servers send the headers on the first write, even an empty one
        assert self._write is not None  # write() is only handed out by start_response()
        return self._write(data)

    def reject(self, trip: RunGuardTripped, error: BaseException) -> bytes:
        """Start the 429 in place of whatever the app started (PEP 3333: with ``exc_info`` headers
        not yet sent are replaced, and a server that did send them re-raises ``error``); returns
        the 429's body."""
        _, headers, body = rejection(trip)
        if self.started:
            self._start_response(_STATUS_LINE, headers, (type(error), error, error.__traceback__))
        else:
            self._start_response(_STATUS_LINE, headers)
        return body


class _Body:
    """The app's response iterable, iterated and closed inside the request's context (so inside
    its session). The session ends once, after the app iterable's ``close()``."""

    __slots__ = ("_context", "_exchange", "_guard", "_iterable", "_iterator", "_open")

    def __init__(
        self, iterable: Iterable[bytes], context: contextvars.Context, guard: session, exchange: _Exchange
    ) -> None:
        self._iterable = iterable
        self._iterator: Iterator[bytes] | None = None
        self._context = context
        self._guard = guard
        self._exchange = exchange
        self._open = True

    def __iter__(self) -> _Body:
        return self

    def __next__(self) -> bytes:
        run = self._context.run
        try:
            if self._iterator is None:
                self._iterator = run(iter, self._iterable)
            chunk = run(next, self._iterator)
        except StopIteration:
            raise
        except Exception as error:
            trip = tripped_in(error)
            if trip is None or self._exchange.sent:
                raise  # headers may be out: the server must cut the connection
            self._iterator = iter(())
            body = self._exchange.reject(trip, error)
            self._exchange.sent = True
            return body
        self._exchange.sent = True
        return chunk

    def close(self) -> None:
        try:
            close = getattr(self._iterable, "close", None)
            if close is not None:
                self._context.run(close)
        finally:
            if self._open:
                self._open = False
                self._context.run(self._guard.__exit__, None, None, None)


class RunGuardMiddleware:
    """Run each request of a WSGI app in its own ``runguard.session(name, **limits)``; a trip
    that escapes becomes HTTP 429. See the module docstring."""

    __slots__ = ("_limits", "_name", "app")

    def __init__(self, app: WSGIApp, *, name: Callable[[Environ], str] | None = None, **limits: Any) -> None:
        self.app = app
        self._limits = RequestLimits(limits, name)
        self._name: Callable[[Environ], str] = name if name is not None else request_name

    def _call(self, guard: session, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        """Run in the request's context: enter the session, call the app (leave it if the app raises)."""
        guard.__enter__()
        try:
            return self.app(environ, start_response)
        except BaseException as error:
            guard.__exit__(type(error), error, error.__traceback__)
            raise

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        guard = session(self._name(environ), **self._limits(environ))
        exchange = _Exchange(start_response)
        context = contextvars.copy_context()
        try:
            result = context.run(self._call, guard, environ, exchange.start_response)
        except Exception as error:
            trip = tripped_in(error)
            if trip is None or exchange.sent:
                raise
            return [exchange.reject(trip, error)]
        kind = type(result)
        wrapper = environ.get("wsgi.file_wrapper")
        if kind is list or kind is tuple or (isinstance(wrapper, type) and kind is wrapper):
            # Materialized (or a file the server streams itself): no app code runs from here on.
            context.run(guard.__exit__, None, None, None)
            return result
        return _Body(result, context, guard, exchange)
