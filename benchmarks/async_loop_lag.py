#!/usr/bin/env python
"""Does a shared budget stall the event loop of an async agent? Loop lag with 200 concurrent calls.

    python benchmarks/async_loop_lag.py           # ~1 min; writes benchmarks/results-async.md
    python benchmarks/async_loop_lag.py --quick   # ~15 s; prints only

The parent starts a ``redis-server`` (Debian's package) and the package's ``FakeOpenAIServer``
on 127.0.0.1; a child process measures (strict mode: an internal error fails the run). A ticker
task sleeps 1 ms at a time; its lag is how late each wake-up comes (``actual - 1 ms``), sampled
while 200 guarded calls run concurrently, round after round, the arms interleaved. In a round
the 200 calls arrive spread over 200 ms (as an agent service's requests do) and each waits
300 ms for its provider, so all of them are in flight at once:

- ``off``: runguard switched off (the lag of the calls themselves);
- ``awaited``: runguard on, every call charging a shared budget in Redis, its reserve awaited
  on the store's I/O threads (what async calls do);
- ``blocking``: the same, the reserve made inline on the loop (``SharedStore.remote = False``,
  how async calls reserved before: one round trip per call with the loop stopped).

Two workloads: ``provider``, calls through the runguard driver of ``openai``'s async
``chat.completions.create`` whose provider is a coroutine answering after 300 ms of
``asyncio.sleep`` (a network wait that costs the loop nothing, so the lag is runguard's); and
``sdk``, real ``AsyncOpenAI`` calls to the fake server answering after 300 ms (the SDK's own
work on the loop included, about a millisecond of CPU per call); and ``burst``, the ``provider``
workload with all 200 calls arriving at once. Target: p99 lag of the
``awaited`` arm <= 1 ms on the ``provider`` workload.

The loop runs on ``selectors.SelectSelector``, whose timeouts have microsecond precision. The
default epoll selector rounds every timeout up to a whole millisecond, so any wake-up shortly
before the ticker is due (a socket or a thread answering) makes a 1 ms timer fire up to 1 ms
late while the loop is idle: that measures epoll's rounding, not a loop kept busy.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from overhead import provenance  # noqa: E402

ARMS = ("off", "awaited", "blocking")
CONCURRENT = 200
MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "Is the benchmark running?"}]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# == child ===================================================================================
def child(p: dict) -> dict:
    import openai
    from openai.types.chat import ChatCompletion

    import runguard_autolog as runguard
    from runguard_autolog._guard import async_driver
    from runguard_autolog._runtime import RUNTIME
    from runguard_autolog._shared import SharedStore
    from runguard_autolog.integrations.openai import CHAT

    runguard.autolog(max_calls="none", store=p["redis_url"], shared_budget="lag", shared_max_calls=10**12,
                     shared_max_cost_usd=10**9)
    guard = async_driver(CHAT)  # what guards AsyncCompletions.create
    reply = ChatCompletion.model_validate({
        "id": "c", "object": "chat.completion", "created": 0, "model": MODEL,
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "yes"}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
    })

    async def provider(**kwargs):
        await asyncio.sleep(0.3)  # the network: the loop is free meanwhile
        return reply

    client = openai.AsyncOpenAI(base_url=p["base_url"], api_key="bench", max_retries=0)

    async def provider_call(delay: float):
        await asyncio.sleep(delay)
        await guard(provider, None, (), {"model": MODEL, "messages": MESSAGES})

    async def sdk_call(delay: float):
        await asyncio.sleep(delay)
        await client.chat.completions.create(model=MODEL, messages=MESSAGES)

    calls = {"provider": provider_call, "burst": provider_call, "sdk": sdk_call}

    def setup(arm: str) -> None:
        RUNTIME.enabled = arm != "off"
        SharedStore.remote = arm != "blocking"

    async def one_round(workload: str) -> list[float]:
        lags: list[float] = []
        done = asyncio.Event()

        async def ticker():
            while not done.is_set():
                start = time.perf_counter()
                await asyncio.sleep(0.001)
                lags.append((time.perf_counter() - start - 0.001) * 1e3)

        ticking = asyncio.ensure_future(ticker())
        await asyncio.sleep(0.01)
        spread = 0.0 if workload == "burst" else 0.2  # a burst: all 200 at once
        await asyncio.gather(*(calls[workload](spread * i / CONCURRENT) for i in range(CONCURRENT)))
        done.set()
        await ticking
        return lags

    async def main() -> dict:
        results: dict = {workload: {arm: [] for arm in ARMS} for workload in calls}
        for workload in calls:
            for i in range(p["warmup"] + p["rounds"]):
                for arm in ARMS[i % 3:] + ARMS[: i % 3]:
                    setup(arm)
                    lags = await one_round(workload)
                    if i >= p["warmup"]:
                        results[workload][arm].extend(lags)
        setup("awaited")
        return results

    import selectors

    loop = asyncio.SelectorEventLoop(selectors.SelectSelector())  # microsecond timeouts (see the docstring)
    try:
        results = loop.run_until_complete(main())
    finally:
        loop.close()
    assert runguard.flush()
    snapshot = runguard.current_shared()
    sdk_calls = (p["warmup"] + p["rounds"]) * 2 * CONCURRENT
    provider_calls = (p["warmup"] + p["rounds"]) * 4 * CONCURRENT
    return {"lags": results, "shared_calls": snapshot.calls, "expected_shared_calls": sdk_calls + provider_calls,
            "sdk_requests": (p["warmup"] + p["rounds"]) * 3 * CONCURRENT}


# == parent ==================================================================================
def render(result: dict, quick: bool, seconds: float, version: str) -> str:
    lags = result["lags"]
    rows = []
    for workload, arms in lags.items():
        for arm in ARMS:
            values = arms[arm]
            rows.append(f"| {workload} | {arm} | {len(values):,} | {percentile(values, 0.5):.2f} | "
                        f"{percentile(values, 0.99):.2f} | {max(values):.2f} |")
    p99 = percentile(lags["provider"]["awaited"], 0.99)
    verdict = "PASS" if p99 <= 1.0 else "**FAIL**"
    command = "python benchmarks/async_loop_lag.py" + (" --quick" if quick else "")
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return "\n".join([
        f"# Event-loop lag with {CONCURRENT} concurrent async calls on a shared budget ({'quick' if quick else 'full'} run)",
        "",
        f"{when}; {os.cpu_count()} CPUs ({platform.machine()}); Python {platform.python_version()}, redis-server "
        f"{version}; {provenance()}. `{command}` took {seconds:.0f} s. Lag: how late a 1 ms `asyncio.sleep` "
        "wakes up, in ms, sampled throughout each round, on a `SelectSelector` loop (microsecond timeouts; "
        "epoll's round up to whole milliseconds).",
        "",
        "## Target", "",
        "| target | measured | result |", "|---|---|---|",
        f"| p99 lag, `awaited` arm, `provider` workload <= 1 ms | {p99:.2f} ms | {verdict} |",
        "", "## Lag by arm (ms)", "",
        "| workload | arm | samples | p50 | p99 | max |", "|---|---|---:|---:|---:|---:|",
        *rows,
        "",
        f"Each round: {CONCURRENT} calls arriving over 200 ms, each waiting 300 ms for its provider. "
        "`provider`: the runguard driver of `AsyncCompletions.create` around a provider that answers after "
        "300 ms of `asyncio.sleep`, so what the loop waits for is runguard's. `sdk`: real `AsyncOpenAI` calls "
        "to the fake server (answering after 300 ms), the SDK's own work on the loop included. `burst`: the "
        "`provider` workload with the 200 calls arriving at once. `blocking` is the reserve made "
        "inline on the loop (how async calls reserved before the I/O threads): every call stops the loop "
        f"for one Redis round trip. Every call of the `awaited` and `blocking` arms was counted in the "
        f"budget: {result['shared_calls']:,} of {result['expected_shared_calls']:,}.",
    ]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    from runguard_autolog.testing import FakeOpenAIServer
    from tests._servers import RedisServer

    started = time.monotonic()
    params = {"warmup": 1, "rounds": 4 if args.quick else 20}
    from runguard_autolog.testing import Reply

    with tempfile.TemporaryDirectory() as directory, FakeOpenAIServer() as server, RedisServer(Path(directory)) as redis:
        server.default = Reply(delay=0.3)
        version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUNGUARD_")}
        env["_RUNGUARD_STRICT"] = "1"
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child",
                               json.dumps({**params, "redis_url": redis.url, "base_url": server.base_url})],
                              capture_output=True, text=True, env=env, timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-4000:])
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        if server.count() != result["sdk_requests"]:
            raise SystemExit(f"sent {result['sdk_requests']} requests but the server received {server.count()}")
        if result["shared_calls"] != result["expected_shared_calls"]:
            raise SystemExit(f"the budget counted {result['shared_calls']} calls, not {result['expected_shared_calls']}")
    report = render(result, args.quick, time.monotonic() - started, version.removeprefix("v="))
    print(report)
    if not args.quick:
        (HERE / "results-async.md").write_text(report)


if __name__ == "__main__":
    main()
