#!/usr/bin/env python
"""Per-tenant shared budgets: is client memory flat over 100,000 requests from 10,000 tenants?

    python benchmarks/tenants_memory.py           # about 1 minute; writes benchmarks/results-tenants.md
    python benchmarks/tenants_memory.py --quick   # 20,000 requests from 2,000 tenants; prints only

A ``redis-server`` (Debian's package) is started on 127.0.0.1 in a temp dir. In this process,
``runguard.autolog(store=<it>)`` is on (strict mode: an internal error fails the run) and an
ASGI app wrapped in ``runguard_autolog.asgi.RunGuardMiddleware(app, shared_budget=<tenant of
the request>, shared_max_calls=…)`` serves requests called directly on one asyncio loop (no
HTTP server: what is measured is the client side). Each request makes one chat call through the
real openai SDK, whose ``httpx.MockTransport`` answers a canned reply, so every request reserves
and settles in its tenant's budget in Redis. Request ``i`` comes from tenant ``i % tenants``.

Reported, after the first pass over every tenant (warm) and then every 10% of the run: process
RSS (``/proc/self/statm`` after ``gc.collect()``), the shared budgets alive in the client, queued
settles, live leases, threads, and Redis connections. Target: RSS growth from the warm point to
the end under 2 MiB (a few bytes per request), one writer thread, no per-tenant connection, no
budget kept once its calls settled. Each tenant's count is checked against Redis at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the package is importable from the repo root
os.environ["_RUNGUARD_STRICT"] = "1"
for _name in [name for name in os.environ if name.startswith("RUNGUARD_")]:
    del os.environ[_name]

import httpx
import openai
import redis

import runguard_autolog as runguard
from runguard_autolog import _runtime, asgi

RSS_FLAT_MIB = 2.0
REPLY = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 0,
    "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
}


def rss_mib() -> float:
    gc.collect()
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(directory: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", directory],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        try:
            redis.Redis.from_url(url).ping()
            return process, url
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit("redis-server did not start")


def build_app(sent: list[int]) -> Any:
    def answer(request: httpx.Request) -> httpx.Response:
        sent[0] += 1
        return httpx.Response(200, json=REPLY)

    client = openai.OpenAI(
        base_url="http://model.invalid/v1",
        api_key="t",
        max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(answer)),
    )

    async def app(scope: Any, receive: Any, send: Any) -> None:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok", "more_body": False})

    def tenant(scope: Any) -> str:
        return "tenant:" + scope["headers"][0][1].decode()

    return asgi.RunGuardMiddleware(app, shared_budget=tenant, shared_max_calls=10**9)


async def receive() -> dict:
    return {"type": "http.request", "body": b"", "more_body": False}


async def run(app: Any, tenants: int, requests: int, url: str) -> list[dict]:
    statuses: list[int] = []

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    store = _runtime.RUNTIME.store.client
    admin = redis.Redis.from_url(url)
    points: list[dict] = []

    def point(done: int, started: float) -> None:
        gc.collect()
        points.append(
            {
                "requests": done,
                "rss_mib": rss_mib(),
                "budgets_alive": len(store._budgets),
                "queued_settles": sum(len(entries) for entries in list(store._pending.values())),
                "live_leases": len(store._live),
                "threads": threading.active_count(),
                "redis_connections": len(admin.client_list()) - 1,  # less this admin connection
                "us_per_request": (time.perf_counter() - started) / (done - (points[-1]["requests"] if points else 0))
                * 1e6,
            }
        )

    tenant_headers = [[(b"x-tenant", f"t{i}".encode())] for i in range(tenants)]
    step = requests // 10
    started = time.perf_counter()
    for i in range(requests):
        scope = {"type": "http", "method": "POST", "path": "/chat", "headers": tenant_headers[i % tenants]}
        await app(scope, receive, send)
        if i + 1 == tenants or (i + 1) % step == 0:
            runguard.flush()
            point(i + 1, started)
            started = time.perf_counter()
    assert statuses == [200] * requests, "every request must be admitted"
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    tenants, requests = (2_000, 20_000) if args.quick else (10_000, 100_000)
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed (Debian package redis-server)")
    begun = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        process, url = start_redis(directory)
        try:
            runguard.autolog(store=url, max_calls="none", max_input_tokens="none", max_output_tokens="none")
            sent = [0]
            app = build_app(sent)
            points = asyncio.run(run(app, tenants, requests, url))
            assert sent[0] == requests
            per_tenant = requests // tenants
            checked = [runguard.current_shared(f"tenant:t{i}").calls for i in (0, tenants // 2, tenants - 1)]
            assert checked == [per_tenant] * 3, checked
            redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
            used_memory = redis.Redis.from_url(url).info("memory")["used_memory"]
        finally:
            runguard.autolog(disable=True)
            process.terminate()
            process.wait(10)
    seconds = time.perf_counter() - begun
    warm = next(p for p in points if p["requests"] == tenants)
    end = points[-1]
    growth = end["rss_mib"] - warm["rss_mib"]
    flat = growth < RSS_FLAT_MIB
    bounded = max(p["budgets_alive"] for p in points) <= 1 and len({p["threads"] for p in points[1:]}) == 1
    connections = max(p["redis_connections"] for p in points)
    command = "python benchmarks/tenants_memory.py" + (" --quick" if args.quick else "")
    lines = [
        "# Per-tenant shared budgets: client memory", "",
        f"{datetime.date.today().isoformat()}; Python {platform.python_version()}, openai {openai.__version__}, "
        f"redis-py {redis.__version__}, {redis_version.split()[2] if redis_version else 'redis-server'}; "
        f"{os.cpu_count()} CPUs. `{command}` took {seconds:.0f} s: {requests:,} requests from {tenants:,} tenants "
        "(request i from tenant i mod tenants), one chat call each, every call reserved and settled in its "
        "tenant's budget in Redis.", "",
        "## Targets", "",
        "| target | measured | result |", "|---|---|---|",
        f"| RSS growth from the warm point ({tenants:,} requests, every tenant seen) to the end < "
        f"{RSS_FLAT_MIB:g} MiB | {growth:+.2f} MiB ({warm['rss_mib']:.1f} -> {end['rss_mib']:.1f}) "
        f"| {'met' if flat else 'not met'} |",
        f"| no budget, thread or connection per tenant | budgets alive after a flush: at most "
        f"{max(p['budgets_alive'] for p in points)}; threads: {sorted({p['threads'] for p in points})}; Redis "
        f"connections of this process: at most {connections} | {'met' if bounded and connections <= 3 else 'not met'} |",
        "", "## Every 10% of the run", "",
        "| requests | RSS MiB | budgets alive | queued settles | live leases | threads | Redis connections "
        "| us per request (since the last row; mostly the openai SDK) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        lines.append(
            f"| {p['requests']:,} | {p['rss_mib']:.2f} | {p['budgets_alive']} | {p['queued_settles']} | "
            f"{p['live_leases']} | {p['threads']} | {p['redis_connections']} | {p['us_per_request']:.0f} |"
        )
    lines += ["", f"Redis server memory at the end (every tenant's keys): {used_memory / 2**20:.1f} MiB.", ""]
    report = "\n".join(lines)
    print(report)
    print(json.dumps({"growth_mib": growth, "flat": flat, "bounded": bounded}), file=sys.stderr)
    if not args.quick:
        (HERE / "results-tenants.md").write_text(report)


if __name__ == "__main__":
    main()
