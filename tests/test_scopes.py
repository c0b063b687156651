"""Scopes: sessions (nested, async, threads, decorator), the MLflow run, the process."""

from __future__ import annotations

import asyncio
import contextvars
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import mlflow
import pytest

import runguard_autolog as runguard

from .conftest import MESSAGES, MODEL, chat


def test_session_limits_apply_to_its_unit_of_work_and_a_new_session_starts_fresh(client, server):
    runguard.autolog(max_calls=100)
    with runguard.session("agent-7", max_calls=3) as s:
        for _ in range(3):
            chat(client)
        with pytest.raises(runguard.RunGuardTripped) as info:
            chat(client)
        assert info.value.scope == "session:agent-7"
        assert runguard.current().scope == "session:agent-7"
        assert s.snapshot().calls == 3
    with runguard.session("agent-8", max_calls=3):
        chat(client)  # a new scope: the old trip does not leak
    assert runguard.current().scope == "process"
    assert runguard.current().calls == 4  # every call is charged to the process too
    assert server.count() == 4


def test_autolog_limits_apply_to_the_innermost_scope_only(client, server):
    runguard.autolog(max_calls=2)
    with runguard.session("outer"):
        chat(client)
        with runguard.session("inner"):
            chat(client)
            chat(client)
            with pytest.raises(runguard.RunGuardTripped) as info:
                chat(client)
            assert info.value.scope == "session:inner"
        # the outer session has no explicit limits, so it did not stop the inner calls; now
        # innermost again, it holds 3 calls against autolog's 2 and refuses at once
        with pytest.raises(runguard.RunGuardTripped) as info:
            chat(client)
        assert info.value.scope == "session:outer"
        assert info.value.reason == "call ceiling hit (3/2)"
    assert server.count() == 3


def test_an_outer_session_enforces_its_own_explicit_limits(client, server):
    runguard.autolog(max_calls=100)
    with runguard.session("job", max_calls=3):
        for task in range(3):
            with runguard.session(f"task-{task}"):
                try:
                    chat(client)
                    chat(client)
                except runguard.RunGuardTripped as trip:
                    assert trip.scope == "session:job"
    assert server.count() == 3


def test_session_decorator_gives_each_invocation_fresh_counters(client, server):
    runguard.autolog(max_calls=100)

    @runguard.session("worker", max_calls=2)
    def agent():
        chat(client)
        chat(client)
        return runguard.current()

    first = agent()
    second = agent()
    assert first.scope == second.scope == "session:worker"
    assert first.calls == second.calls == 2
    assert server.count() == 4


async def test_async_session_decorator_and_tasks_inherit_the_session(async_client, server):
    runguard.autolog(max_calls=100)

    @runguard.session("async-agent", max_calls=4)
    async def agent():
        async def one():
            try:
                await async_client.chat.completions.create(model=MODEL, messages=MESSAGES)
                return 1
            except runguard.RunGuardTripped as trip:
                assert trip.scope == "session:async-agent"
                return 0

        return sum(await asyncio.gather(*(one() for _ in range(10))))

    assert await agent() == 4
    assert server.count() == 4


def test_two_sessions_in_two_threads_are_isolated(client, server):
    runguard.autolog(max_calls=5)
    results = {}

    def looping_agent():
        with runguard.session("looper"):
            sent = 0
            for _ in range(50):
                try:
                    chat(client)
                    sent += 1
                except runguard.RunGuardTripped:
                    pass
            results["looper"] = sent

    def careful_agent():
        with runguard.session("careful"):
            for _ in range(4):
                chat(client)
            results["careful"] = runguard.current().calls

    threads = [threading.Thread(target=looping_agent), threading.Thread(target=careful_agent)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {"looper": 5, "careful": 4}
    assert server.count() == 9


def test_a_session_is_carried_into_a_thread_pool_with_copy_context(client, server):
    runguard.autolog(max_calls=100)
    with runguard.session("pool", max_calls=3):
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(contextvars.copy_context().run, chat, client) for _ in range(6)]
        outcomes = [f.exception() for f in futures]
    assert sum(o is None for o in outcomes) == 3
    assert all(isinstance(o, runguard.RunGuardTripped) for o in outcomes if o is not None)
    assert server.count() == 3


def test_the_active_mlflow_run_is_a_scope_and_its_counters_are_dropped_at_run_end(client, server, tracking):
    runguard.autolog(max_calls=2)
    with mlflow.start_run() as run:
        chat(client)
        chat(client)
        with pytest.raises(runguard.RunGuardTripped) as info:
            chat(client)
        assert info.value.scope == f"run:{run.info.run_id}"
        assert runguard.current().scope == f"run:{run.info.run_id}"
    with mlflow.start_run():
        chat(client)  # a new run is a new unit of work
    assert runguard.current().scope == "process"
    from runguard_autolog import _runtime

    assert _runtime.RUNTIME.runs == {}


def test_innermost_is_the_most_recently_entered_of_sessions_and_the_run(client, server, tracking):
    runguard.autolog(max_calls=1)
    with runguard.session("outer-session"):
        with mlflow.start_run() as run:
            assert runguard.current().scope == f"run:{run.info.run_id}"
            with runguard.session("inner-session"):
                assert runguard.current().scope == "session:inner-session"
                chat(client)
                with pytest.raises(runguard.RunGuardTripped) as info:
                    chat(client)
                assert info.value.scope == "session:inner-session"
            # the run is innermost again; it was charged the session's call, so it is at 1/1
            with pytest.raises(runguard.RunGuardTripped) as info:
                chat(client)
            assert info.value.scope == f"run:{run.info.run_id}"


def test_current_reports_limits_and_counters(client, server):
    runguard.autolog(max_calls=7, max_cost_usd=1.5)
    chat(client)
    snapshot = runguard.current()
    assert snapshot.scope == "process"
    assert snapshot.calls == snapshot.requests == 1
    assert snapshot.input_tokens == 10 and snapshot.output_tokens == 1 and snapshot.total_tokens == 11
    assert snapshot.limits["max_calls"] == 7 and snapshot.limits["max_cost_usd"] == 1.5
    assert snapshot.limits["max_input_tokens"] == 500_000
    assert snapshot.tripped is None


def test_session_rejects_unknown_or_bad_limits():
    with pytest.raises(runguard.RunGuardConfigError, match="max_callz"):
        runguard.session("x", max_callz=3)
    with pytest.raises(runguard.RunGuardConfigError, match="max_calls"):
        runguard.session("x", max_calls=-1)


RUN_BEFORE_AUTOLOG = """
import mlflow, openai, runguard_autolog as runguard
client = openai.OpenAI(base_url={base_url!r}, api_key="test", max_retries=0)
with mlflow.start_run() as run:
    runguard.autolog(max_calls=2)  # installed while the run is already active
    for _ in range(2):
        client.chat.completions.create(model="gpt-4o-mini", messages=[{{"role": "user", "content": "hi"}}])
    try:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{{"role": "user", "content": "hi"}}])
    except runguard.RunGuardTripped as error:
        print("TRIPPED", error.scope == "run:" + run.info.run_id)
"""


def test_a_run_started_before_autolog_is_the_scope_of_calls_in_it(server, tracking):
    # a fresh process: whether any run was seen before is process-wide state
    code = RUN_BEFORE_AUTOLOG.format(base_url=server.base_url)
    environ = {**os.environ, "MLFLOW_TRACKING_URI": tracking}
    result = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "TRIPPED True" in result.stdout, result.stdout + result.stderr[-2000:]
    assert server.count() == 2
