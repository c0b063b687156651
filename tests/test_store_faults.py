"""A shared store that answers errors, times out, or is copied by fork(): every store error is
an outage (``store_outage`` decides, never a silent admit); reserve and settle are applied
once across timeouts, so the budget's counters equal what the provider received; a failed
settle leaks no hold; a forked child never inherits a held lock. Real ``redis-server``
processes of the tests' own."""

from __future__ import annotations

import os
import threading
import time
import uuid

import pytest
import redis

import runguard_autolog as runguard
from runguard_autolog import _runtime

from ._servers import RedisServer
from .conftest import chat


@pytest.fixture(autouse=True)
def lenient():
    _runtime.set_strict(False)
    yield
    _runtime.set_strict(True)


@pytest.fixture
def name():
    return f"faults-{uuid.uuid4().hex[:10]}"


def _leases(url: str, name: str) -> int:
    return redis.Redis.from_url(url).zcard(f"runguard:{{{name}}}:leases")


def _outcomes(client, count: int) -> list[str]:
    seen = []
    for _ in range(count):
        try:
            chat(client)
            seen.append("sent")
        except runguard.RunGuardTripped as trip:
            seen.append(trip.limit)
    return seen


def test_a_store_out_of_memory_is_an_outage_not_an_admit(client, server, private_redis, name):
    runguard.autolog(store=private_redis.url, shared_budget=name, shared_max_calls=3, max_calls="none")
    chat(client)
    admin = redis.Redis.from_url(private_redis.url)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", "1")
    assert set(_outcomes(client, 20)) == {"store_outage"}
    assert server.count() == 1  # nothing sent past the budget while it could not be charged
    admin.config_set("maxmemory", "0")
    time.sleep(1.1)  # the store is probed again
    assert _outcomes(client, 4) == ["sent", "sent", "shared_max_calls", "shared_max_calls"]
    runguard.flush()
    assert runguard.current_shared().calls == server.count() == 3
    assert _leases(private_redis.url, name) == 0


def test_a_read_only_replica_is_an_outage_not_an_admit(client, server, private_redis, tmp_path, name):
    (tmp_path / "replica").mkdir()
    replica = RedisServer(tmp_path / "replica").start()
    try:
        redis.Redis.from_url(replica.url).replicaof("127.0.0.1", private_redis.port)
        runguard.autolog(store=replica.url, shared_budget=name, shared_max_calls=3, max_calls="none")
        assert set(_outcomes(client, 20)) == {"store_outage"}
        assert server.count() == 0
    finally:
        runguard.autolog(disable=True)
        replica.stop()


def test_a_failed_settle_is_sent_again_and_counted_once_with_no_hold_left(client, server, private_redis, name):
    runguard.autolog(store=private_redis.url, shared_budget=name, shared_max_calls=10, max_calls="none")
    admin = redis.Redis.from_url(private_redis.url)
    admin.config_set("maxmemory-policy", "noeviction")
    chat(client)
    admin.config_set("maxmemory", "1")  # the settle the writer sends is refused
    time.sleep(0.3)
    admin.config_set("maxmemory", "0")
    time.sleep(1.1)
    chat(client)  # the store answers again: what it missed is reconciled
    runguard.flush()
    shared = runguard.current_shared()
    assert shared.calls == server.count() == 2
    assert shared.in_flight == 0 and _leases(private_redis.url, name) == 0
    assert float(admin.hget(f"runguard:{{{name}}}:w:0", "r0") or 0) == 0  # no hold leaked


@pytest.mark.parametrize("policy", ["fail_closed", "fail_open"])
def test_timeouts_never_double_count_nor_orphan_leases(client, server, private_redis, name, policy):
    runguard.autolog(store=private_redis.url, shared_budget=name, shared_max_calls=100, max_calls="none",
                     store_outage=policy)
    admin = redis.Redis.from_url(private_redis.url)
    for _ in range(3):
        chat(client)
        sleeper = threading.Thread(target=lambda: redis.Redis.from_url(private_redis.url).execute_command(
            "DEBUG", "SLEEP", "1"))
        sleeper.start()
        time.sleep(0.05)
        try:
            chat(client)  # its reserve times out while the server sleeps (and runs it afterwards)
        except runguard.RunGuardTripped as trip:
            assert trip.limit == "store_outage" and policy == "fail_closed"
        sleeper.join()
        time.sleep(1.1)
    chat(client)
    runguard.flush()
    time.sleep(0.2)
    runguard.flush()
    assert runguard.current_shared().calls == server.count()
    assert _leases(private_redis.url, name) == 0
    assert float(admin.hget(f"runguard:{{{name}}}:w:0", "r0") or 0) == 0


def _fork_and_call(client, held_lock, before=None) -> int:
    """fork() while another thread holds ``held_lock``; the child runs ``before()`` (if given),
    then makes one guarded call."""
    acquired, release = threading.Event(), threading.Event()

    def hold():
        with held_lock():
            acquired.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    acquired.wait(5)
    try:
        pid = os.fork()
        if pid == 0:  # the child: one call, then out, whatever happens
            code = 1
            try:
                if before is not None:
                    before()
                chat(client)
                code = 0 if runguard.current().calls >= 1 else 3
            finally:
                os._exit(code)
    finally:
        release.set()
        holder.join()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return -1


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_fork_while_another_thread_holds_the_store_lock_does_not_deadlock_the_child(client, server):
    runguard.autolog(max_calls=10)
    chat(client)
    assert _fork_and_call(client, lambda: _runtime.RUNTIME.local._lock) == 0
    assert server.count() == 2


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_fork_while_a_thread_holds_the_shared_budgets_lock_does_not_deadlock_the_child(client, server,
                                                                                       private_redis, name):
    runguard.autolog(store=private_redis.url, shared_budget=name, shared_max_calls=10, max_calls="none")
    chat(client)
    budget = _runtime.RUNTIME.store.budget
    assert _fork_and_call(client, lambda: budget.client._lock) == 0
    assert server.count() == 2


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_fork_while_a_thread_holds_the_store_registry_lock_does_not_deadlock_the_child(client, server,
                                                                                      private_redis, name):
    from runguard_autolog import _shared

    runguard.autolog(store=private_redis.url, shared_budget=name, shared_max_calls=10, max_calls="none")
    chat(client)
    configure = lambda: runguard.autolog(store=private_redis.url, shared_budget=name, shared_max_calls=10,  # noqa
                                         max_calls="none", shared_lease_s=7)  # a new client: the registry lock
    assert _fork_and_call(client, lambda: _shared._CLIENTS_LOCK, configure) == 0
    assert server.count() == 2


def test_a_reserve_resent_after_its_reply_was_lost_is_held_once(client, server, private_redis, name, monkeypatch):
    runguard.autolog(store=private_redis.url, shared_budget=name, shared_max_calls=10, max_calls="none")
    chat(client)  # this thread's connection to the store exists now
    conn = _runtime.RUNTIME.store.client._transport._connections.by_node[None]
    real, lost = conn.read_response, []

    def lose_the_first_reply(*args, **kwargs):
        reply = real(*args, **kwargs)  # the script ran on the server...
        if not lost:
            lost.append(reply)
            raise redis.exceptions.ConnectionError("connection reset")  # ...and its reply was lost
        return reply

    monkeypatch.setattr(conn, "read_response", lose_the_first_reply)
    chat(client)  # the reserve is sent again on a fresh connection
    assert lost
    runguard.flush()
    assert runguard.current_shared().calls == server.count() == 2
    assert _leases(private_redis.url, name) == 0
    admin = redis.Redis.from_url(private_redis.url)
    assert float(admin.hget(f"runguard:{{{name}}}:w:0", "r0") or 0) == 0  # held once, released once
