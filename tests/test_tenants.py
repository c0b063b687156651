"""Per-tenant shared budgets: ``runguard.session(shared_budget=f"tenant:{t}", shared_max_*=…)``
charges a budget named at run time beside the process-wide one, exactly, across threads and
processes; the web middlewares name it from the request; the client state stays bounded however
many tenants appear. All against a real ``redis-server`` and the loopback fake OpenAI server.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import redis

import runguard_autolog as runguard
from runguard_autolog import _runtime, _shared, asgi, wsgi
from runguard_autolog.testing import Reply

from .conftest import MESSAGES, MODEL
from .test_middleware import Routes, flask_app, serve_asgi, serve_wsgi, starlette_app
from .test_shared import name, redis_url, run_workers  # noqa: F401 (fixtures)


def chat(client: openai.OpenAI, **extra) -> object:
    return client.chat.completions.create(model=MODEL, messages=MESSAGES, **extra)


def window(url: str, budget: str) -> dict[str, float]:
    """The budget's counters as the store keeps them (window 0: no window)."""
    raw = redis.Redis.from_url(url).hgetall(f"runguard:{{{budget}}}:w:0")
    return {key.decode(): float(value) for key, value in raw.items() if key != b"trip"}


def leases(url: str, budget: str) -> int:
    return redis.Redis.from_url(url).zcard(f"runguard:{{{budget}}}:leases")


def tenant_call(client: openai.OpenAI, budget: str, **limits) -> str:
    try:
        with runguard.session(shared_budget=budget, **limits):
            chat(client)
        return "ok"
    except runguard.RunGuardTripped as error:
        return f"{error.limit} {error.scope}"


def test_each_tenant_has_its_own_ceiling_beside_the_process_budget(client, server, redis_url, name):
    runguard.autolog(store=redis_url, shared_budget=f"{name}-all", shared_max_calls=100, max_calls="none")
    a, b = f"tenant:{name}:a", f"tenant:{name}:b"
    results = [tenant_call(client, a, shared_max_calls=3) for _ in range(5)]
    results += [tenant_call(client, b, shared_max_calls=3) for _ in range(2)]
    assert results == ["ok"] * 3 + [f"shared_max_calls shared:{a}"] * 2 + ["ok"] * 2
    assert server.count() == 5
    assert runguard.flush()
    assert runguard.current_shared(a).calls == 3
    assert runguard.current_shared(a).tripped is not None
    assert runguard.current_shared(b).calls == 2
    assert runguard.current_shared(b).tripped is None
    assert runguard.current_shared().calls == 5  # the process-wide budget saw every call sent, no more
    for budget in (a, b, f"{name}-all"):  # refused calls released what they held in the other budget
        assert window(redis_url, budget).get("r0", 0) == 0
        assert leases(redis_url, budget) == 0


def test_a_tenant_budget_without_a_process_budget_and_its_cost_ceiling(client, server, redis_url, name):
    runguard.autolog(store=redis_url, max_calls="none")  # a store, no process-wide budget
    tenant = f"tenant:{name}"
    server.default = Reply(usage=(1000, 1000))
    # gpt-4o-mini: 0.15 + 0.6 USD per million tokens -> 0.00075 USD a call
    results = [tenant_call(client, tenant, shared_max_cost_usd=0.002) for _ in range(4)]
    assert results[:3] == ["ok"] * 3
    assert results[3] == f"shared_max_cost_usd shared:{tenant}"
    assert server.count() == 3
    runguard.flush()
    snap = runguard.current_shared(tenant)
    assert snap.calls == 3 and snap.cost_usd == pytest.approx(3 * 0.00075)


def test_tenants_are_exact_under_threads(server, redis_url, name):
    runguard.autolog(store=redis_url, shared_budget=f"{name}-all", max_calls="none")
    client = openai.OpenAI(base_url=server.base_url, api_key="t", max_retries=0)
    tenants = [f"tenant:{name}:{i}" for i in range(4)]
    server.default = Reply(delay=0.005)

    def work(worker: int) -> list[str]:
        budget = tenants[worker % len(tenants)]
        return [tenant_call(client, budget, shared_max_calls=7) for _ in range(6)]

    with ThreadPoolExecutor(16) as pool:
        outcomes = [result for results in pool.map(work, range(16)) for result in results]
    assert outcomes.count("ok") == server.count() == 4 * 7
    runguard.flush()
    assert [runguard.current_shared(t).calls for t in tenants] == [7] * 4
    assert runguard.current_shared().calls == 28


def test_tenants_are_exact_across_processes(server, redis_url, name):
    tenant = f"tenant:{name}"
    params = {
        "autolog": {"store": redis_url, "max_calls": "none"},
        "session": {"shared_budget": tenant, "shared_max_calls": 13},
        "threads": 4,
        "calls_per_thread": 10,
    }
    results = run_workers(server, params, processes=3)
    assert sum(result["done"] for result in results) == server.count() == 13
    assert runguard.current_shared(tenant, store=redis_url).calls == 13


async def test_async_tasks_of_one_tenant_are_exact(server, redis_url, name):
    runguard.autolog(store=redis_url, max_calls="none")
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="t", max_retries=0)
    tenant = f"tenant:{name}"

    async def one() -> bool:
        try:
            async with runguard.session(shared_budget=tenant, shared_max_calls=9):
                await client.chat.completions.create(model=MODEL, messages=MESSAGES)
            return True
        except runguard.RunGuardTripped:
            return False

    outcomes = await asyncio.gather(*(one() for _ in range(30)))
    assert sum(outcomes) == server.count() == 9


def test_a_retry_the_tenant_refuses_is_taken_back_from_the_process_budget(server, redis_url, name):
    runguard.autolog(store=redis_url, shared_budget=f"{name}-all", max_calls="none", max_requests="none")
    client = openai.OpenAI(base_url=server.base_url, api_key="t", max_retries=5)
    server.default = Reply(status=500)
    tenant = f"tenant:{name}"
    assert tenant_call(client, tenant, shared_max_requests=2) == f"shared_max_requests shared:{tenant}"
    assert server.count() == 2  # the first attempt and one retry; the second retry was refused
    runguard.flush()
    assert runguard.current_shared(tenant).requests == 2
    assert runguard.current_shared().requests == 2  # not 3: the refused retry was not sent


def test_nested_sessions_on_one_tenant_charge_it_once_under_the_lower_limit(client, server, redis_url, name):
    runguard.autolog(store=redis_url, max_calls="none")
    tenant = f"tenant:{name}"
    with runguard.session(shared_budget=tenant, shared_max_calls=10):
        results = [tenant_call(client, tenant, shared_max_calls=4) for _ in range(6)]
    assert results == ["ok"] * 4 + [f"shared_max_calls shared:{tenant}"] * 2
    runguard.flush()
    assert runguard.current_shared(tenant).calls == server.count() == 4


def test_tenant_budget_outage_follows_store_outage(client, server, private_redis, name):
    runguard.autolog(store=private_redis.url, max_calls="none")
    tenant = f"tenant:{name}"
    assert tenant_call(client, tenant, shared_max_calls=5) == "ok"
    private_redis.stop()
    assert tenant_call(client, tenant, shared_max_calls=5) == f"store_outage shared:{tenant}"
    assert server.count() == 1


def test_session_shared_budget_errors_name_the_keyword(redis_url):
    with pytest.raises(runguard.RunGuardConfigError, match="shared_max_calls is set but no shared budget"):
        runguard.session(shared_max_calls=3)
    with pytest.raises(runguard.RunGuardConfigError, match="shared_budget='tenant a'"):
        runguard.session(shared_budget="tenant a")
    with pytest.raises(runguard.RunGuardConfigError, match="shared_window='fortnight'"):
        runguard.session(shared_budget="tenant:a", shared_window="fortnight")
    with pytest.raises(runguard.RunGuardConfigError, match="shared_max_cost_usd=-1"):
        runguard.session(shared_budget="tenant:a", shared_max_cost_usd=-1)
    runguard.autolog()  # the in-memory store: no shared budget can live there
    with pytest.raises(runguard.RunGuardConfigError, match="needs a shared store"), runguard.session(
        shared_budget="tenant:a"
    ):
        pass


def test_a_windowed_tenant_budget(client, server, redis_url, name):
    runguard.autolog(store=redis_url, max_calls="none")
    tenant = f"tenant:{name}"
    assert tenant_call(client, tenant, shared_max_calls=1, shared_window="day") == "ok"
    assert tenant_call(client, tenant, shared_max_calls=1, shared_window="day").startswith("shared_max_calls")
    now = int(time.time())
    raw = redis.Redis.from_url(redis_url).hget(f"runguard:{{{tenant}}}:w:{now - now % 86400}", "u0")
    assert raw is not None and float(raw) == 1
    runguard.reset_shared(tenant)
    assert tenant_call(client, tenant, shared_max_calls=1, shared_window="day") == "ok"


def test_many_tenants_keep_client_state_bounded(client, server, redis_url, name):
    """1,000 tenants: one writer thread, one connection per calling thread, and no budget kept
    once its calls have settled (the benchmark runs 10,000 tenants over 100,000 requests)."""
    runguard.autolog(store=redis_url, max_calls="none")
    store_client = _runtime.RUNTIME.store.client
    chat(client)  # the writer thread and this thread's connection exist from here on
    threads_before = threading.active_count()
    connections_before = len(redis.Redis.from_url(redis_url).client_list())
    for i in range(1000):
        assert tenant_call(client, f"tenant:{name}:{i}", shared_max_calls=5) == "ok"
    assert runguard.flush()
    gc.collect()
    assert len(store_client._budgets) == 0
    assert not store_client._pending and not store_client._live and not store_client._unsettled
    assert threading.active_count() <= threads_before  # no thread per tenant
    writers = [thread for thread in threading.enumerate() if thread.name == "runguard-shared-budget"]
    assert len(writers) == 1
    # no connection per tenant (at most one more: the pool's, for the writer's pipelines)
    assert len(redis.Redis.from_url(redis_url).client_list()) <= connections_before + 1
    assert server.count() == 1001
    assert runguard.current_shared(f"tenant:{name}:999").calls == 1


# -- the web middlewares name the budget from the request -------------------------------------------
def _tenant_of_scope(scope) -> str | None:
    tenant = dict(scope["headers"]).get(b"x-tenant")
    return None if tenant is None else f"tenant:{tenant.decode()}"


def _tenant_of_environ(environ) -> str | None:
    tenant = environ.get("HTTP_X_TENANT")
    return None if tenant is None else f"tenant:{tenant}"


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_middleware_names_a_budget_per_tenant(server, redis_url, name, kind):
    runguard.autolog(store=redis_url, max_calls="none")
    routes = Routes()
    if kind == "asgi":
        app = asgi.RunGuardMiddleware(
            starlette_app(server.base_url, routes), shared_budget=_tenant_of_scope, shared_max_calls=3
        )
        serving = serve_asgi(app)
    else:
        app = flask_app(server.base_url, routes)
        app.wsgi_app = wsgi.RunGuardMiddleware(app.wsgi_app, shared_budget=_tenant_of_environ, shared_max_calls=3)
        serving = serve_wsgi(app)
    with serving as base:
        a, b = f"{name}-a", f"{name}-b"
        statuses_a = [httpx.get(f"{base}/llm?n=1", headers={"x-tenant": a}).status_code for _ in range(5)]
        refused = httpx.get(f"{base}/llm?n=1", headers={"x-tenant": a})
        statuses_b = [httpx.get(f"{base}/llm?n=1", headers={"x-tenant": b}).status_code for _ in range(2)]
        untagged = [httpx.get(f"{base}/llm?n=1").status_code for _ in range(4)]  # no tenant: no shared budget
    assert statuses_a == [200] * 3 + [429] * 2
    assert refused.json()["error"]["limit"] == "shared_max_calls"
    assert refused.json()["error"]["scope"] == f"shared:tenant:{a}"
    assert statuses_b == [200, 200] and untagged == [200] * 4
    assert server.count() == 3 + 2 + 4
    runguard.flush()
    assert runguard.current_shared(f"tenant:{a}").calls == 3


def test_middleware_rejects_a_bad_shared_option_when_built():
    with pytest.raises(runguard.RunGuardConfigError, match="shared_max_calls is set but no shared budget"):
        asgi.RunGuardMiddleware(lambda *a: None, shared_max_calls=3)
    with pytest.raises(runguard.RunGuardConfigError, match="shared_budget='a b'"):
        wsgi.RunGuardMiddleware(lambda *a: None, shared_budget="a b")
    asgi.RunGuardMiddleware(lambda *a: None, shared_budget=_tenant_of_scope, shared_max_cost_usd=5)


def test_shared_client_is_one_per_store_and_closed_when_the_store_changes(redis_url, private_redis):
    runguard.autolog(store=redis_url)
    first = _runtime.RUNTIME.store.client
    runguard.autolog(store=redis_url, max_calls=10)
    assert _runtime.RUNTIME.store.client is first  # reconfiguring keeps the one client
    runguard.autolog(store=private_redis.url)
    assert _runtime.RUNTIME.store.client is not first and first._stopping
    assert first not in _shared._CLIENTS.values()
