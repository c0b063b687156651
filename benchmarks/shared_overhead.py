#!/usr/bin/env python
"""What a shared budget on Redis (one node, and a Redis Cluster) adds to an OpenAI chat call.

    python benchmarks/shared_overhead.py            # ~1 min; writes benchmarks/results-shared.md
    python benchmarks/shared_overhead.py --quick    # ~15 s; writes benchmarks/results-shared-quick.md

The parent starts a ``redis-server`` (Debian's package), a 3-node Redis Cluster
(``redis-server --cluster-enabled yes`` joined by ``redis-cli --cluster create``) and the
package's ``FakeOpenAIServer`` on 127.0.0.1, then measures in a child process (so no server
competes with the client for the GIL). In that one process, round after round with the
order rotating, six arms are timed:

- ``off``: runguard installed, switched off (``RUNTIME.enabled = False``);
- ``memory``: runguard on, in-memory store only;
- ``redis``: runguard on, every call also charging a shared budget in Redis
  (``shared_max_calls`` and ``shared_max_cost_usd`` set, so each call holds and settles both);
- ``cluster``: the same, the budget on the cluster (``redis+cluster://``);
- ``ping``: one ``PING`` through the same redis-py client library (``redis.Redis.ping()``);
- ``ping_cluster``: one ``PING`` to the cluster node that owns the budget's slot.

The switch between arms is made outside the timed region. Then blocks of back-to-back
calls per store give a second view. Reported: the median of each arm,
the paired per-round differences (memory - off, redis - off, redis - memory) with 95% CIs,
and the Redis round trips per call over a block of calls of each store: those the calling
thread made (what a call waits for; counted in the client) and every script Redis received
(``INFO commandstats``, every node: the settles the background thread sends included).
Targets: a call waits for <= 1 round trip on one node and on the cluster, <= 2 in all; each
store's added median is shown beside 2 x a PING to the node that holds the budget.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from time import perf_counter_ns

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from overhead import median_ci_us, median_us, provenance  # noqa: E402  (the same statistics)

MODEL = "gpt-4o-mini"
MESSAGES = [
    {"role": "system", "content": "You are a terse assistant. Answer in one word."},
    {"role": "user", "content": "Is the benchmark running?"},
]
ARMS = ("off", "memory", "redis", "cluster", "ping", "ping_cluster")


def script_calls(client) -> int:
    stats = client.info("commandstats")
    return sum(stats.get(name, {"calls": 0})["calls"] for name in ("cmdstat_evalsha", "cmdstat_eval"))


# == child ===================================================================================
def child(p: dict) -> dict:
    import openai
    import redis

    import runguard_autolog as runguard
    from runguard_autolog._runtime import RUNTIME

    from runguard_autolog._shared import SharedStore, budget_from, shared_client

    runguard.autolog(max_calls=math.inf, max_input_tokens=math.inf, max_output_tokens=math.inf,
                     store=p["redis_url"], shared_budget="bench", shared_max_calls=10**12,
                     shared_max_cost_usd=10**9)
    shared, local = RUNTIME.store, RUNTIME.local
    on_cluster = shared_client(p["cluster_url"])
    stores = {"redis": shared, "cluster": SharedStore(local, on_cluster, budget_from(on_cluster, RUNTIME.settings))}
    pinger = redis.Redis.from_url(p["redis_url"])
    cluster_pinger = redis.Redis(host="127.0.0.1", port=p["cluster_owner_port"])
    pingers = {"ping": pinger, "ping_cluster": cluster_pinger}
    client = openai.OpenAI(base_url=p["base_url"], api_key="bench", max_retries=0)

    def call():
        client.chat.completions.create(model=MODEL, messages=MESSAGES)

    def setup(arm: str) -> None:
        RUNTIME.enabled = arm != "off"
        RUNTIME.store = stores.get(arm, local)

    def run(arm: str) -> int:
        setup(arm)
        start = perf_counter_ns()
        if arm in pingers:
            pingers[arm].ping()
        else:
            call()
        return perf_counter_ns() - start

    samples = {arm: [] for arm in ARMS}
    for i in range(p["warmup"] + p["rounds"]):
        k = i % len(ARMS)
        for arm in ARMS[k:] + ARMS[:k]:
            elapsed = run(arm)
            if i >= p["warmup"]:
                samples[arm].append(elapsed)
    # back to back: blocks of consecutive calls, so each settle (sent in the background) overlaps
    # the next call as it does in an agent loop; blocks alternate between the two stores
    blocks = {"memory": [], "redis": [], "cluster": []}
    for i in range(3 * p["blocks"]):
        arm = ("memory", "redis", "cluster")[i % 3]
        setup(arm)
        start = perf_counter_ns()
        for _ in range(p["block_calls"]):
            call()
        blocks[arm].append((perf_counter_ns() - start) / p["block_calls"])
    # round trips: those the calling thread made (counted in the client), and every script Redis
    # received (every node) over a block of calls of each store
    import threading

    from runguard_autolog._redis import Transport

    caller, made = threading.get_ident(), [0]
    send = Transport._send

    def counted(self, *args, **kwargs):
        if threading.get_ident() == caller:
            made[0] += 1
        return send(self, *args, **kwargs)

    Transport._send = counted
    nodes = {"redis": [pinger], "cluster": [redis.Redis(host="127.0.0.1", port=port) for port in p["cluster_ports"]]}
    trips, waited = {}, {}
    for arm in ("redis", "cluster"):
        setup(arm)
        stores[arm].budget.flush()
        before, made[0] = sum(script_calls(node) for node in nodes[arm]), 0
        for _ in range(p["trip_calls"]):
            call()
        waited[arm] = made[0] / p["trip_calls"]  # each call's reserve, carrying the previous call's settle
        stores[arm].budget.flush()
        trips[arm] = (sum(script_calls(node) for node in nodes[arm]) - before) / p["trip_calls"]
    Transport._send = send
    setup("memory")
    sent = (p["warmup"] + p["rounds"]) * 4 + 3 * p["blocks"] * p["block_calls"] + 2 * p["trip_calls"]
    return {"samples": samples, "blocks": blocks, "round_trips_per_call": trips, "waited_per_call": waited,
            "requests": sent}


# == parent ==================================================================================
def paired(a: list[int], b: list[int]) -> dict:
    diffs = [x - y for x, y in zip(a, b)]
    return {"added_us": median_us(diffs), "ci_us": median_ci_us(diffs)}


def render(result: dict, quick: bool, seconds: float, redis_version: str) -> str:
    import openai

    s = result["samples"]
    med = {arm: median_us(s[arm]) for arm in ARMS}
    memory = paired(s["memory"], s["off"])
    added = {store: paired(s[store], s["off"]) for store in ("redis", "cluster")}
    over_memory = {store: paired(s[store], s["memory"]) for store in ("redis", "cluster")}
    pings = {"redis": med["ping"], "cluster": med["ping_cluster"]}
    trips, waited = result["round_trips_per_call"], result["waited_per_call"]
    shown = {"redis": "one node", "cluster": "cluster"}
    verdict = lambda ok: "PASS" if ok else "**FAIL**"  # noqa: E731
    ci = lambda r: f"{r['ci_us'][0]:.1f} to {r['ci_us'][1]:.1f}"  # noqa: E731
    command = "python benchmarks/shared_overhead.py" + (" --quick" if quick else "")
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [
        f"# Shared budget on Redis: added latency ({'quick' if quick else 'full'} run)", "",
        f"{when}; {os.cpu_count()} CPUs ({platform.machine()}); Python {platform.python_version()}, "
        f"openai {openai.__version__}, redis-server {redis_version}; {provenance()}. `{command}` took {seconds:.0f} s; "
        f"{len(s['off']):,} rounds. Figures are microseconds (us) per call.", "",
        "## Targets", "",
        "| target | measured | result |", "|---|---|---|",
        *[f"| {shown[store]}: round trips a call waits for <= 1 (<= 2 in all) | {waited[store]:.3f} "
          f"({trips[store]:.3f} in all) | {verdict(waited[store] <= 1 and trips[store] <= 2)} |" for store in shown],
        "", "| what a shared budget adds (paired, per call) | measured | beside 2 x PING to its node |",
        "|---|---:|---:|",
        *[f"| {shown[store]} ({store} - off) | {added[store]['added_us']:.1f} | 2 x {pings[store]:.1f} = "
          f"{2 * pings[store]:.1f} |" for store in shown],
        "", "## Arms (one process, interleaved rounds)", "",
        "| arm | median |", "|---|---:|",
        *[f"| {arm} | {med[arm]:,.1f} |" for arm in ARMS],
        "", "## Paired differences (per round)", "",
        "| difference | median | 95% CI |", "|---|---:|---|",
        f"| memory - off (runguard, in-memory store) | {memory['added_us']:.1f} | {ci(memory)} |",
        *[f"| {store} - off (runguard with a shared budget, {shown[store]}) | {added[store]['added_us']:.1f} | "
          f"{ci(added[store])} |" for store in shown],
        *[f"| {store} - memory (what the shared budget adds, {shown[store]}) | {over_memory[store]['added_us']:.1f} | "
          f"{ci(over_memory[store])} |" for store in shown],
        "", f"## Back to back ({len(result['blocks']['redis'])} blocks of {result['block_calls']} consecutive "
        "calls per store, alternating)", "",
        "Consecutive calls, as in an agent loop.", "",
        "| store | median of block means |", "|---|---:|",
        f"| memory | {statistics.median(result['blocks']['memory']) / 1e3:,.1f} |",
        *[f"| {store} | {statistics.median(result['blocks'][store]) / 1e3:,.1f} |" for store in shown],
        *[f"| {store} - memory | {(statistics.median(result['blocks'][store]) - statistics.median(result['blocks']['memory'])) / 1e3:,.1f} |"
          for store in shown],
        "",
        "A call with a shared budget waits for one script round trip, its reserve, which also "
        "carries the previous call's settle; a settle no call carries within 50 ms is sent by a "
        "background thread. Round trips a call waits for are those its own thread made (counted in "
        "the client); round trips in all are the scripts Redis received (`INFO commandstats`, every "
        "node) over a block of calls, the last settle included. PING is one round trip through the same "
        "client library (redis-py); on the cluster, to the node that owns the budget's slot (a budget's "
        "keys share one slot, so a call talks to one node).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    from runguard_autolog.testing import FakeOpenAIServer

    started = time.monotonic()
    params = {"warmup": 100, "rounds": 600 if args.quick else 3000, "trip_calls": 200,
              "blocks": 4 if args.quick else 10, "block_calls": 100}
    from tests._servers import LocalRedisCluster, RedisServer  # the same launchers the tests use

    with tempfile.TemporaryDirectory() as directory, FakeOpenAIServer() as server, \
            RedisServer(Path(directory)) as redis, LocalRedisCluster(Path(directory) / "cluster") as cluster:
        url = redis.url
        params.update(cluster_url=cluster.url, cluster_owner_port=cluster.owner("runguard:{bench}:leases").port,
                      cluster_ports=[node.port for node in cluster.nodes])
        version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUNGUARD_")}
        env["_RUNGUARD_STRICT"] = "1"
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child",
                               json.dumps({**params, "redis_url": url, "base_url": server.base_url})],
                              capture_output=True, text=True, env=env, timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-4000:])
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["block_calls"] = params["block_calls"]
        if server.count() != result["requests"]:
            raise SystemExit(f"sent {result['requests']} requests but the server received {server.count()}")
    report = render(result, args.quick, time.monotonic() - started, version.removeprefix("v="))
    print(report)
    (HERE / ("results-shared-quick.md" if args.quick else "results-shared.md")).write_text(report)


if __name__ == "__main__":
    main()
