"""The ASGI and WSGI middlewares: one runguard session per HTTP request, a trip becomes a 429.

Real servers on 127.0.0.1: Starlette and FastAPI apps under uvicorn, Flask apps under
werkzeug's threaded server, each in a background thread and stopped by its fixture. The apps'
routes call the loopback ``FakeOpenAIServer`` through the openai SDK, so what reaches it is
what runguard let through. A few edge cases (pass-through scopes, PEP 3333 ``close()``) are
driven in-process, where the ASGI messages and WSGI calls can be seen one by one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

import runguard_autolog as runguard
from runguard_autolog import asgi, wsgi
from runguard_autolog.testing import Reply

from .conftest import MESSAGES, MODEL

uvicorn = pytest.importorskip("uvicorn")
starlette = pytest.importorskip("starlette")
flask = pytest.importorskip("flask")
werkzeug_serving = pytest.importorskip("werkzeug.serving")

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

CONTENT_TYPE = "application/json"


def manual_trip(**details: Any) -> runguard.RunGuardTripped:
    return runguard.RunGuardTripped(
        "window full (3/3)", limit="max_calls", threshold=3, observed=3, scope="session:window", details=details
    )


def expected_body(error: runguard.RunGuardTripped) -> dict:
    return {"error": {"type": "runguard_tripped", "limit": error.limit, "scope": error.scope, "reason": error.reason}}


class Gauge:
    """How many requests a route is serving at once, and the most it ever served at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.now = self.most = 0

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            yield
        finally:
            with self._lock:
                self.now -= 1


class Routes:
    """What the apps' routes saw: the trips they let escape, the lifespan events."""

    def __init__(self) -> None:
        self.trips: list[runguard.RunGuardTripped] = []
        self.events: list[str] = []
        self.gauge = Gauge()

    def calls(self, client: openai.OpenAI, n: int) -> dict:
        with self.gauge.inside():
            try:
                for _ in range(n):
                    client.chat.completions.create(model=MODEL, messages=MESSAGES)
            except runguard.RunGuardTripped as error:
                self.trips.append(error)
                raise
        snap = runguard.current()
        return {"scope": snap.scope, "calls": snap.calls}


def raise_trip(how: str) -> None:
    """A trip as a framework may hand it on: itself, as the cause, or as the context."""
    trip = manual_trip(retry_after=12.3)
    if how == "direct":
        raise trip
    if how == "cause":
        raise RuntimeError("wrapped by a framework") from trip
    try:
        raise trip
    except runguard.RunGuardTripped:
        if how == "suppressed":
            raise KeyError("the trip is declared irrelevant") from None
        raise KeyError("raised while handling the trip")  # the implicit __context__ is the point


# -- servers -------------------------------------------------------------------------------------
@contextlib.contextmanager
def serve_asgi(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn (lifespan on) in a thread on a free loopback port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, lifespan="on", log_config=None, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn-test", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive(), "uvicorn exited during startup"
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


@contextlib.contextmanager
def serve_wsgi(app: Any) -> Iterator[str]:
    """Serve ``app`` with werkzeug's threaded server in a thread on a free loopback port."""
    server = werkzeug_serving.make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="werkzeug-test", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
        assert not thread.is_alive(), "werkzeug did not stop"


@pytest.fixture
def serve() -> Iterator[Callable[[str, Any], str]]:
    """``serve("asgi" | "wsgi", app) -> base URL``; every server started is stopped at teardown."""
    with contextlib.ExitStack() as stack:

        def start(kind: str, app: Any) -> str:
            return stack.enter_context(serve_asgi(app) if kind == "asgi" else serve_wsgi(app))

        yield start


@pytest.fixture
def guarded(server):
    """autolog() on (the middleware only opens sessions) with no process ceiling in the way."""
    runguard.autolog(max_calls="none", max_cost_usd="none")
    return server


def get(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(url, timeout=30, **kwargs)


def assert_tripped(response: httpx.Response, error: runguard.RunGuardTripped, retry_after: str | None = None) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == CONTENT_TYPE
    assert json.loads(response.content) == expected_body(error)
    assert response.headers.get("retry-after") == retry_after


# -- apps ----------------------------------------------------------------------------------------
def starlette_app(base_url: str, routes: Routes) -> Starlette:
    client = openai.OpenAI(base_url=base_url, api_key="t", max_retries=0)
    aclient = openai.AsyncOpenAI(base_url=base_url, api_key="t", max_retries=0)

    def llm(request: Request) -> JSONResponse:  # sync: Starlette runs it in its thread pool
        return JSONResponse(routes.calls(client, int(request.query_params.get("n", 5))))

    async def stream(request: Request) -> StreamingResponse:
        n = int(request.query_params.get("n", 2))

        async def body():
            yield b"start\n"
            for _ in range(n):
                await aclient.chat.completions.create(model=MODEL, messages=MESSAGES)
                snap = runguard.current()
                yield f"{snap.scope} {snap.calls}\n".encode()

        return StreamingResponse(body(), media_type="text/plain")

    def sync_stream(request: Request) -> StreamingResponse:
        def body():  # a sync iterator: Starlette iterates it in its thread pool
            for _ in range(int(request.query_params.get("n", 2))):
                client.chat.completions.create(model=MODEL, messages=MESSAGES)
                snap = runguard.current()
                yield f"{snap.scope} {snap.calls}\n".encode()

        return StreamingResponse(body(), media_type="text/plain")

    async def trip(request: Request) -> None:
        raise_trip(request.path_params["how"])

    async def boom(request: Request) -> None:
        raise ValueError("not a trip")

    async def plain(request: Request) -> PlainTextResponse:
        return PlainTextResponse("untouched", headers={"x-app": "yes"})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        routes.events.append("startup")
        yield
        routes.events.append("shutdown")

    return Starlette(
        routes=[
            Route("/llm", llm),
            Route("/stream", stream),
            Route("/sync-stream", sync_stream),
            Route("/trip/{how}", trip),
            Route("/boom", boom),
            Route("/plain", plain),
        ],
        lifespan=lifespan,
    )


def flask_app(base_url: str, routes: Routes, *, propagate: bool = True) -> flask.Flask:
    app = flask.Flask("runguard-test")
    app.config["PROPAGATE_EXCEPTIONS"] = propagate  # else Flask answers a view's trip with its own 500
    client = openai.OpenAI(base_url=base_url, api_key="t", max_retries=0)

    @app.get("/llm")
    def llm():
        return routes.calls(client, int(flask.request.args.get("n", 5)))

    @app.get("/stream")
    def stream():
        n, first = int(flask.request.args.get("n", 2)), flask.request.args.get("first", "before")

        def body():
            if first == "none":  # every call before the first chunk
                for _ in range(n):
                    client.chat.completions.create(model=MODEL, messages=MESSAGES)
            yield b"start\n"
            for _ in range(0 if first == "none" else n):
                client.chat.completions.create(model=MODEL, messages=MESSAGES)
                snap = runguard.current()
                yield f"{snap.scope} {snap.calls}\n".encode()

        return flask.Response(body(), mimetype="text/plain")

    @app.get("/trip/<how>")
    def trip(how: str):
        raise_trip(how)

    @app.get("/boom")
    def boom():
        raise ValueError("not a trip")

    @app.get("/plain")
    def plain():
        return "untouched", 200, {"X-App": "yes"}

    return app


# == ASGI over uvicorn ===========================================================================
def test_asgi_trip_becomes_429_and_each_request_gets_a_fresh_session(guarded, serve):
    routes = Routes()
    base = serve("asgi", asgi.RunGuardMiddleware(starlette_app(guarded.base_url, routes), max_calls=3))

    response = get(f"{base}/llm?n=5")
    (error,) = routes.trips
    assert (error.limit, error.scope) == ("max_calls", "session:request:GET /llm")
    assert_tripped(response, error)
    assert guarded.count("/chat/completions") == 3

    response = get(f"{base}/llm?n=5")  # a new request: a new session, three more calls
    assert_tripped(response, routes.trips[1])
    assert guarded.count("/chat/completions") == 6


def test_asgi_request_under_budget_and_the_session_name_has_no_query_string(guarded, serve):
    routes = Routes()
    base = serve("asgi", asgi.RunGuardMiddleware(starlette_app(guarded.base_url, routes), max_calls=3))
    response = get(f"{base}/llm?n=2&api_token=secret")
    assert response.status_code == 200
    assert response.json() == {"scope": "session:request:GET /llm", "calls": 2}
    assert guarded.count() == 2


def test_asgi_concurrent_requests_each_get_their_own_budget(guarded, serve):
    guarded.default = Reply(delay=0.03)  # keep requests in flight together
    routes = Routes()
    base = serve("asgi", asgi.RunGuardMiddleware(starlette_app(guarded.base_url, routes), max_calls=3))
    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda _: get(f"{base}/llm?n=5"), range(20)))
    assert [r.status_code for r in responses] == [429] * 20
    assert all(r.json()["error"]["scope"] == "session:request:GET /llm" for r in responses)
    assert guarded.count("/chat/completions") == 20 * 3
    assert len(routes.trips) == 20
    assert routes.gauge.most > 1, "the requests did not overlap; the test proves nothing about isolation"


@pytest.mark.parametrize("path", ["/stream", "/sync-stream"])
def test_asgi_streaming_body_counts_in_the_request_session(guarded, serve, path):
    base = serve("asgi", asgi.RunGuardMiddleware(starlette_app(guarded.base_url, Routes()), max_calls=3))
    response = get(f"{base}{path}?n=2")
    assert response.status_code == 200
    lines = [line for line in response.text.splitlines() if line != "start"]
    assert lines == [f"session:request:GET {path} 1", f"session:request:GET {path} 2"]
    assert guarded.count() == 2


def test_asgi_trip_mid_stream_cuts_the_connection(guarded, serve):
    """The 200 and its first chunk are out: no 429 can follow, the server closes the connection."""
    base = serve("asgi", asgi.RunGuardMiddleware(starlette_app(guarded.base_url, Routes()), max_calls=3))
    received = b""
    with pytest.raises(httpx.RemoteProtocolError), httpx.stream("GET", f"{base}/stream?n=5", timeout=30) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            received += chunk
    assert received.startswith(b"start\n")
    assert guarded.count() == 3
    assert get(f"{base}/plain").status_code == 200  # the server carries on


@pytest.mark.parametrize("how", ["direct", "cause", "context"])
def test_asgi_retry_after_and_a_wrapped_trip(guarded, serve, how):
    base = serve("asgi", asgi.RunGuardMiddleware(starlette_app(guarded.base_url, Routes()), max_calls=3))
    assert_tripped(get(f"{base}/trip/{how}"), manual_trip(), retry_after="13")


def test_asgi_other_errors_stay_500_and_other_routes_are_untouched(guarded, serve):
    base = serve("asgi", asgi.RunGuardMiddleware(starlette_app(guarded.base_url, Routes()), max_calls=3))
    response = get(f"{base}/boom")  # Starlette's own 500, held back and then sent as it was
    assert (response.status_code, response.text) == (500, "Internal Server Error")
    response = get(f"{base}/trip/suppressed")  # `raise ... from None`: the trip is not the cause
    assert response.status_code == 500
    response = get(f"{base}/plain")
    assert (response.status_code, response.text, response.headers["x-app"]) == (200, "untouched", "yes")
    assert response.headers["content-type"].startswith("text/plain")
    assert guarded.count() == 0


def test_asgi_errors_of_a_bare_app_reach_the_server(guarded, serve):
    """No framework in between: the server itself answers the app's error with a 500."""

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            message = await receive()
            await send({"type": "lifespan.startup.complete"})
            message = await receive()
            assert message["type"] == "lifespan.shutdown"
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"] == "/trip":
            raise manual_trip(retry_after=0.2)
        raise ValueError("not a trip")

    base = serve("asgi", asgi.RunGuardMiddleware(app, max_calls=3))
    assert get(f"{base}/boom").status_code == 500
    assert_tripped(get(f"{base}/trip"), manual_trip(), retry_after="1")


def test_asgi_lifespan_events_pass_through(guarded):
    routes = Routes()
    with serve_asgi(asgi.RunGuardMiddleware(starlette_app(guarded.base_url, routes), max_calls=3)) as base:
        assert routes.events == ["startup"]
        assert get(f"{base}/plain").status_code == 200
    assert routes.events == ["startup", "shutdown"]


def test_fastapi_whole_app_and_add_middleware(guarded, serve):
    fastapi = pytest.importorskip("fastapi")
    client = openai.OpenAI(base_url=guarded.base_url, api_key="t", max_retries=0)
    routes = Routes()

    def build() -> Any:
        api = fastapi.FastAPI()

        @api.get("/llm")
        def llm(n: int = 5) -> dict:
            return routes.calls(client, n)

        return api

    whole = serve("asgi", asgi.RunGuardMiddleware(build(), max_calls=3))
    added_app = build()
    added_app.add_middleware(asgi.RunGuardMiddleware, max_calls=3)
    added = serve("asgi", added_app)
    for base in (whole, added):
        for _ in range(2):
            response = get(f"{base}/llm")
            assert_tripped(response, routes.trips[-1])
        assert get(f"{base}/llm?n=2").json() == {"scope": "session:request:GET /llm", "calls": 2}
    assert guarded.count() == 2 * (3 + 3 + 2)


# == WSGI over werkzeug ==========================================================================
def test_wsgi_trip_becomes_429_and_each_request_gets_a_fresh_session(guarded, serve):
    routes = Routes()
    app = flask_app(guarded.base_url, routes)
    app.wsgi_app = wsgi.RunGuardMiddleware(app.wsgi_app, max_calls=3)  # the Flask idiom
    base = serve("wsgi", app)

    response = get(f"{base}/llm?n=5")
    (error,) = routes.trips
    assert (error.limit, error.scope) == ("max_calls", "session:request:GET /llm")
    assert_tripped(response, error)
    assert guarded.count("/chat/completions") == 3

    response = get(f"{base}/llm?n=5")
    assert_tripped(response, routes.trips[1])
    assert guarded.count("/chat/completions") == 6

    response = get(f"{base}/llm?n=2&api_token=secret")
    assert response.json() == {"scope": "session:request:GET /llm", "calls": 2}


def test_wsgi_concurrent_requests_each_get_their_own_budget(guarded, serve):
    guarded.default = Reply(delay=0.03)
    routes = Routes()
    base = serve("wsgi", wsgi.RunGuardMiddleware(flask_app(guarded.base_url, routes), max_calls=3))
    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda _: get(f"{base}/llm?n=5"), range(20)))
    assert [r.status_code for r in responses] == [429] * 20
    assert all(r.json()["error"]["scope"] == "session:request:GET /llm" for r in responses)
    assert guarded.count("/chat/completions") == 20 * 3
    assert routes.gauge.most > 1, "the requests did not overlap; the test proves nothing about isolation"


def test_wsgi_streamed_body_counts_in_the_request_session(guarded, serve):
    base = serve("wsgi", wsgi.RunGuardMiddleware(flask_app(guarded.base_url, Routes()), max_calls=3))
    response = get(f"{base}/stream?n=2")
    assert response.status_code == 200
    assert response.text.splitlines() == ["start", "session:request:GET /stream 1", "session:request:GET /stream 2"]
    assert guarded.count() == 2


def test_wsgi_stream_that_trips_before_its_first_chunk_is_a_429(guarded, serve):
    """Flask already called start_response("200 OK"), but nothing is on the wire: PEP 3333's
    exc_info lets the middleware replace it with the 429."""
    base = serve("wsgi", wsgi.RunGuardMiddleware(flask_app(guarded.base_url, Routes()), max_calls=3))
    response = get(f"{base}/stream?n=5&first=none")
    assert response.status_code == 429
    body = response.json()["error"]
    assert (body["type"], body["limit"], body["scope"]) == (
        "runguard_tripped",
        "max_calls",
        "session:request:GET /stream",
    )
    assert guarded.count() == 3


def test_wsgi_trip_mid_stream_cuts_the_connection(guarded, serve):
    base = serve("wsgi", wsgi.RunGuardMiddleware(flask_app(guarded.base_url, Routes()), max_calls=3))
    received = b""
    with pytest.raises(httpx.RemoteProtocolError), httpx.stream("GET", f"{base}/stream?n=5", timeout=30) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            received += chunk
    assert received.startswith(b"start\n")
    assert guarded.count() == 3


@pytest.mark.parametrize("how", ["direct", "cause", "context"])
def test_wsgi_retry_after_and_a_wrapped_trip(guarded, serve, how):
    base = serve("wsgi", wsgi.RunGuardMiddleware(flask_app(guarded.base_url, Routes()), max_calls=3))
    assert_tripped(get(f"{base}/trip/{how}"), manual_trip(), retry_after="13")


def test_wsgi_other_errors_stay_500_and_other_routes_are_untouched(guarded, serve):
    base = serve("wsgi", wsgi.RunGuardMiddleware(flask_app(guarded.base_url, Routes()), max_calls=3))
    assert get(f"{base}/boom").status_code == 500  # werkzeug's 500 for an error that escapes
    assert get(f"{base}/trip/suppressed").status_code == 500
    response = get(f"{base}/plain")
    assert (response.status_code, response.text, response.headers["x-app"]) == (200, "untouched", "yes")
    assert guarded.count() == 0


def test_wsgi_flask_default_config_answers_a_view_trip_with_its_own_500(guarded, serve):
    """Documented limitation: without PROPAGATE_EXCEPTIONS, Flask turns the view's trip into its
    500 before it leaves the app; the budget still held (3 calls)."""
    routes = Routes()
    base = serve("wsgi", wsgi.RunGuardMiddleware(flask_app(guarded.base_url, routes, propagate=False), max_calls=3))
    assert get(f"{base}/llm?n=5").status_code == 500
    assert len(routes.trips) == 1 and guarded.count() == 3


# == windowed sessions: the real retry_after ======================================================
@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_a_windowed_request_session_sends_its_retry_after(guarded, serve, kind):
    """``window=`` goes through to the request's session; its trip carries ``retry_after``, the
    seconds until its window rolls over, and the 429 says so, rounded up."""
    routes = Routes()
    if kind == "asgi":
        base = serve("asgi", asgi.RunGuardMiddleware(starlette_app(guarded.base_url, routes), max_calls=3, window=60))
    else:
        base = serve("wsgi", wsgi.RunGuardMiddleware(flask_app(guarded.base_url, routes), max_calls=3, window=60))
    response = get(f"{base}/llm?n=5")
    (error,) = routes.trips
    seconds = error.details["retry_after"]
    assert 0 <= seconds <= 60
    assert_tripped(response, error, retry_after=str(math.ceil(seconds)))
    assert guarded.count() == 3


# == construction ================================================================================
@pytest.mark.parametrize("module", [asgi, wsgi])
@pytest.mark.parametrize(
    "options",
    [
        {"max_calls": -1},
        {"max_cost_usd": "lots"},
        {"max_calls": True},
        {"max_callz": 3},
        {"window": "fortnight"},
        {"name": "not callable"},
    ],
)
def test_bad_options_fail_at_construction(module, options):
    with pytest.raises(runguard.RunGuardConfigError):
        module.RunGuardMiddleware(lambda *a: None, **options)


def test_name_callable_names_the_session(guarded, serve):
    routes = Routes()
    app = starlette_app(guarded.base_url, routes)
    base = serve("asgi", asgi.RunGuardMiddleware(app, max_calls=3, name=lambda scope: f"tenant-7 {scope['path']}"))
    assert get(f"{base}/llm?n=1").json() == {"scope": "session:tenant-7 /llm", "calls": 1}
    flask_base = serve(
        "wsgi",
        wsgi.RunGuardMiddleware(flask_app(guarded.base_url, routes), max_calls=3, name=lambda environ: "wsgi-named"),
    )
    assert get(f"{flask_base}/llm?n=1").json() == {"scope": "session:wsgi-named", "calls": 1}


def test_default_names_hold_method_and_path_only():
    assert asgi.request_name({"type": "http", "method": "POST", "path": "/v1/chat", "query_string": b"k=1"}) == (
        "request:POST /v1/chat"
    )
    environ = {"REQUEST_METHOD": "GET", "SCRIPT_NAME": "/app", "PATH_INFO": "/caf\xc3\xa9", "QUERY_STRING": "k=1"}
    assert wsgi.request_name(environ) == "request:GET /app/café"


# == in-process: the ASGI messages and WSGI calls one by one ======================================
async def _drive(app: Any, scope: dict) -> list[dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


HTTP = {"type": "http", "method": "GET", "path": "/x", "headers": []}


async def test_asgi_non_http_scopes_pass_straight_through():
    seen: list[tuple] = []

    async def app(scope, receive, send):
        seen.append((scope, receive, send, runguard.current().scope))

    middleware = asgi.RunGuardMiddleware(app, max_calls=3)
    for kind in ("lifespan", "websocket"):
        scope = {"type": kind}

        async def receive():
            return {}

        async def send(message):
            pass

        await middleware(scope, receive, send)
        assert seen[-1] == (scope, receive, send, "process")


async def test_asgi_a_500_the_app_returns_is_sent_unchanged_and_a_large_one_is_not_held():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 500, "headers": [(b"x-app", b"1")]})
        for _ in range(3):
            await send({"type": "http.response.body", "body": b"e" * 40_000, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    sent = await _drive(asgi.RunGuardMiddleware(app, max_calls=3), dict(HTTP))
    assert sent[0] == {"type": "http.response.start", "status": 500, "headers": [(b"x-app", b"1")]}
    assert b"".join(m.get("body", b"") for m in sent) == b"e" * 120_000

    async def large_then_trip(scope, receive, send):  # past 64 KiB the 500 is on its way: too late
        await app(scope, receive, send)
        raise manual_trip()

    middleware = asgi.RunGuardMiddleware(large_then_trip, max_calls=3)
    with pytest.raises(runguard.RunGuardTripped):
        await _drive(middleware, dict(HTTP))


async def test_asgi_trip_after_the_response_started_propagates():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise manual_trip()

    with pytest.raises(runguard.RunGuardTripped):
        await _drive(asgi.RunGuardMiddleware(app, max_calls=3), dict(HTTP))


@pytest.mark.skipif(not hasattr(asyncio, "TaskGroup"), reason="asyncio.TaskGroup is Python 3.11+")
async def test_asgi_trip_inside_an_exception_group_and_tasks_inherit_the_session():
    scopes: list[str] = []

    async def app(scope, receive, send):
        async def child():
            scopes.append(runguard.current().scope)
            raise manual_trip()

        async with asyncio.TaskGroup() as group:
            group.create_task(child())

    sent = await _drive(asgi.RunGuardMiddleware(app, max_calls=3), dict(HTTP))
    assert scopes == ["session:request:GET /x"]
    assert sent[0]["status"] == 429 and (b"content-type", CONTENT_TYPE.encode()) in sent[0]["headers"]
    assert json.loads(sent[1]["body"]) == expected_body(manual_trip())
    assert runguard.current().scope == "process"  # the session ended with the request


class CountingSession(runguard.session):
    entered = exited = 0

    def __enter__(self):
        CountingSession.entered += 1
        return super().__enter__()

    def __exit__(self, *exc):
        CountingSession.exited += 1
        return super().__exit__(*exc)


@pytest.fixture
def counting(monkeypatch):
    CountingSession.entered = CountingSession.exited = 0
    monkeypatch.setattr(wsgi, "session", CountingSession)
    return CountingSession


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, status, headers, exc_info=None):
        self.calls.append((status, dict(headers), exc_info))
        return lambda data: None


def test_wsgi_session_covers_iteration_and_close_and_ends_once(counting):
    seen: list[str] = []

    class Body:
        def __iter__(self):
            for _ in range(2):
                seen.append(runguard.current().scope)
                yield b"x"

        def close(self):
            seen.append("close in " + runguard.current().scope)

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Body()

    result = wsgi.RunGuardMiddleware(app, max_calls=3)({"REQUEST_METHOD": "GET", "PATH_INFO": "/s"}, Recorder())
    assert runguard.current().scope == "process"  # the caller's context never holds the session
    assert list(result) == [b"x", b"x"]
    assert (counting.entered, counting.exited) == (1, 0)
    result.close()
    assert seen == ["session:request:GET /s"] * 2 + ["close in session:request:GET /s"]
    assert (counting.entered, counting.exited) == (1, 1)
    result.close()  # a second close() does not end the session twice
    assert counting.exited == 1


def test_wsgi_materialized_bodies_end_the_session_at_once_and_errors_pass(counting):
    def app(environ, start_response):
        start_response("200 OK", [])
        return [b"done"]

    assert wsgi.RunGuardMiddleware(app)({"PATH_INFO": "/"}, Recorder()) == [b"done"]
    assert (counting.entered, counting.exited) == (1, 1)

    def broken(environ, start_response):
        raise ValueError("not a trip")

    with pytest.raises(ValueError):
        wsgi.RunGuardMiddleware(broken)({"PATH_INFO": "/"}, Recorder())
    assert (counting.entered, counting.exited) == (2, 2)


def test_wsgi_trip_before_the_first_chunk_replaces_the_started_status():
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body():
            raise manual_trip(retry_after=2)
            yield b"never"

        return body()

    recorder = Recorder()
    result = wsgi.RunGuardMiddleware(app)({"PATH_INFO": "/"}, recorder)
    chunks = list(result)
    result.close()
    (_, _, none), (status, headers, exc_info) = recorder.calls
    assert none is None and status == "429 Too Many Requests" and isinstance(exc_info[1], runguard.RunGuardTripped)
    assert headers["Content-Type"] == CONTENT_TYPE and headers["Retry-After"] == "2"
    assert headers["Content-Length"] == str(len(chunks[0]))
    assert [json.loads(chunk) for chunk in chunks] == [expected_body(manual_trip())]


def test_wsgi_trip_after_the_first_chunk_propagates():
    def app(environ, start_response):
        start_response("200 OK", [])

        def body():
            yield b"first"
            raise manual_trip()

        return body()

    result = wsgi.RunGuardMiddleware(app)({"PATH_INFO": "/"}, Recorder())
    assert next(iter(result)) == b"first"
    with pytest.raises(runguard.RunGuardTripped):
        next(result)
    result.close()


@pytest.mark.parametrize(
    ("value", "header"),
    [(12.3, "13"), (12, "12"), (0, "0"), (-1, None), (float("nan"), None), (True, None), ("5", None)],
)
def test_retry_after_header_is_whole_seconds_rounded_up(value, header):
    _, headers, _ = wsgi.rejection(manual_trip(retry_after=value))
    assert dict(headers).get("Retry-After") == header
