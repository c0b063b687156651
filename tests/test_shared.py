"""Shared budgets on a real Redis server: exact across processes and threads, leases of dead
processes reclaimed, outage policies, windows, reset from the CLI, and what MLflow shows.

Redis is the Debian ``redis-server``: ``.ci/run`` starts one and exports
``RG_TEST_REDIS_URL``; without it these tests start their own. Tests that stop or
freeze Redis always start a private one. Every test uses its own budget name.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import openai
import pytest
import redis
from genai_prices import Usage, calc_price

import runguard_autolog as runguard
from runguard_autolog import _shared
from runguard_autolog.testing import Reply

from ._servers import RedisServer

from .conftest import MESSAGES, MODEL

WORKER = Path(__file__).with_name("_shared_worker.py")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    url = os.environ.get("RG_TEST_REDIS_URL")
    if url:
        yield url
        return
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian package redis-server; .ci/run installs it)")
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture
def name():
    return f"job-{uuid.uuid4().hex[:10]}"


def chat(client, **extra):
    return client.chat.completions.create(model=MODEL, messages=MESSAGES, **extra)


def run_workers(server, params: dict, processes: int) -> list[dict]:
    """Start ``processes`` workers at once and collect what each reports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNGUARD_")}
    env["PYTHONPATH"] = str(ROOT)
    params = {"base_url": server.base_url, **params}
    workers = [
        subprocess.Popen([sys.executable, str(WORKER), json.dumps(params)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(processes)
    ]
    results = []
    for worker in workers:
        out, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def script_calls(url: str) -> int:
    """Script round trips Redis received (commands a script runs are counted apart)."""
    stats = redis.Redis.from_url(url).info("commandstats")
    return sum(stats.get(command, {"calls": 0})["calls"] for command in ("cmdstat_evalsha", "cmdstat_eval"))


# -- exact across processes, threads and tasks ---------------------------------------------------
def test_four_processes_eight_threads_make_exactly_the_shared_ceiling(server, redis_url, name):
    params = {"autolog": {"store": redis_url, "shared_budget": name, "shared_max_calls": 200,
                          "max_calls": math.inf},
              "threads": 8, "calls_per_thread": 60}
    results = run_workers(server, params, processes=4)

    assert server.count("/chat/completions") == 200
    assert sum(r["done"] for r in results) == 200
    refusals = [limit_scope for r in results for limit_scope in r["refused"]]
    assert len(refusals) == 32  # every thread of every process ended refused
    assert {tuple(x) for x in refusals} == {("shared_max_calls", f"shared:{name}")}
    snapshot = runguard.current_shared(name, store=redis_url)
    assert (snapshot.calls, snapshot.in_flight) == (200, 0)
    assert snapshot.tripped.limit == "shared_max_calls"


def test_fifty_async_tasks_against_a_shared_ceiling_of_ten(server, redis_url, name):
    runguard.autolog(store=redis_url, shared_budget=name, shared_max_calls=10, max_calls=math.inf)
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="test", max_retries=0)

    async def main():
        return await asyncio.gather(*(client.chat.completions.create(model=MODEL, messages=MESSAGES)
                                      for _ in range(50)), return_exceptions=True)

    outcomes = asyncio.run(main())
    refused = [o for o in outcomes if isinstance(o, runguard.RunGuardTripped)]
    assert server.count() == 10
    assert len(refused) == 40 and all(o.scope == f"shared:{name}" for o in refused)
    assert not [o for o in outcomes if isinstance(o, BaseException) and o not in refused]


def _forked_worker(calls: int, base_url: str) -> int:
    client = openai.OpenAI(base_url=base_url, api_key="test", max_retries=0)
    for _ in range(calls):
        chat(client)
    runguard.flush()
    return calls


def test_forked_children_never_send_their_parents_settles(server, redis_url, name):
    import multiprocessing

    runguard.autolog(store=redis_url, shared_budget=name, shared_max_calls=100, max_calls=math.inf)
    client = openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=0)
    chat(client)
    chat(client)  # its settle is still queued when the children are forked
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert pool.starmap(_forked_worker, [(3, server.base_url)] * 2) == [3, 3]
    snapshot = runguard.current_shared()
    assert server.count() == 8
    assert (snapshot.calls, snapshot.in_flight) == (8, 0)


def test_cost_budget_with_max_tokens_never_overshoots(server, redis_url, name):
    server.default = Reply(content=" ".join(["word"] * 200))  # every reply runs to the cap
    per_call = float(calc_price(Usage(input_tokens=10, output_tokens=40), MODEL).total_price)
    limit = round(per_call * 57.5, 9)  # 57 calls fit when each holds its exact worst case
    params = {"autolog": {"store": redis_url, "shared_budget": name, "shared_max_cost_usd": limit,
                          "max_calls": math.inf},
              "threads": 8, "calls_per_thread": 40, "max_tokens": 40}
    results = run_workers(server, params, processes=4)

    sent = server.count("/chat/completions")
    snapshot = runguard.current_shared(name, store=redis_url)
    assert snapshot.cost_usd == pytest.approx(sent * per_call)
    assert snapshot.cost_usd <= limit  # never over, whatever the interleaving
    assert snapshot.output_tokens == 40 * sent
    # the reservations are conservative (the prompt estimate is above the 10 billed tokens), but
    # the budget is used: most of it is spent before the first refusal
    assert sent >= 40
    assert sum(r["done"] for r in results) == sent
    assert {r[0] for res in results for r in res["refused"]} == {"shared_max_cost_usd"}


def test_a_call_waits_for_one_round_trip_and_a_local_refusal_for_none(client, server, redis_url, name):
    runguard.autolog(store=redis_url, shared_budget=name, shared_max_calls=100, max_calls=6)
    chat(client)  # loads the scripts
    runguard.flush()
    before = script_calls(redis_url)
    for _ in range(5):
        chat(client)
    # each call's reserve carries the previous call's settle; the last settle waits for a flush
    assert script_calls(redis_url) - before == 5
    runguard.flush()
    assert script_calls(redis_url) - before == 6
    with pytest.raises(runguard.RunGuardTripped) as refused:
        chat(client)  # the process' own max_calls refuses it first: no round trip
    assert refused.value.scope == "process"
    runguard.flush()
    assert script_calls(redis_url) - before == 6
    snapshot = runguard.current_shared()
    assert (snapshot.calls, snapshot.in_flight) == (6, 0)


def test_an_idle_settle_is_sent_on_its_own(client, server, redis_url, name):
    runguard.autolog(store=redis_url, shared_budget=name, shared_max_calls=100)
    chat(client)
    time.sleep(_shared.SETTLE_DELAY_S + 0.5)  # no call follows to carry it: the writer sends it
    budget = runguard._runtime.RUNTIME.store.budget
    state = budget.snapshot()  # no flush here
    assert (state.used[0], state.in_flight) == (1, 0)


# -- sticky for every process, reset from the CLI ---------------------------------------------
def test_a_shared_trip_is_sticky_for_every_process_until_reset_from_the_cli(client, server, redis_url, name):
    runguard.autolog(store=redis_url, shared_budget=name, shared_max_calls=3, max_calls=math.inf)
    for _ in range(3):
        chat(client)
    with pytest.raises(runguard.RunGuardTripped):
        chat(client)
    params = {"autolog": {"store": redis_url, "shared_budget": name, "shared_max_calls": 3},
              "threads": 1, "calls_per_thread": 5}
    other = run_workers(server, params, processes=1)[0]
    assert (other["done"], other["refused"], other["failed"]) == (0, [["shared_max_calls", f"shared:{name}"]], [])
    assert server.count() == 3

    env = {**os.environ, "RUNGUARD_STORE": redis_url}
    reset = subprocess.run([sys.executable, "-m", "runguard_autolog", "reset", "--shared", name],
                           capture_output=True, text=True, env=env, timeout=60)
    assert reset.returncode == 0, reset.stderr
    assert name in reset.stdout

    assert runguard.current_shared().tripped is None
    chat(client)  # this process too: the circuit lives in Redis
    assert run_workers(server, params, processes=1)[0]["done"] == 2
    assert server.count() == 6


def test_reset_and_reading_a_windowed_budget_from_a_process_that_does_not_know_the_window(
        client, server, redis_url, name):
    runguard.autolog(store=redis_url, shared_budget=name, shared_max_calls=2, shared_window="hour")
    chat(client)
    chat(client)
    with pytest.raises(runguard.RunGuardTripped):
        chat(client)
    runguard.flush()
    outside = runguard.current_shared(name, store=redis_url)  # a client that knows only the name
    assert (outside.calls, outside.tripped.limit) == (2, "shared_max_calls")
    assert outside.window_start == runguard.current_shared().window_start
    assert outside.window_start % 3600 == 0

    env = {**os.environ, "RUNGUARD_STORE": redis_url}
    reset = subprocess.run([sys.executable, "-m", "runguard_autolog", "reset", "--shared", name],
                           capture_output=True, text=True, env=env, timeout=60)
    assert reset.returncode == 0, reset.stderr
    chat(client)  # the hour's window was reset too
    assert runguard.current_shared().calls == 1 and server.count() == 3


def test_cli_reset_refuses_a_bad_store_without_echoing_its_password(name):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNGUARD_")}
    env["RUNGUARD_STORE"] = "redis://admin:hunter2@/0"
    result = subprocess.run([sys.executable, "-m", "runguard_autolog", "reset", "--shared", name],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2
    assert "RUNGUARD_STORE" in result.stderr and "hunter2" not in result.stderr + result.stdout


# -- leases of a process that died --------------------------------------------------------------
def test_a_killed_process_leaves_a_reservation_that_expires(client, server, redis_url, name):
    server.default = Reply(delay=30)  # the worker's call hangs until it is killed
    params = {"base_url": server.base_url, "hold": True,
              "autolog": {"store": redis_url, "shared_budget": name, "shared_max_calls": 1, "shared_lease_s": 1}}
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNGUARD_")}
    env["PYTHONPATH"] = str(ROOT)
    worker = subprocess.Popen([sys.executable, str(WORKER), json.dumps(params)], stdout=subprocess.PIPE, env=env)
    runguard.autolog(store=redis_url, shared_budget=name, shared_max_calls=1, shared_lease_s=1)
    try:
        assert worker.stdout.readline().strip() == b"sending"
        deadline = time.monotonic() + 30
        while server.count() < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.count() == 1
        time.sleep(1.5)  # past the 1 s lease: alive, the worker keeps renewing it
        with pytest.raises(runguard.RunGuardTripped) as held:
            chat(client)
        assert held.value.limit == "shared_max_calls" and "would be exceeded" in held.value.reason
        assert runguard.current_shared().in_flight == 1
        worker.kill()
        killed_at = time.monotonic()
    finally:
        worker.kill()
        worker.wait(10)
    server.default = Reply()

    with pytest.raises(runguard.RunGuardTripped):
        chat(client)  # just killed: its hold still fills the ceiling
    assert server.count() == 1

    time.sleep(max(0.0, killed_at + 1.3 - time.monotonic()))  # the lease (1 s) has run out
    chat(client)  # the next reservation reclaims it
    assert server.count() == 2
    snapshot = runguard.current_shared()
    assert (snapshot.calls, snapshot.in_flight) == (1, 0)  # the dead call never settled


# -- store outage ----------------------------------------------------------------------------
def test_redis_stopped_mid_run_fail_closed_refuses_promptly_then_recovers(client, server, private_redis, name):
    runguard.autolog(store=private_redis.url, shared_budget=name, shared_max_calls=100)
    chat(client)
    chat(client)
    runguard.flush()  # their settles have reached Redis
    private_redis.stop()

    for _ in range(3):
        started = time.monotonic()
        with pytest.raises(runguard.RunGuardTripped) as refused:
            chat(client)
        assert time.monotonic() - started < 1.0
        assert refused.value.limit == "store_outage" and refused.value.scope == f"shared:{name}"
    assert server.count() == 2

    private_redis.start()  # same port, empty (no persistence)
    time.sleep(_shared.REPROBE_S + 0.1)
    chat(client)
    assert server.count() == 3
    assert runguard.current_shared().calls == 1


def test_a_frozen_redis_never_hangs_a_call_past_the_timeout(client, server, private_redis, name):
    runguard.autolog(store=private_redis.url, shared_budget=name, shared_max_calls=100)
    chat(client)
    private_redis.freeze()  # accepts connections, never answers
    try:
        started = time.monotonic()
        with pytest.raises(runguard.RunGuardTripped) as refused:
            chat(client)
        waited = time.monotonic() - started
        assert refused.value.limit == "store_outage"
        assert _shared.READ_TIMEOUT_S * 0.8 < waited < 2 * _shared.READ_TIMEOUT_S + 0.5

        runguard.autolog(store=private_redis.url, shared_budget=name, shared_max_calls=100,
                         store_outage="fail_open")
        started = time.monotonic()
        chat(client)  # through, on local limits
        assert time.monotonic() - started < 2 * _shared.READ_TIMEOUT_S + 0.5
    finally:
        private_redis.thaw()
    assert server.count() == 2


def test_redis_stopped_mid_run_fail_open_keeps_local_limits_and_reconciles(client, server, private_redis, name,
                                                                         caplog):
    runguard.autolog(store=private_redis.url, shared_budget=name, shared_max_calls=100, max_calls=5,
                     store_outage="fail_open")
    chat(client)
    chat(client)
    runguard.flush()
    private_redis.stop()
    chat(client)
    chat(client)
    chat(client)
    with pytest.raises(runguard.RunGuardTripped) as local:
        chat(client)
    assert local.value.scope == "process" and local.value.limit == "max_calls"
    assert server.count() == 5
    assert "unreachable" in caplog.text

    private_redis.start()  # empty: the two calls before the outage are gone with it
    time.sleep(_shared.REPROBE_S + 0.1)
    runguard.reset()
    chat(client)
    assert runguard.current_shared().calls == 4  # the 3 made during the outage, then this one
    assert "reconciling 3 call(s)" in caplog.text
    assert server.count() == 6


# -- windows -----------------------------------------------------------------------------------
def _wait_for_window_start(length: int) -> None:
    while not 0.05 < time.time() % length < 0.5:
        time.sleep(0.02)


def test_a_fixed_window_rolls_over(client, server, redis_url, name):
    runguard.autolog(store=redis_url, shared_budget=name, shared_max_calls=3, shared_window=2, max_calls=math.inf)
    _wait_for_window_start(2)
    first = runguard.current_shared().window_start
    for _ in range(3):
        chat(client)
    with pytest.raises(runguard.RunGuardTripped) as refused:
        chat(client)
    assert refused.value.limit == "shared_max_calls"
    time.sleep(2 - time.time() % 2 + 0.1)  # the next window
    assert runguard.current_shared().window_start == first + 2
    for _ in range(3):
        chat(client)
    with pytest.raises(runguard.RunGuardTripped):
        chat(client)
    assert server.count() == 6


def test_windows_are_aligned_to_the_epoch_and_expire(client, redis_url, name):
    runguard.autolog(store=redis_url, shared_budget=name, shared_window="minute", shared_max_calls=10)
    chat(client)
    snapshot = runguard.current_shared()
    seconds = int(redis.Redis.from_url(redis_url).time()[0])
    assert snapshot.window_start % 60 == 0 and 0 <= seconds - snapshot.window_start < 60
    ttl = redis.Redis.from_url(redis_url).pttl(f"runguard:{{{name}}}:w:{snapshot.window_start}")
    assert 0 < ttl <= (snapshot.window_start + 60 - seconds) * 1000 + 2 * 30_000 + 1000


# -- more of the call path -----------------------------------------------------------------------
def test_sdk_retries_count_against_the_shared_request_ceiling(server, redis_url, name):
    runguard.autolog(store=redis_url, shared_budget=name, shared_max_requests=3, max_calls=math.inf,
                     max_consecutive_429s=math.inf)
    server.default = Reply(status=429, headers={"retry-after": "0"})
    client = openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=5)
    with pytest.raises(runguard.RunGuardTripped) as refused:
        chat(client)
    assert refused.value.limit == "shared_max_requests"
    assert server.count() == 3


def test_a_stream_settles_into_the_shared_budget(client, server, redis_url, name):
    runguard.autolog(store=redis_url, shared_budget=name, shared_max_output_tokens=1000)
    server.default = Reply(content="one two three four")
    with chat(client, stream=True, stream_options={"include_usage": True}) as stream:
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "one two three four"
    snapshot = runguard.current_shared()
    assert (snapshot.calls, snapshot.output_tokens, snapshot.in_flight) == (1, 4, 0)


def test_shadow_mode_records_the_shared_trip_and_lets_calls_through(client, server, redis_url, name):
    runguard.autolog(store=redis_url, shared_budget=name, shared_max_calls=2, on_trip="warn")
    for _ in range(4):
        chat(client)
    assert server.count() == 4
    snapshot = runguard.current_shared()
    assert snapshot.calls == 4 and snapshot.tripped.limit == "shared_max_calls"


def test_a_shared_trip_is_recorded_on_the_mlflow_run(client, server, redis_url, name, tracking):
    import mlflow

    runguard.autolog(store=redis_url, shared_budget=name, shared_max_calls=2)
    with mlflow.start_run() as run:
        chat(client)
        chat(client)
        with pytest.raises(runguard.RunGuardTripped):
            chat(client)
    runguard.flush()
    data = mlflow.MlflowClient().get_run(run.info.run_id).data
    assert data.tags["runguard.shared_budget"] == name
    assert data.tags["runguard.trip_scope"] == f"shared:{name}"
    assert data.tags["runguard.trip_limit"] == "shared_max_calls"
    assert data.metrics["runguard.calls_at_trip"] == 2


# -- configuration ----------------------------------------------------------------------------------
def test_environment_variables_configure_a_shared_budget(server, redis_url, name):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNGUARD_")}
    env.update(PYTHONPATH=str(ROOT), RUNGUARD_STORE=redis_url, RUNGUARD_SHARED_BUDGET=name,
               RUNGUARD_SHARED_MAX_CALLS="3", RUNGUARD_MAX_CALLS="none", RUNGUARD_STORE_OUTAGE="fail_open",
               RUNGUARD_SHARED_WINDOW="hour", RUNGUARD_SHARED_LEASE_S="5")
    code = (
        "import openai, runguard_autolog as runguard\n"
        "runguard.autolog()\n"
        f"c = openai.OpenAI(base_url={server.base_url!r}, api_key='t', max_retries=0)\n"
        "for i in range(5):\n"
        "    try:\n"
        f"        c.chat.completions.create(model={MODEL!r}, messages=[{{'role': 'user', 'content': 'x'}}])\n"
        "    except runguard.RunGuardTripped as e:\n"
        "        print(i, e.limit, e.scope)\n"
        "        break\n"
        "b = runguard._runtime.RUNTIME.store.budget\n"
        "print(b.window, b.outage, b.lease_s)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == [f"3 shared_max_calls shared:{name}", "3600 fail_open 5.0"]
    assert server.count() == 3


@pytest.mark.parametrize(
    "variables, named",
    [
        ({"RUNGUARD_STORE": "redis://admin:hunter2@/0", "RUNGUARD_SHARED_BUDGET": "b"}, "RUNGUARD_STORE"),
        ({"RUNGUARD_STORE": "http://admin:hunter2@127.0.0.1:6379", "RUNGUARD_SHARED_BUDGET": "b"}, "RUNGUARD_STORE"),
        ({"RUNGUARD_STORE": "redis://127.0.0.1:99999/0", "RUNGUARD_SHARED_BUDGET": "b"}, "RUNGUARD_STORE"),
        ({"RUNGUARD_STORE": "redis://127.0.0.1:6379/zero", "RUNGUARD_SHARED_BUDGET": "b"}, "RUNGUARD_STORE"),
        ({"RUNGUARD_STORE": "redis://127.0.0.1:6379/0", "RUNGUARD_SHARED_BUDGET": "two words"},
         "RUNGUARD_SHARED_BUDGET"),
        ({"RUNGUARD_STORE": "redis://127.0.0.1:6379/0", "RUNGUARD_SHARED_BUDGET": "b",
          "RUNGUARD_SHARED_MAX_CALLS": "-3"}, "RUNGUARD_SHARED_MAX_CALLS"),
        ({"RUNGUARD_STORE": "redis://127.0.0.1:6379/0", "RUNGUARD_SHARED_BUDGET": "b",
          "RUNGUARD_SHARED_MAX_COST_USD": "1e999"}, "RUNGUARD_SHARED_MAX_COST_USD"),
        ({"RUNGUARD_STORE": "redis://127.0.0.1:6379/0", "RUNGUARD_SHARED_BUDGET": "b",
          "RUNGUARD_SHARED_WINDOW": "fortnight"}, "RUNGUARD_SHARED_WINDOW"),
        ({"RUNGUARD_STORE": "redis://127.0.0.1:6379/0", "RUNGUARD_SHARED_BUDGET": "b",
          "RUNGUARD_STORE_OUTAGE": "maybe"}, "RUNGUARD_STORE_OUTAGE"),
        ({"RUNGUARD_SHARED_BUDGET": "b"}, "RUNGUARD_SHARED_BUDGET"),  # needs a shared store
        ({"RUNGUARD_SHARED_MAX_CALLS": "10"}, "RUNGUARD_SHARED_MAX_CALLS"),  # no budget named
    ],
)
def test_bad_shared_configuration_names_the_variable(monkeypatch, variables, named):
    for variable, value in variables.items():
        monkeypatch.setenv(variable, value)
    with pytest.raises(runguard.RunGuardConfigError) as error:
        runguard.autolog()
    assert named in str(error.value)
    assert "hunter2" not in str(error.value)


def test_runguard_config_shows_the_store_without_its_password():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNGUARD_")}
    env.update(RUNGUARD_STORE="redis://admin:hunter2@127.0.0.1:6379/0", RUNGUARD_SHARED_BUDGET="nightly",
               RUNGUARD_SHARED_MAX_COST_USD="100")
    result = subprocess.run([sys.executable, "-m", "runguard_autolog", "config"], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout
    assert "redis://admin:***@127.0.0.1:6379/0" in result.stdout
    assert "shared_max_cost_usd" in result.stdout and "RUNGUARD_SHARED_MAX_COST_USD=100" in result.stdout
