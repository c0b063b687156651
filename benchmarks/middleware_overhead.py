"""What the per-request middlewares add to a request, and whether memory stays flat.

    python benchmarks/middleware_overhead.py      # about 30 s; writes benchmarks/results-middleware.md

The middlewares (``runguard_autolog.asgi`` / ``runguard_autolog.wsgi``) open one
``runguard.session()`` per request and close it at the end; no LLM call is made here, so what
is measured is that bookkeeping: building and validating the session, entering and leaving it,
the watched ``send`` / ``start_response``, and (WSGI) running the body in the request's context.

1. Paired A/B, in process, no HTTP. A trivial app is called directly, bare and wrapped,
   alternating which goes first in each pair, 20,000 pairs per arm: ASGI on one asyncio loop
   (``await app(scope, receive, send)``, a 200 with a one-chunk body), WSGI with a list body
   (materialized: the session ends when the app returns) and with a generator body (iterated
   and closed inside the session, as a streamed Flask response is). Reported: the median bare,
   the median wrapped, and the median of the per-pair differences with a distribution-free 95%
   CI. Target: at most 50 us added per request.
2. Memory. Process RSS (``/proc/self/statm`` after ``gc.collect()``) after a warm-up and again
   after 100,000 more requests through each wrapped app. Target: flat (growth under 1 MiB,
   i.e. under ~10 bytes per request).

``runguard.autolog()`` is on (limits lifted) and strict mode is on, as in the tests, so an
internal runguard error fails the run instead of being measured.
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import math
import os
import platform
import statistics
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from time import perf_counter_ns
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the package is importable from the repo root
os.environ["_RUNGUARD_STRICT"] = "1"
for _name in [name for name in os.environ if name.startswith("RUNGUARD_")]:
    del os.environ[_name]

import runguard_autolog as runguard
from runguard_autolog import asgi, wsgi

PAIRS = 20_000
WARMUP = 2_000
MEMORY_REQUESTS = 100_000
TARGET_ADDED_US = 50.0
RSS_FLAT_MIB = 1.0
LIMITS = {"max_calls": 20, "max_cost_usd": 0.50}  # the README's example: real limits, validated per request


# == helpers =================================================================================
def median_ci_us(samples: list[int]) -> tuple[float, float]:
    """Distribution-free 95% CI of the median: order statistics n/2 -+ 0.98*sqrt(n)."""
    values = sorted(samples)
    n = len(values)
    half = 0.98 * math.sqrt(n)
    low, high = max(0, math.floor(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half))
    return values[low] / 1e3, values[high] / 1e3


def summary(on: list[int], off: list[int]) -> dict[str, Any]:
    diffs = [a - b for a, b in zip(on, off)]
    return {
        "off_us": statistics.median(off) / 1e3,
        "on_us": statistics.median(on) / 1e3,
        "added_us": statistics.median(diffs) / 1e3,
        "ci_us": median_ci_us(diffs),
        "pairs": len(diffs),
    }


def rss_mib() -> float:
    gc.collect()
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


# == ASGI ====================================================================================
SCOPE = {"type": "http", "method": "GET", "path": "/chat", "query_string": b"", "headers": []}
START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
BODY = {"type": "http.response.body", "body": b"ok", "more_body": False}


async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
    await send(START)
    await send(BODY)


async def receive() -> dict:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: Any) -> None:
    pass


async def asgi_pairs(bare: Any, wrapped: Any, pairs: int) -> tuple[list[int], list[int]]:
    on: list[int] = []
    off: list[int] = []
    for i in range(WARMUP):
        await bare(dict(SCOPE), receive, send)
        await wrapped(dict(SCOPE), receive, send)
    for i in range(pairs):
        order = ((wrapped, on), (bare, off)) if i % 2 else ((bare, off), (wrapped, on))
        for app, samples in order:
            scope = dict(SCOPE)
            started = perf_counter_ns()
            await app(scope, receive, send)
            samples.append(perf_counter_ns() - started)
    return on, off


async def asgi_many(app: Any, requests: int) -> None:
    for _ in range(requests):
        await app(dict(SCOPE), receive, send)


# == WSGI ====================================================================================
ENVIRON = {"REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": "/chat", "QUERY_STRING": ""}
HEADERS = [("Content-Type", "text/plain")]


def wsgi_list(environ: Any, start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", HEADERS)
    return [b"ok"]


def wsgi_generator(environ: Any, start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", HEADERS)
    yield b"ok"


def start_response(status: str, headers: Any, exc_info: Any = None) -> Callable[[bytes], None]:
    return write


def write(data: bytes) -> None:
    pass


def serve_one(app: Any) -> None:
    """What a WSGI server does with one request: call, iterate, close."""
    result = app(dict(ENVIRON), start_response)
    try:
        for _ in result:
            pass
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()


def wsgi_pairs(bare: Any, wrapped: Any, pairs: int) -> tuple[list[int], list[int]]:
    on: list[int] = []
    off: list[int] = []
    for _ in range(WARMUP):
        serve_one(bare)
        serve_one(wrapped)
    for i in range(pairs):
        order = ((wrapped, on), (bare, off)) if i % 2 else ((bare, off), (wrapped, on))
        for app, samples in order:
            started = perf_counter_ns()
            serve_one(app)
            samples.append(perf_counter_ns() - started)
    return on, off


# == run =====================================================================================
def main() -> int:
    runguard.autolog(max_calls="none", max_cost_usd="none", max_total_tokens="none")
    print(
        f"runguard middleware overhead: {PAIRS:,} pairs per arm, RSS over {MEMORY_REQUESTS:,} requests", file=sys.stderr
    )

    wrapped_asgi = asgi.RunGuardMiddleware(asgi_app, **LIMITS)
    wrapped_list = wsgi.RunGuardMiddleware(wsgi_list, **LIMITS)
    wrapped_generator = wsgi.RunGuardMiddleware(wsgi_generator, **LIMITS)

    loop = asyncio.new_event_loop()
    try:
        rows = {"ASGI": summary(*loop.run_until_complete(asgi_pairs(asgi_app, wrapped_asgi, PAIRS)))}
        print("  ASGI paired done", file=sys.stderr)
        rows["WSGI, list body"] = summary(*wsgi_pairs(wsgi_list, wrapped_list, PAIRS))
        rows["WSGI, generator body"] = summary(*wsgi_pairs(wsgi_generator, wrapped_generator, PAIRS))
        print("  WSGI paired done", file=sys.stderr)

        memory: dict[str, tuple[float, float]] = {}
        loop.run_until_complete(asgi_many(wrapped_asgi, WARMUP))
        before = rss_mib()
        loop.run_until_complete(asgi_many(wrapped_asgi, MEMORY_REQUESTS))
        memory["ASGI"] = (before, rss_mib())
        for label, app in (("WSGI, generator body", wrapped_generator), ("WSGI, list body", wrapped_list)):
            for _ in range(WARMUP):
                serve_one(app)
            before = rss_mib()
            for _ in range(MEMORY_REQUESTS):
                serve_one(app)
            memory[label] = (before, rss_mib())
        print("  memory done", file=sys.stderr)
    finally:
        loop.close()
    assert runguard.current().scope == "process", "a session leaked into the caller's context"

    report = render(rows, memory)
    print(report)
    (HERE / "results-middleware.md").write_text(report, encoding="utf-8")
    slow = [label for label, row in rows.items() if row["added_us"] > TARGET_ADDED_US]
    grew = [label for label, (a, b) in memory.items() if b - a > RSS_FLAT_MIB]
    return 1 if slow or grew else 0


def render(rows: dict[str, dict[str, Any]], memory: dict[str, tuple[float, float]]) -> str:
    setup = (
        f"`python benchmarks/middleware_overhead.py`, {datetime.date.today().isoformat()}; "
        f"Python {platform.python_version()} on {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs. In process, no HTTP: a trivial app called directly, bare and wrapped in "
        "`RunGuardMiddleware(app, max_calls=20, max_cost_usd=0.50)`, paired and interleaved; "
        "no LLM call, so this is the session opened and closed per request."
    )
    lines = [
        "# Middleware overhead",
        "",
        setup,
        "",
        "| app | requests per arm | bare median (us) | wrapped median (us) | added median (us) | 95% CI (us) | target |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for label, row in rows.items():
        low, high = row["ci_us"]
        verdict = "met" if row["added_us"] <= TARGET_ADDED_US else "**missed**"
        lines.append(
            f"| {label} | {row['pairs']:,} | {row['off_us']:.2f} | {row['on_us']:.2f} | "
            f"**{row['added_us']:.2f}** | {low:.2f} to {high:.2f} | <= {TARGET_ADDED_US:g} us: {verdict} |"
        )
    after_column = f"RSS after {MEMORY_REQUESTS:,} more requests (MiB)"
    lines += [
        "",
        f"| app | RSS after warm-up (MiB) | {after_column} | growth (MiB) | target |",
        "|---|---:|---:|---:|---|",
    ]
    for label, (before, after) in memory.items():
        verdict = "flat" if after - before <= RSS_FLAT_MIB else "**grew**"
        lines.append(
            f"| {label} | {before:.1f} | {after:.1f} | {after - before:+.2f} | < {RSS_FLAT_MIB:g} MiB: {verdict} |"
        )
    notes = (
        "Bare WSGI with a list body is the floor of a request here (call, iterate, close); the list "
        "body ends the session when the app returns, the generator body is wrapped so that it runs "
        "(and is closed) inside the session. RSS is read from `/proc/self/statm` after `gc.collect()`."
    )
    lines += ["", notes, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
