"""Shared budgets on every Redis topology the contract names, each a real process started here:
a 3-node Redis Cluster (``redis+cluster://``), including a budget whose slot moves mid-run and a
primary killed mid-run; a Sentinel-managed primary (``redis+sentinel://``) failing over; and a
redis-py client handed to ``store=``. Assertions are on what the fake provider received.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import uuid

import openai
import pytest
import redis
from redis.crc import key_slot

import runguard_autolog as runguard

from ._servers import LocalRedisCluster, LocalSentinels
from .conftest import MESSAGES, MODEL
from .test_report import cli
from .test_shared import run_workers

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
    reason="needs redis-server and redis-cli (Debian packages redis-server and redis-tools; .ci/run installs them)",
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalRedisCluster(tmp_path_factory.mktemp("cluster")) as started:
        yield started


@pytest.fixture
def name():
    return f"job-{uuid.uuid4().hex[:10]}"


def chat(client):
    return client.chat.completions.create(model=MODEL, messages=MESSAGES)


def budget_keys(cluster: LocalRedisCluster, name: str) -> dict[int, list[bytes]]:
    """The budget's keys on each node (by port)."""
    return {node.port: sorted(cluster.admin(node).scan_iter(match=f"runguard:{{{name}}}:*"))
            for node in cluster.nodes if node.process}


def used(url: str, name: str) -> runguard.SharedSnapshot:
    return runguard.current_shared(name, store=url)


# -- Redis Cluster ---------------------------------------------------------------------------
def test_cluster_budget_is_exact_across_processes_and_threads_and_lives_on_one_node(cluster, server, name):
    results = run_workers(server, {"autolog": {"store": cluster.url, "shared_budget": name, "shared_max_calls": 40,
                                               "max_calls": "none"},
                                   "threads": 8, "calls_per_thread": 20}, processes=3)
    assert sum(r["done"] for r in results) == 40 == server.count()
    assert {tuple(r) for w in results for r in w["refused"]} == {("shared_max_calls", f"shared:{name}")}
    snapshot = used(cluster.url, name)
    assert snapshot.calls == 40 and snapshot.in_flight == 0
    keys = budget_keys(cluster, name)
    owner = cluster.owner(f"runguard:{{{name}}}:leases").port
    assert keys[owner] and not any(found for port, found in keys.items() if port != owner)
    status = cli("status", "--shared", name, "--store", cluster.url, "--json")  # an operator's view
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["calls"] == 40
    assert json.loads(status.stdout)["tripped"]["limit"] == "shared_max_calls"
    assert cli("reset", "--shared", name, "--store", cluster.url).returncode == 0
    assert not any(budget_keys(cluster, name).values())


def test_cluster_tenants_spread_over_nodes_each_hold_their_own_ceiling(cluster, server, client):
    tenants = [f"tenant-{uuid.uuid4().hex[:8]}" for _ in range(8)]
    runguard.autolog(store=cluster.url, max_calls="none")
    for tenant in tenants:
        for _ in range(5):
            try:
                with runguard.session(shared_budget=tenant, shared_max_calls=3):
                    chat(client)
            except runguard.RunGuardTripped as trip:
                assert trip.limit == "shared_max_calls" and trip.scope == f"shared:{tenant}"
    runguard.flush()
    assert server.count() == 3 * len(tenants)
    assert all(used(cluster.url, tenant).calls == 3 for tenant in tenants)
    assert len({cluster.owner(f"runguard:{{{tenant}}}:leases").port for tenant in tenants}) > 1


def _migrate(cluster: LocalRedisCluster, slot: int, source, target, pause: float) -> None:
    """Move ``slot`` from ``source`` to ``target`` the way ``redis-cli --cluster reshard`` does,
    key by key, pausing in each state (MIGRATING/IMPORTING: ASK; keys split: TRYAGAIN; done: MOVED)."""
    src, dst = cluster.admin(source), cluster.admin(target)
    dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", cluster.node_id(source))
    src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", cluster.node_id(target))
    time.sleep(pause)
    while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1):
        src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
        time.sleep(pause / 4)
    for node in cluster.nodes:
        cluster.admin(node).execute_command("CLUSTER", "SETSLOT", slot, "NODE", cluster.node_id(target))


def _errors(cluster: LocalRedisCluster, node, kind: str) -> int:
    return int(cluster.admin(node).info("errorstats").get(f"errorstat_{kind}", {}).get("count", 0))


def test_cluster_a_budget_whose_slot_moves_mid_run_stays_exact(cluster, server, client, name):
    slot = key_slot(f"runguard:{{{name}}}:leases".encode())
    source = cluster.owner(f"runguard:{{{name}}}:leases")
    target = next(node for node in cluster.nodes if node is not source)
    moved_before = _errors(cluster, source, "MOVED")
    asked_before = _errors(cluster, source, "ASK")
    runguard.autolog(store=cluster.url, shared_budget=name, shared_max_calls=150, max_calls="none")
    refused, done, lock = [], [0], threading.Lock()

    def work():
        while True:
            try:
                chat(client)
            except runguard.RunGuardTripped as trip:
                with lock:
                    refused.append(trip.limit)
                if trip.limit != "shared_max_calls":
                    time.sleep(0.01)
                    continue
                return
            with lock:
                done[0] += 1
            time.sleep(0.002)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    while done[0] < 20:
        time.sleep(0.01)
    _migrate(cluster, slot, source, target, pause=0.3)
    for thread in threads:
        thread.join(60)
    assert runguard.flush()
    assert server.count() == done[0] == 150
    # redirections are followed, not outages (a loaded machine may still time out a call or two)
    assert "shared_max_calls" in refused and refused.count("store_outage") <= 2
    assert cluster.owner(f"runguard:{{{name}}}:leases") is target
    snapshot = used(cluster.url, name)
    assert snapshot.calls == 150 and snapshot.in_flight == 0
    assert not budget_keys(cluster, name)[source.port]
    assert _errors(cluster, source, "MOVED") > moved_before  # the client was told, and followed
    assert _errors(cluster, source, "ASK") > asked_before


def test_cluster_node_not_answering_is_an_outage_then_recovers(cluster, server, client, name):
    runguard.autolog(store=cluster.url, shared_budget=name, shared_max_calls=10, max_calls="none")
    chat(client)
    owner = cluster.owner(f"runguard:{{{name}}}:leases")
    owner.freeze()
    try:
        with pytest.raises(runguard.RunGuardTripped) as refused:
            chat(client)
        assert refused.value.limit == "store_outage"
    finally:
        owner.thaw()
    time.sleep(1.1)  # the store is probed again after a second
    chat(client)
    assert runguard.flush()
    assert server.count() == 2 == used(cluster.url, name).calls


def test_cluster_primary_killed_mid_run_never_overshoots(tmp_path, server, name):
    """Three primaries with a replica each; every reserve and settle is acknowledged by a replica
    (``?min_replicas=1``), so the promoted replica has every hold: zero overshoot, exact count.
    Calls are refused (fail_closed) from the kill until the killed node is back as a replica."""
    with LocalRedisCluster(tmp_path, primaries=3, replicas=1) as replicated:
        url = replicated.url + "?min_replicas=1"
        params = {"autolog": {"store": url, "shared_budget": name, "shared_max_calls": 300, "max_calls": "none"},
                  "threads": 8, "calls_per_thread": 100000, "through_outage": True}
        killer = threading.Thread(target=_kill_owner_after, args=(replicated, server, name, 60))
        killer.start()
        results = run_workers(server, params, processes=4)
        killer.join()
        assert sum(r["done"] for r in results) == server.count() == 300
        refusals = {limit for w in results for limit, _ in w["refused"]}
        assert refusals == {"store_outage", "shared_max_calls"}  # refused during the failover
        snapshot = used(url, name)
        assert snapshot.calls == 300 and snapshot.in_flight == 0


def _kill_owner_after(cluster: LocalRedisCluster, server, name: str, calls: int) -> None:
    deadline = time.monotonic() + 60
    while server.count() < calls and time.monotonic() < deadline:
        time.sleep(0.005)
    owner = cluster.owner(f"runguard:{{{name}}}:leases")
    os.kill(owner.process.pid, signal.SIGKILL)
    owner.process.wait()
    owner.process = None
    while cluster.owner(f"runguard:{{{name}}}:leases") is owner:  # until its replica is promoted
        time.sleep(0.05)
    cluster.wait_ok()  # its replica is the primary now, with no replica of its own: writes refused
    time.sleep(0.5)
    # NB: restarted before the failover, an empty primary without persistence would win (Redis's
    # own warning about auto-restarting primaries with persistence off): every count lost
    owner.start()  # back (as orchestrators restart it), it rejoins as the new primary's replica
    cluster.wait_ok()
    LocalSentinels.wait_replicas(cluster.owner(f"runguard:{{{name}}}:leases"), 1)


# -- Sentinel --------------------------------------------------------------------------------
@pytest.fixture
def sentinels(tmp_path):
    with LocalSentinels(tmp_path) as started:
        yield started


def test_sentinel_budget_is_exact_and_follows_the_primary_through_a_failover(sentinels, server, name):
    url = sentinels.url(min_replicas="1")
    params = {"autolog": {"store": url, "shared_budget": name, "shared_max_calls": 200, "max_calls": "none"},
              "threads": 8, "calls_per_thread": 100000, "through_outage": True}
    old = sentinels.primary()

    def kill_primary():
        deadline = time.monotonic() + 60
        while server.count() < 50 and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(old.process.pid, signal.SIGKILL)
        old.process.wait()
        old.process = None

    killer = threading.Thread(target=kill_primary)
    killer.start()
    results = run_workers(server, params, processes=3)
    killer.join()
    new = sentinels.wait_failover(old)
    assert new is not old
    assert sum(r["done"] for r in results) == server.count() == 200
    refusals = {limit for w in results for limit, _ in w["refused"]}
    assert refusals == {"store_outage", "shared_max_calls"}  # fail_closed during the failover
    snapshot = used(url, name)
    assert snapshot.calls == 200 and snapshot.in_flight == 0


def test_sentinel_url_without_a_reachable_sentinel_is_an_outage(server, client, name):
    runguard.autolog(store="redis+sentinel://127.0.0.1:1/runguard/0", shared_budget=name, shared_max_calls=5,
                     max_calls="none")
    with pytest.raises(runguard.RunGuardTripped) as refused:
        chat(client)
    assert refused.value.limit == "store_outage"
    assert server.count() == 0


# -- a redis-py client handed to store= --------------------------------------------------------
def _clients(kind: str, cluster: LocalRedisCluster, tmp_path):
    if kind == "redis":
        url = os.environ.get("RG_TEST_REDIS_URL")
        if not url:
            pytest.skip("RG_TEST_REDIS_URL is not set (.ci/run starts a redis-server)")
        return redis.Redis.from_url(url), None
    if kind == "cluster":
        from redis.cluster import ClusterNode, RedisCluster

        return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", cluster.nodes[0].port)]), None
    from redis.sentinel import Sentinel

    group = LocalSentinels(tmp_path, replicas=0).start()
    primary = Sentinel([("127.0.0.1", s.port) for s in group.sentinels]).master_for(group.SERVICE)
    return primary, group


@pytest.mark.parametrize("kind", ["redis", "cluster", "sentinel"])
def test_store_accepts_a_redis_py_client(kind, cluster, server, client, name, tmp_path):
    store, group = _clients(kind, cluster, tmp_path)
    try:
        runguard.autolog(store=store, shared_budget=name, shared_max_calls=3, max_calls="none")
        for _ in range(3):
            chat(client)
        with pytest.raises(runguard.RunGuardTripped) as refused:
            chat(client)
        assert refused.value.limit == "shared_max_calls"
        assert runguard.flush()
        assert server.count() == 3 == runguard.current_shared().calls
        assert "client>" in runguard.config()
    finally:
        runguard.autolog(store="memory")
        if group is not None:
            group.stop()


# -- store URLs ------------------------------------------------------------------------------
@pytest.mark.parametrize("url, named", [
    ("redis+cluster://127.0.0.1:7000,127.0.0.1:7001?retries=3", "unknown option 'retries'"),
    ("redis+cluster://127.0.0.1:7000?socket_timeout=soon", "socket_timeout must be a number"),
    ("redis+sentinel://127.0.0.1:26379", "names the primary"),
    ("redis+cluster://127.0.0.1:7000/2", "only database 0"),
    ("redis://127.0.0.1:6379/0?min_replicas=-1", "min_replicas"),
    ("redis+cluster://u:s3cret@127.0.0.1", "host:port"),
])
def test_a_bad_store_url_is_an_error_naming_it_without_its_password(url, named, monkeypatch):
    with pytest.raises(runguard.RunGuardConfigError) as bad:
        runguard.autolog(store=url, shared_budget="b", shared_max_calls=1)
    assert "store=" in str(bad.value) and named in str(bad.value) and "s3cret" not in str(bad.value)
    monkeypatch.setenv("RUNGUARD_STORE", url)
    with pytest.raises(runguard.RunGuardConfigError) as bad:
        runguard.autolog(shared_budget="b", shared_max_calls=1)
    assert "RUNGUARD_STORE" in str(bad.value) and "s3cret" not in str(bad.value)


def test_a_store_url_keeps_its_own_socket_timeout(private_redis, server, client, name):
    """``?socket_timeout=2``: a store slower than runguard's default 0.25 s is waited for."""
    runguard.autolog(store=private_redis.url + "?socket_timeout=2", shared_budget=name, shared_max_calls=5,
                     max_calls="none")
    chat(client)
    admin = redis.Redis.from_url(private_redis.url, socket_timeout=5)
    sleeper = threading.Thread(target=admin.execute_command, args=("DEBUG", "SLEEP", 0.5))
    sleeper.start()
    time.sleep(0.05)
    chat(client)  # waited for, not an outage
    sleeper.join()
    assert runguard.flush()
    assert server.count() == 2 == runguard.current_shared().calls


# -- failure paths found by a red-team pass (each failed before its fix) ------------------------
def test_a_cluster_primary_that_hangs_is_replaced_once_its_replica_takes_over(tmp_path, server, client, name):
    """The old primary is frozen (it accepts, never answers) and its replica takes over: the
    client's read timeout must make it read the slot map again, not refuse for good."""
    with LocalRedisCluster(tmp_path, primaries=3, replicas=1) as replicated:
        runguard.autolog(store=replicated.url, shared_budget=name, shared_max_calls=50, max_calls="none")
        chat(client)
        key = f"runguard:{{{name}}}:leases"
        owner = replicated.owner(key)
        owner_id = replicated.node_id(owner)
        replica = next(node for node in replicated.nodes if node is not owner and any(
            line.split()[3] == owner_id for line in
            replicated.admin(node).execute_command("CLUSTER", "NODES").decode().splitlines()
            if "myself" in line and "slave" in line))
        owner.freeze()
        try:
            replicated.admin(replica).execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                live = next(n for n in replicated.nodes if n is not owner and n is not replica)
                slots = replicated.slot_map(live)
                if any(port == replica.port for _, _, port in slots):
                    break
                time.sleep(0.05)
            outcomes = []
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    chat(client)
                    outcomes.append("sent")
                    break
                except runguard.RunGuardTripped as trip:
                    outcomes.append(trip.limit)
                    time.sleep(0.2)
            assert outcomes[-1] == "sent", outcomes
        finally:
            owner.thaw()
        assert runguard.flush()
        assert server.count() == 2 == used(replicated.url, name).calls


def test_an_applications_own_client_keeps_its_pool_and_its_timeouts(server, client, name):
    url = os.environ.get("RG_TEST_REDIS_URL")
    if not url:
        pytest.skip("RG_TEST_REDIS_URL is not set (.ci/run starts a redis-server)")
    app = redis.Redis.from_url(url, max_connections=4)
    runguard.autolog(store=app, shared_budget=name, shared_max_calls=100, max_calls="none")
    threads = [threading.Thread(target=chat, args=(client,)) for _ in range(8)]  # a connection each
    for thread in threads:
        thread.start()
        thread.join()
    assert runguard.flush()
    assert server.count() == 8 == runguard.current_shared().calls
    assert app.set(f"{name}-app", "1") and app.get(f"{name}-app") == b"1"  # its pool is its own
    dead = redis.Redis(host="127.0.0.1", port=free_dead_port())  # redis-py's default: retries with backoff
    runguard.autolog(store=dead, shared_budget=name, shared_max_calls=100, max_calls="none")
    started = time.monotonic()
    with pytest.raises(runguard.RunGuardTripped) as refused:
        chat(client)
    assert refused.value.limit == "store_outage"
    assert time.monotonic() - started < 2  # runguard's bound, not the client's seconds of backoff


def free_dead_port() -> int:
    from ._servers import free_port

    return free_port()


def test_runguards_own_failure_in_an_async_shared_reserve_sends_the_call_once_unguarded(
        private_redis, server, name, monkeypatch, caplog):
    import asyncio

    from runguard_autolog import _runtime
    from runguard_autolog._shared import SharedStore

    runguard.autolog(store=private_redis.url, shared_budget=name, shared_max_calls=5, max_calls=5)
    _runtime.set_strict(False)
    monkeypatch.setattr(SharedStore, "budgets", lambda self, charges: {}["a runguard bug"])
    try:
        async def call():
            aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key="test", max_retries=0)
            return await aclient.chat.completions.create(model=MODEL, messages=MESSAGES)

        assert asyncio.run(call()).choices[0].message.content
    finally:
        _runtime.set_strict(True)
    assert server.count() == 1
    assert "unguarded" in caplog.text
    assert runguard.current().calls == 0  # its local hold was released, not leaked


def test_a_retry_whose_reply_is_lost_is_counted_once(private_redis, server, name, monkeypatch):
    from runguard_autolog import _runtime
    from runguard_autolog.testing import Reply

    runguard.autolog(store=private_redis.url, shared_budget=name, shared_max_calls=10, max_calls="none")
    retrying = openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=1)
    chat(retrying)  # this thread's connection exists now
    conn = _runtime.RUNTIME.store.client._transport._connections.by_node[None]
    real, lost = conn.read_response, []

    def lose_the_retry_scripts_reply(*args, **kwargs):
        reply = real(*args, **kwargs)
        if reply == [1] and not lost:  # the retry script admitted the attempt on the server...
            lost.append(reply)
            raise redis.exceptions.ConnectionError("connection reset")  # ...and its reply was lost
        return reply

    monkeypatch.setattr(conn, "read_response", lose_the_retry_scripts_reply)
    server.script(Reply(status=500))  # the next call's first attempt fails; the SDK retries
    chat(retrying)
    assert lost
    assert runguard.flush()
    snapshot = runguard.current_shared()
    assert server.count() == 3 == snapshot.requests  # the re-sent retry script counted once
    assert snapshot.calls == 2


@pytest.mark.parametrize("url", [
    "redis+cluster://user:p@ss0rd@127.0.0.1:1,127.0.0.1:2",
    "redis+cluster://user:pa/ss0rd@127.0.0.1:1,127.0.0.1:2",
    "redis+cluster://user:a?ss0rd#x@127.0.0.1:1,127.0.0.1:2",
    "redis+sentinel://user:p@ss0rd@127.0.0.1:1,127.0.0.1:2/svc/0",
])
def test_a_password_with_at_slash_or_question_mark_never_shows(url, server, client, caplog):
    runguard.autolog(store=url, shared_budget="pw", shared_max_calls=5, max_calls="none")
    with pytest.raises(runguard.RunGuardTripped) as refused:
        chat(client)
    shown = str(refused.value) + caplog.text + runguard.config()
    assert "ss0rd" not in shown and "user:***@" in shown
    assert server.count() == 0
