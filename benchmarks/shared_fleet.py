#!/usr/bin/env python
"""Shared budgets at fleet scale: how many calls one budget admits per second (when it becomes
a hot key), and zero overshoot on a Redis Cluster whose primary is killed mid-run.

    python benchmarks/shared_fleet.py           # ~2 min; writes benchmarks/results-fleet.md
    python benchmarks/shared_fleet.py --quick   # ~40 s; prints only

Every server is a real process on 127.0.0.1 started here: a ``redis-server`` (Debian's package),
Redis Clusters (``redis-server --cluster-enabled yes`` joined by ``redis-cli --cluster create``)
and the package's ``FakeOpenAIServer``.

**Throughput.** N processes x M threads charge one budget as fast as they can for a few
seconds. Each call goes through runguard's real guard (the sync driver of openai's
``chat.completions.create``) around a provider that answers at once, so what limits the rate
is the budget's store: one reserve script per call (carrying the previous call's settle).
Reported: calls admitted per second, Redis CPU per call (``INFO cpu``, user + sys, over the
run), and the CPU share of the one Redis core the budget's key lives on. A budget is one hash
slot, so on a cluster it lives on one node: its ceiling is one core's worth of scripts.

**Failover.** 8 processes x 16 threads make real ``openai`` calls to the fake server under a
shared ``max_calls`` on a 3-primary cluster with one replica each, ``store_outage="fail_closed"``
and ``?min_replicas=1``. After a quarter of the ceiling, the primary that owns the budget is
killed (SIGKILL); its replica is promoted; once it is, the killed node is restarted and rejoins
as a replica. Refused calls (the store unreachable) wait 20 ms and go on. Reported: calls the
server received against the ceiling (overshoot must be 0), the budget's count after the run,
and the refusals during the failover.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from overhead import provenance  # noqa: E402

MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "Is the benchmark running?"}]


# == a throughput worker =======================================================================
def worker(p: dict) -> dict:
    from openai.types.chat import ChatCompletion

    import runguard_autolog as runguard
    from runguard_autolog._guard import sync_driver
    from runguard_autolog.integrations.openai import CHAT

    runguard.autolog(max_calls="none", max_input_tokens="none", max_output_tokens="none", max_total_tokens="none",
                     max_requests="none", loop_identical_requests="none", loop_repeats="none",
                     store=p["store"], shared_budget=p["budget"], shared_max_calls=10**12)
    guard = sync_driver(CHAT)
    reply = ChatCompletion.model_validate({
        "id": "c", "object": "chat.completion", "created": 0, "model": MODEL,
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "yes"}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
    })
    kwargs = {"model": MODEL, "messages": MESSAGES}
    counts = [0] * p["threads"]
    start_at = p["start_at"]

    def provider(**_):
        return reply

    def run(index: int) -> None:
        while time.time() < start_at:
            time.sleep(0.001)
        deadline = start_at + p["seconds"]
        done = 0
        while time.time() < deadline:
            guard(provider, None, (), kwargs)
            done += 1
        counts[index] = done

    threads = [threading.Thread(target=run, args=(i,)) for i in range(p["threads"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert runguard.flush()
    return {"calls": sum(counts)}


def redis_cpu(ports: list[int]) -> float:
    import redis

    total = 0.0
    for port in ports:
        info = redis.Redis(port=port).info("cpu")
        total += info["used_cpu_user"] + info["used_cpu_sys"]
    return total


def throughput(store: str, ports: list[int], processes: int, threads: int, seconds: float) -> dict:
    import runguard_autolog as runguard

    budget = f"hot-{uuid.uuid4().hex[:6]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNGUARD_")}
    env["PYTHONPATH"] = str(ROOT)
    start_at = time.time() + 2.0 + 0.5 * processes  # every process imported and connected
    params = {"store": store, "budget": budget, "threads": threads, "seconds": seconds, "start_at": start_at}
    workers = [subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(params)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env) for _ in range(processes)]
    while time.time() < start_at:
        time.sleep(0.005)
    cpu_before = redis_cpu(ports)
    time.sleep(seconds)
    cpu_after = redis_cpu(ports)
    calls = 0
    for proc in workers:
        out, err = proc.communicate(timeout=120)
        if proc.returncode != 0 or "Traceback" in err:
            raise SystemExit(err[-3000:])
        calls += json.loads(out.strip().splitlines()[-1])["calls"]
    counted = runguard.current_shared(budget, store=store).calls
    if counted != calls:
        raise SystemExit(f"the budget counted {counted} calls, the workers made {calls}")
    cpu = cpu_after - cpu_before
    return {"processes": processes, "threads": threads, "calls_per_s": calls / seconds,
            "cpu_us_per_call": cpu / calls * 1e6 if calls else 0.0, "core_share": cpu / seconds}


# == failover =================================================================================
def failover(directory: Path, processes: int, threads: int, limit: int) -> dict:
    from runguard_autolog.testing import FakeOpenAIServer
    from tests._servers import LocalRedisCluster, LocalSentinels

    import runguard_autolog as runguard

    name = f"fleet-{uuid.uuid4().hex[:6]}"
    key = f"runguard:{{{name}}}:leases"
    with FakeOpenAIServer() as server, LocalRedisCluster(directory / "failover", primaries=3, replicas=1) as cluster:
        url = cluster.url + "?min_replicas=1"
        params = {"base_url": server.base_url, "threads": threads, "calls_per_thread": 10**6, "through_outage": True,
                  "autolog": {"store": url, "shared_budget": name, "shared_max_calls": limit, "max_calls": "none"}}
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUNGUARD_")}
        env["PYTHONPATH"] = str(ROOT)
        timeline: dict = {}

        def kill() -> None:
            while server.count() < limit // 4:
                time.sleep(0.002)
            owner = cluster.owner(key)
            timeline["killed_at_calls"] = server.count()
            killed = time.monotonic()
            owner.process.kill()
            owner.process.wait()
            owner.process = None
            while cluster.owner(key) is owner:
                time.sleep(0.05)
            cluster.wait_ok()
            timeline["promoted_after_s"] = time.monotonic() - killed
            owner.start()
            cluster.wait_ok()
            LocalSentinels.wait_replicas(cluster.owner(key), 1)
            timeline["replica_back_after_s"] = time.monotonic() - killed

        killer = threading.Thread(target=kill)
        killer.start()
        started = time.monotonic()
        workers = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "_shared_worker.py"), json.dumps(params)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                   for _ in range(processes)]
        results, tracebacks = [], []
        for proc in workers:
            out, err = proc.communicate(timeout=600)
            if proc.returncode != 0:
                raise SystemExit(err[-3000:])
            results.append(json.loads(out.strip().splitlines()[-1]))
            if "Traceback" in err:  # a worker thread that died of an unexpected error
                tracebacks.append(err[err.index("Traceback"):][-2000:])
        killer.join()
        seconds = time.monotonic() - started
        refused = [limit_name for r in results for limit_name, _ in r["refused"]]
        snapshot = runguard.current_shared(name, store=url)
        failed = [error for r in results for error in r.get("failed", [])]
        failed += [f"RunGuardTripped({limit}) after sending" for r in results for limit in r.get("after_sending", [])]
        return {"processes": processes, "threads": threads, "limit": limit, "sent": server.count(),
                "done": sum(r["done"] for r in results), "counted": snapshot.calls,
                "requests_counted": snapshot.requests, "tracebacks": tracebacks, "failed": len(failed), "failed_kinds": sorted(set(failed)),
                "outage_refusals": refused.count("store_outage"), "limit_refusals": refused.count("shared_max_calls"),
                "seconds": seconds, **timeline}


# == report ===================================================================================
def render(rows: dict, fail: dict, quick: bool, seconds: float, version: str) -> str:
    command = "python benchmarks/shared_fleet.py" + (" --quick" if quick else "")
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    overshoot = fail["done"] - fail["limit"]
    ok = overshoot <= 0 and fail["counted"] == fail["done"] and fail["requests_counted"] == fail["sent"]
    lines = [
        f"# Shared budgets at fleet scale ({'quick' if quick else 'full'} run)", "",
        f"{when}; {os.cpu_count()} CPUs ({platform.machine()}); Python {platform.python_version()}, redis-server "
        f"{version}; {provenance()}. `{command}` took {seconds:.0f} s.", "",
        "## Targets", "",
        "| target | measured | result |", "|---|---|---|",
        f"| zero overshoot: {fail['processes']} processes x {fail['threads']} threads, shared max_calls="
        f"{fail['limit']:,} on a cluster, a primary killed mid-run (fail_closed) | calls answered "
        f"{fail['done']:,} (the budget counted {fail['counted']:,}); requests the server received "
        f"{fail['sent']:,} (the budget counted {fail['requests_counted']:,}); overshoot {overshoot} | "
        f"{'PASS' if ok else '**FAIL**'} |", "",
        "A call counts against `max_calls` when its answer arrives; a request that left but whose call "
        "then failed (the SDK raised, or runguard stopped a retry) counts as a request, not a call, and "
        f"frees its hold. Such requests in this run: {fail['sent'] - fail['done']} "
        f"(SDK errors seen by the workers: {fail['failed']}{', ' + ', '.join(fail['failed_kinds']) if fail['failed_kinds'] else ''}); "
        f"worker threads that died of an unexpected error: {len(fail['tracebacks'])}.", "",
        "## Failover", "",
        f"- killed the budget's primary after {fail['killed_at_calls']:,} calls; its replica was promoted "
        f"{fail['promoted_after_s']:.1f} s later; the killed node was back as a replica after "
        f"{fail['replica_back_after_s']:.1f} s;",
        f"- calls refused while the store could not take a durable write (`store_outage`, fail_closed): "
        f"{fail['outage_refusals']:,} (each waited 20 ms and tried again); refused at the ceiling: "
        f"{fail['limit_refusals']:,};",
        f"- the run took {fail['seconds']:.1f} s. Every reserve and settle waited for one replica "
        "(`?min_replicas=1`), so the promoted replica held every call's reservation: nothing admitted was "
        "lost, and the settles the dead primary never acknowledged were sent again (applied once, by id).",
        "", "## Throughput of one budget", "",
        "| store | processes x threads | calls admitted / s | Redis CPU / call (us) | share of one Redis core |",
        "|---|---|---:|---:|---:|",
    ]
    for store, measured in rows.items():
        for row in measured:
            lines.append(f"| {store} | {row['processes']} x {row['threads']} | {row['calls_per_s']:,.0f} | "
                         f"{row['cpu_us_per_call']:.1f} | {row['core_share']:.0%} |")
    lines += [
        "",
        "Each call runs one reserve script (which carries the previous call's settle) on the node "
        "that owns the budget's slot; the client side is runguard's real guard around a provider "
        "that answers at once. Redis runs scripts one at a time on one core, so a budget admits at "
        "most about 1 / (Redis CPU per call) calls per second, whatever the number of clients: "
        "when the share of one core nears 100%, the budget is a hot key. Spread such load over "
        "several budgets (one per tenant, per job or per region, each its own slot and, on a "
        "cluster, possibly its own node). With few processes, each reserve also carries its "
        "process's previous settles, so Redis spends less per call; on this 2-CPU machine, more "
        "client processes compete with Redis for the CPUs.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    from tests._servers import LocalRedisCluster, RedisServer

    started = time.monotonic()
    seconds = 2.0 if args.quick else 5.0
    shapes = [(1, 1), (1, 8), (4, 8)] if args.quick else [(1, 1), (1, 8), (4, 8), (8, 16)]
    rows: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as directory:
        version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
        with RedisServer(Path(directory)) as node:
            rows["one node"] = [throughput(node.url, [node.port], p, t, seconds) for p, t in shapes]
        with LocalRedisCluster(Path(directory) / "cluster") as cluster:
            ports = [n.port for n in cluster.nodes]
            rows["cluster"] = [throughput(cluster.url, ports, p, t, seconds) for p, t in shapes]
        fail = failover(Path(directory), 8, 16, 1000 if args.quick else 3000)
    report = render(rows, fail, args.quick, time.monotonic() - started, version.removeprefix("v="))
    print(report)
    if not args.quick:
        (HERE / "results-fleet.md").write_text(report)


if __name__ == "__main__":
    main()
