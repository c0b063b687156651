"""Per-tenant shared budgets: ``runguard.session(shared_budget=f"tenant:{t}", shared_max_*=…)``
charges a budget named at run time beside the process-wide one, exactly, across threads and
processes; the web middlewares name it from the request; the client state stays bounded however
many tenants appear. All against a real ``redis-server`` and the loopback fake OpenAI server.
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import redis

import runguard_autolog as runguard
from runguard_autolog import _runtime, _shared, _web, asgi, wsgi
from runguard_autolog.testing import Reply

from .conftest import MESSAGES, MODEL
from .test_middleware import Routes, flask_app, serve_asgi, serve_wsgi, starlette_app
from .test_shared import name, redis_url, run_workers  # noqa: F401 (fixtures)


def chat(client: openai.OpenAI, **extra) -> object:
    return client.chat.completions.create(model=MODEL, messages=MESSAGES, **extra)


def window(url: str, budget: str) -> dict[str, float]:
    """The budget's counters as the store keeps them (window 0: no window)."""
    raw = redis.Redis.from_url(url).hgetall(f"runguard:{{{budget}}}:w:0")
    return {key.decode(): float(value) for key, value in raw.items() if key not in (b"trip", b"cfg")}


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


def _next_window(seconds: int) -> None:
    """Sleep into the next window of ``seconds`` (just past its start)."""
    time.sleep(seconds - time.time() % seconds + 0.05)


def test_a_windowed_tenant_budget_starts_afresh_and_says_when(client, server, redis_url, name):
    """A windowed tenant budget opens again at the boundary; its refusal says when (retry_after)."""
    runguard.autolog(store=redis_url, max_calls="none")
    tenant = f"tenant:{name}"
    _next_window(2)
    assert tenant_call(client, tenant, shared_max_calls=1, shared_window=2) == "ok"
    with pytest.raises(runguard.RunGuardTripped) as refused:
        with runguard.session(shared_budget=tenant, shared_max_calls=1, shared_window=2):
            chat(client)
    assert refused.value.limit == "shared_max_calls" and refused.value.scope == f"shared:{tenant}"
    assert 0 < refused.value.details["retry_after"] <= 2
    _next_window(2)
    assert tenant_call(client, tenant, shared_max_calls=1, shared_window=2) == "ok"
    assert server.count() == 2


def test_retry_after_is_the_windows_only_when_the_window_is_what_refused(client, server, redis_url, name):
    """No retry_after for a store outage (the store may answer any time), nor for a budget the
    process charges without a window even when a session names it with one."""
    runguard.autolog(store="redis://127.0.0.1:1/0", max_calls="none")  # nothing listens there
    with pytest.raises(runguard.RunGuardTripped) as outage:
        with runguard.session(shared_budget=f"tenant:{name}", shared_max_calls=100, shared_window="day"):
            chat(client)
    assert outage.value.limit == "store_outage" and "retry_after" not in outage.value.details
    assert _web.retry_after(outage.value) is None
    runguard.autolog(store=redis_url, shared_budget=name, shared_max_calls=1, max_calls="none")
    chat(client)
    with pytest.raises(runguard.RunGuardTripped) as refused:
        with runguard.session(shared_budget=name, shared_max_calls=1, shared_window=60):
            chat(client)
    assert refused.value.scope == f"shared:{name}" and "retry_after" not in refused.value.details
    assert server.count() == 1
    runguard.reset_shared(name)


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_a_windowed_tenant_budget_sends_retry_after(server, redis_url, name, kind):
    runguard.autolog(store=redis_url, max_calls="none")
    if 3600 - time.time() % 3600 < 5:  # not across an hour's boundary
        _next_window(3600)
    with serve_tenants(kind, server.base_url, shared_max_calls=1, shared_window="hour") as base:
        headers = {"x-tenant": name}
        assert httpx.get(f"{base}/llm?n=1", headers=headers).status_code == 200
        refused = httpx.get(f"{base}/llm?n=1", headers=headers)
    assert refused.status_code == 429 and refused.json()["error"]["scope"] == f"shared:tenant:{name}"
    now = time.time()
    assert int(refused.headers["Retry-After"]) == pytest.approx(3600 - now % 3600, abs=3)
    assert server.count() == 1
    runguard.reset_shared(f"tenant:{name}")


def test_many_tenants_keep_client_state_bounded(client, server, redis_url, name):
    """1,000 tenants: one writer thread, one connection per calling thread, and no budget kept
    once its calls have settled (the benchmark runs 10,000 tenants over 100,000 requests)."""
    runguard.autolog(store=redis_url, max_calls="none")
    store_client = _runtime.RUNTIME.store.client
    assert tenant_call(client, f"tenant:{name}:warm", shared_max_calls=5) == "ok"
    assert runguard.flush()  # the writer thread and this thread's connections exist from here on
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


def serve_tenants(kind: str, base_url: str, **limits):
    """A Starlette app under uvicorn or a Flask app under werkzeug, its budget named by ``x-tenant``."""
    if kind == "asgi":
        app = starlette_app(base_url, Routes())
        return serve_asgi(asgi.RunGuardMiddleware(app, shared_budget=_tenant_of_scope, **limits))
    app = flask_app(base_url, Routes())
    app.wsgi_app = wsgi.RunGuardMiddleware(app.wsgi_app, shared_budget=_tenant_of_environ, **limits)
    return serve_wsgi(app)


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_middleware_names_a_budget_per_tenant(server, redis_url, name, kind):
    runguard.autolog(store=redis_url, max_calls="none")
    with serve_tenants(kind, server.base_url, shared_max_calls=3) as base:
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


def _oom(url: str, on: bool) -> None:
    admin = redis.Redis.from_url(url)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", "1" if on else "0")


# -- faults: outages, forks, many tenants ------------------------------------------------------------
# flush() used to return while the writer is still reconciling a tenant's fail_open usage ----------
def test_flush_waits_for_the_writers_reconcile(client, server, private_redis, name):
    runguard.autolog(store=private_redis.url, max_calls="none", store_outage="fail_open")
    tenant = f"tenant:{name}"
    assert tenant_call(client, tenant, shared_max_calls=10**6) == "ok"
    runguard.flush()
    _oom(private_redis.url, True)
    n = 1500
    for _ in range(n):  # admitted on local limits while the store refuses writes: owed
        assert tenant_call(client, tenant, shared_max_calls=10**6) == "ok"
    _oom(private_redis.url, False)
    time.sleep(1.1)
    assert tenant_call(client, tenant, shared_max_calls=10**6) == "ok"  # back up: the writer reconciles
    time.sleep(0.08)  # the writer has taken the owed settles and is sending them one by one
    assert runguard.flush()  # "True when everything was written"
    assert window(private_redis.url, tenant).get("u0") == server.count() == n + 2


# flush() says True while settles are owed to a store that is down --------------------------
def test_flush_is_not_true_while_usage_is_owed(client, server, private_redis, name):
    runguard.autolog(store=private_redis.url, max_calls="none", store_outage="fail_open")
    tenant = f"tenant:{name}"
    assert tenant_call(client, tenant, shared_max_calls=100) == "ok"
    runguard.flush()
    _oom(private_redis.url, True)
    assert tenant_call(client, tenant, shared_max_calls=100) == "ok"
    written = runguard.flush(1.0)
    in_store = window(private_redis.url, tenant).get("u0")
    _oom(private_redis.url, False)
    assert (written, in_store) != (True, 1.0)  # True, yet the second call is not in the store


# a child forked while the store is marked down loses its fail_open usage --------------------
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() with threads: on purpose
def test_child_forked_during_outage_keeps_its_owed_usage(client, server, private_redis, name):
    runguard.autolog(store=private_redis.url, max_calls="none", store_outage="fail_open")
    tenant = f"tenant:{name}"
    assert tenant_call(client, tenant, shared_max_calls=100) == "ok"  # writer started in the parent
    runguard.flush()
    _oom(private_redis.url, True)
    assert tenant_call(client, tenant, shared_max_calls=100) == "ok"  # marks the store down
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for _ in range(5):  # the child inherits "down": admitted, owed
                assert tenant_call(client, tenant, shared_max_calls=100) == "ok"
            _oom(private_redis.url, False)
            time.sleep(1.1)
            assert tenant_call(client, tenant, shared_max_calls=100) == "ok"  # store back
            runguard.flush()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    runguard.flush()
    assert server.count() == 8
    assert window(private_redis.url, tenant).get("u0") == 8  # 1 + 1 (parent) + 5 + 1 (child)


# a tenant name taken from the request that fails validation breaks the request --------------
@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_a_bad_tenant_header_does_not_500(server, redis_url, name, kind):
    runguard.autolog(store=redis_url, max_calls="none")
    with serve_tenants(kind, server.base_url, shared_max_calls=3) as base:
        tenant = f"acme corp {name} {kind}"  # a space: not a valid budget name
        statuses = [httpx.get(f"{base}/llm?n=1", headers={"x-tenant": tenant}).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]  # the same (hashed) budget each time: no way around its ceiling
    hashed = _web.budget_name(f"tenant:{tenant}")
    assert hashed.startswith("sha256:") and runguard.current_shared(hashed).calls == 3


# client state during a fail_open outage grows with the number of tenants ---------------------
def test_owed_state_is_bounded_however_many_tenants(client, server, private_redis, name, monkeypatch):
    monkeypatch.setattr(_shared, "MAX_UNSETTLED", 10)  # stands for 10,000 owed settles
    runguard.autolog(store=private_redis.url, max_calls="none", store_outage="fail_open")
    store_client = _runtime.RUNTIME.store.client
    chat(client)
    _oom(private_redis.url, True)
    for i in range(500):
        assert tenant_call(client, f"tenant:{name}:{i}", shared_max_calls=5) == "ok"
    gc.collect()
    owed = len(store_client._unsettled) + len(store_client._overflow)
    budgets = len(store_client._budgets)  # alive: the owed entries' (10), not one per tenant (500)
    _oom(private_redis.url, False)
    assert owed <= 10 + 10 and budgets <= 10 + 2, (owed, budgets)


# Redis keys of an idle tenant never expire ------------------------------------------------
def test_an_idle_windowed_tenant_leaves_no_key_forever(client, server, redis_url, name):
    runguard.autolog(store=redis_url, max_calls="none")
    tenant = f"tenant:{name}"
    assert tenant_call(client, tenant, shared_max_calls=5, shared_window="minute") == "ok"
    assert runguard.flush()
    admin = redis.Redis.from_url(redis_url)
    forever = [k.decode() for k in admin.scan_iter(match=f"runguard:{{{tenant}}}:*") if admin.ttl(k) == -1]
    assert forever == []


# stress: two budgets per call, refusals from either, retries refused by either -------------
def _hash(url, budget):
    raw = redis.Redis.from_url(url).hgetall(f"runguard:{{{budget}}}:w:0")
    return {k.decode(): (v.decode() if k in (b"trip", b"cfg") else float(v)) for k, v in raw.items()}


def test_stress_two_budgets_counts_and_holds(server, redis_url, name):
    import random

    rng = random.Random(7)
    runguard.autolog(store=redis_url, shared_budget=f"{name}-all", shared_max_requests=150, shared_max_calls=1000,
                     max_calls="none", max_requests="none")
    server.default = lambda body: Reply(status=500) if rng.random() < 0.4 else Reply(delay=0.002)
    client = openai.OpenAI(base_url=server.base_url, api_key="t", max_retries=2)
    tenants = [f"tenant:{name}:{i}" for i in range(4)]

    def work(worker):
        out = []
        for _ in range(20):
            t = tenants[(worker + _) % 4]
            try:
                with runguard.session(shared_budget=t, shared_max_requests=30):
                    chat(client, extra_headers={"x-t": t})
                out.append("ok")
            except runguard.RunGuardTripped as e:
                out.append(e.limit)
            except openai.APIStatusError:
                out.append("500")
        return out

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(work, range(12)))
    assert runguard.flush()
    time.sleep(0.2)
    assert runguard.flush()
    per_tenant = {t: sum(1 for r in server.requests if r["headers"].get("x-t") == t) for t in tenants}
    admin = redis.Redis.from_url(redis_url)
    report = {}
    for b in [f"{name}-all", *tenants]:
        h = _hash(redis_url, b)
        report[b] = (h.get("u1"), [h.get(f"r{i}", 0) for i in range(7)], admin.zcard(f"runguard:{{{b}}}:leases"))
    expected = {f"{name}-all": server.count(), **per_tenant}
    bad = {b: (report[b], expected[b]) for b in report
           if report[b][0] != expected[b] or any(report[b][1]) or report[b][2]}
    assert not bad, bad


# after a fail_open outage, calls are admitted before the owed usage is applied ------------
def test_owed_usage_lands_before_new_calls_are_admitted(client, server, private_redis, name):
    runguard.autolog(store=private_redis.url, max_calls="none", store_outage="fail_open")
    tenant = f"tenant:{name}"
    assert tenant_call(client, tenant, shared_max_calls=6) == "ok"
    runguard.flush()
    _oom(private_redis.url, True)
    for _ in range(4):  # the store refuses writes: admitted on local limits, owed
        assert tenant_call(client, tenant, shared_max_calls=6) == "ok"
    _oom(private_redis.url, False)
    time.sleep(1.1)
    results = [tenant_call(client, tenant, shared_max_calls=6) for _ in range(10)]
    runguard.flush()
    # 5 calls were sent before; the ceiling of 6 leaves room for exactly one more once the store answers
    assert results.count("ok") == 1, (results, window(private_redis.url, tenant))


# tenant leases of a long call are renewed (lease 1 s) ---------------------------------------
def test_long_tenant_call_lease_is_renewed(server, private_redis, name):
    runguard.autolog(store=private_redis.url, shared_budget=f"{name}-all", max_calls="none", shared_lease_s=1)
    client = openai.OpenAI(base_url=server.base_url, api_key="t", max_retries=0)
    tenant = f"tenant:{name}"
    server.default = Reply(delay=3.0)
    t = threading.Thread(target=tenant_call, args=(client, tenant), kwargs={"shared_max_calls": 5})
    t.start()
    time.sleep(2.0)
    admin = redis.Redis.from_url(private_redis.url)
    now_ms = time.time() * 1000
    scores = [s for b in (tenant, f"{name}-all")
              for _, s in admin.zrange(f"runguard:{{{b}}}:leases", 0, -1, withscores=True)]
    t.join()
    assert len(scores) == 2 and min(scores) > now_ms, (scores, now_ms)


# a child forked while the writer is mid-send: flush() in the child hangs then says False ----
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() with threads: on purpose
def test_child_forked_mid_send_can_flush(client, server, private_redis, name):
    runguard.autolog(store=private_redis.url, max_calls="none")
    tenant = f"tenant:{name}"
    assert tenant_call(client, tenant, shared_max_calls=100) == "ok"
    runguard.flush()
    assert tenant_call(client, tenant, shared_max_calls=100) == "ok"  # its settle is queued for the writer
    sleeper = threading.Thread(target=lambda: redis.Redis.from_url(private_redis.url).execute_command(
        "DEBUG", "SLEEP", "0.2"))
    sleeper.start()
    time.sleep(0.1)  # the writer has taken the settle and waits for its reply
    pid = os.fork()
    if pid == 0:
        t0 = time.monotonic()
        sending = _runtime.RUNTIME.store.client._sending
        ok = runguard.flush(1.5)
        os._exit(0 if ok and time.monotonic() - t0 < 1.0 else 10 + sending)
    sleeper.join()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# a reserve that times out is sent again: a frozen store costs a call two timeouts ----------
def test_a_frozen_store_costs_one_timeout(client, server, private_redis, name):
    runguard.autolog(store=private_redis.url, max_calls="none")
    tenant = f"tenant:{name}"
    assert tenant_call(client, tenant, shared_max_calls=5) == "ok"
    private_redis.freeze()
    try:
        t0 = time.monotonic()
        outcome = tenant_call(client, tenant, shared_max_calls=5)
        took = time.monotonic() - t0
    finally:
        private_redis.thaw()
    assert outcome.startswith("store_outage")
    assert took < 0.4, took  # READ_TIMEOUT_S is 0.25


# every temporary client (current_shared(name, store=...)) stays registered for fork --------
def test_current_shared_with_a_store_leaves_nothing_behind(redis_url, name):
    runguard.autolog(max_calls=5)  # no store configured here: each call opens a temporary client
    before = len(_runtime.RUNTIME._fork_locks)
    for _ in range(200):
        runguard.current_shared(f"tenant:{name}", store=redis_url)
    assert len(_runtime.RUNTIME._fork_locks) <= max(64, 2 * before) + 1  # bounded, not one per client
