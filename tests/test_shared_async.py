"""Async SDK calls on a shared budget reserve through the store's I/O threads, so the event
loop serves other tasks while Redis answers: exact under 200 concurrent tasks, a cancelled task
holds nothing, a retry is counted once, and a slow Redis never freezes the loop. Each test runs
against a real ``redis-server`` of its own (``DEBUG SLEEP`` makes it slow on purpose).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import openai
import pytest
import redis

import runguard_autolog as runguard
from runguard_autolog import _runtime, _shared
from runguard_autolog.testing import Reply

from .conftest import MESSAGES, MODEL


@pytest.fixture
def name():
    return f"job-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def aclient(server):
    return openai.AsyncOpenAI(base_url=server.base_url, api_key="test", max_retries=0)


async def achat(client):
    return await client.chat.completions.create(model=MODEL, messages=MESSAGES)


def _sleep_redis(url: str, seconds: float) -> threading.Thread:
    """Make Redis answer nothing for ``seconds`` (below the client's 0.25 s timeout)."""
    started = threading.Event()

    def sleep():
        admin = redis.Redis.from_url(url, socket_timeout=5)
        admin.ping()
        started.set()
        admin.execute_command("DEBUG", "SLEEP", seconds)

    thread = threading.Thread(target=sleep)
    thread.start()
    started.wait(5)
    time.sleep(0.02)  # the DEBUG SLEEP is on its way
    return thread


def test_a_slow_store_never_freezes_the_event_loop(private_redis, server, aclient, name):
    runguard.autolog(store=private_redis.url, shared_budget=name, shared_max_calls=100, max_calls="none")

    async def scenario():
        await achat(aclient)  # the store's connections exist now
        ticks: list[float] = []
        asleep = _sleep_redis(private_redis.url, 0.2)
        until = time.monotonic() + 0.15  # well inside the store's sleep

        async def ticker():
            while time.monotonic() < until:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.002)

        await asyncio.gather(ticker(), *(achat(aclient) for _ in range(20)))
        asleep.join()
        return ticks

    ticks = asyncio.run(scenario())
    # a loop blocked on the store's round trip would tick once, then not until Redis woke up
    assert len(ticks) >= 10, f"the event loop ticked {len(ticks)} times while the store slept"
    assert runguard.flush()
    assert server.count() == 21 == runguard.current_shared().calls


def test_two_hundred_concurrent_tasks_hold_the_shared_ceiling_exactly(private_redis, server, aclient, name):
    runguard.autolog(store=private_redis.url, shared_budget=name, shared_max_calls=57, max_calls="none")

    async def one():
        try:
            await achat(aclient)
            return "sent"
        except runguard.RunGuardTripped as trip:
            return trip.limit

    async def scenario():
        return await asyncio.gather(*(one() for _ in range(200)))

    outcomes = asyncio.run(scenario())
    assert outcomes.count("sent") == 57 == server.count()
    assert set(outcomes) == {"sent", "shared_max_calls"}
    assert runguard.flush()
    snapshot = runguard.current_shared()
    assert snapshot.calls == 57 and snapshot.in_flight == 0


def test_a_task_cancelled_while_it_waits_for_the_store_holds_nothing(private_redis, server, aclient, name):
    runguard.autolog(store=private_redis.url, shared_budget=name, shared_max_calls=5, max_calls=100)

    async def scenario():
        await achat(aclient)
        asleep = _sleep_redis(private_redis.url, 0.2)
        tasks = [asyncio.ensure_future(achat(aclient)) for _ in range(4)]
        await asyncio.sleep(0.05)  # every task is waiting for its reserve now
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        asleep.join()
        return results

    results = asyncio.run(scenario())
    assert all(isinstance(result, asyncio.CancelledError) for result in results)
    time.sleep(0.3)  # reserves that did reach the store are released as they complete
    assert runguard.flush()
    assert server.count() == 1
    snapshot = runguard.current_shared()
    assert snapshot.calls == 1 and snapshot.in_flight == 0
    held = redis.Redis.from_url(private_redis.url).hget(f"runguard:{{{name}}}:w:0", "r0")
    assert float(held or 0) == 0
    assert runguard.current().calls == 1  # the process scope holds nothing for them either

    async def more(count):  # a client per event loop (httpx binds its connections to one)
        fresh = openai.AsyncOpenAI(base_url=server.base_url, api_key="test", max_retries=0)
        for _ in range(count):
            await achat(fresh)

    asyncio.run(more(4))  # the whole ceiling is still there: 1 + 4 = 5
    assert server.count() == 5
    with pytest.raises(runguard.RunGuardTripped) as refused:
        asyncio.run(more(1))
    assert refused.value.limit == "shared_max_calls"


def test_an_async_retry_is_admitted_off_the_loop_and_counted_once(private_redis, server, name):
    runguard.autolog(store=private_redis.url, shared_budget=name, shared_max_calls=10, max_calls="none")
    server.script(Reply(status=500), Reply(status=500))  # then the default: 200
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="test", max_retries=2)

    async def scenario():
        return await achat(client)

    asyncio.run(scenario())
    assert runguard.flush()
    snapshot = runguard.current_shared()
    assert server.count() == 3 == snapshot.requests
    assert snapshot.calls == 1 and snapshot.in_flight == 0


def test_the_io_threads_are_few_and_shared_by_every_budget(private_redis, server, aclient):
    runguard.autolog(store=private_redis.url, max_calls="none")

    async def tenant(index):
        with runguard.session(shared_budget=f"tenant-{index}", shared_max_calls=2):
            await achat(aclient)

    async def scenario():
        await asyncio.gather(*(tenant(index) for index in range(300)))

    asyncio.run(scenario())
    assert runguard.flush()
    io_threads = [t for t in threading.enumerate() if t.name.startswith("runguard-store-io")]
    assert 0 < len(io_threads) <= _shared.IO_THREADS == 2
    assert server.count() == 300
    clients = redis.Redis.from_url(private_redis.url).client_list()
    assert len(clients) <= 2 + 2 + 1  # I/O threads, this thread and the writer, the admin
    assert _runtime.RUNTIME.store.client._transport is not None


def test_ten_thousand_budget_names_in_one_process(private_redis, server):
    """10,000 tenants, each with its own budget, from async tasks: no thread or connection per
    name, no budget kept once its calls settled, every tenant's count exact in Redis."""
    runguard.autolog(store=private_redis.url, max_calls="none")
    store_client = _runtime.RUNTIME.store.client
    tenants = [f"tenant:{uuid.uuid4().hex[:6]}:{i}" for i in range(10_000)]

    async def tenant(client, budget):
        with runguard.session(shared_budget=budget, shared_max_calls=1):
            await achat(client)

    async def scenario():
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="test", max_retries=0)
        for first in range(0, len(tenants), 200):
            await asyncio.gather(*(tenant(client, budget) for budget in tenants[first:first + 200]))

    asyncio.run(scenario())
    assert runguard.flush()
    import gc

    gc.collect()
    assert len(store_client._budgets) == 0
    assert not store_client._pending and not store_client._live and not store_client._unsettled
    assert server.count() == 10_000
    names = [t.name for t in threading.enumerate()]
    assert names.count("runguard-shared-budget") == 1 and sum(n.startswith("runguard-store-io") for n in names) <= 2
    assert len(redis.Redis.from_url(private_redis.url).client_list()) <= 2 + 2 + 1
    admin = redis.Redis.from_url(private_redis.url)
    pipe = admin.pipeline(transaction=False)
    for budget in tenants:
        pipe.hget(f"runguard:{{{budget}}}:w:0", "u0")
    assert {float(used) for used in pipe.execute()} == {1.0}

    async def again():  # each tenant's budget is spent: refused by its own budget
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="test", max_retries=0)
        for budget in tenants[::1000]:
            with pytest.raises(runguard.RunGuardTripped) as refused:
                await tenant(client, budget)
            assert refused.value.scope == f"shared:{budget}"

    asyncio.run(again())
    assert server.count() == 10_000
