"""Failure paths found by attacking the protocol: retries in shadow mode, a callable on_trip at
a mid-stream crossing and between attempts, a shared budget refusing or missing a retry, a
session object entered by many tasks, and a sync SDK call an async guarded call runs in a
thread. Each asserts what the provider received against the counters."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid

import openai
import pytest
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage
from langchain_core.outputs import ChatGeneration, ChatResult

import runguard_autolog as runguard
from runguard_autolog import _runtime
from runguard_autolog.testing import Reply

from .conftest import MESSAGES, MODEL, chat


@pytest.fixture(autouse=True)
def lenient():
    _runtime.set_strict(False)
    yield
    _runtime.set_strict(True)


def _client(server, retries: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="t", max_retries=retries)


def test_shadow_mode_counts_the_retries_it_lets_through(server):
    runguard.autolog(max_calls=2, max_requests=2, on_trip="warn")
    server.default = Reply(status=500)
    with pytest.raises(openai.InternalServerError):
        chat(_client(server, 5))
    assert server.count() == 6
    assert runguard.current().requests == 6


class Stop(Exception):
    pass


def test_a_callable_on_trip_decides_at_a_mid_stream_crossing(client, server):
    seen = []

    def stop(trip):
        seen.append(trip.limit)
        raise Stop

    server.default = Reply(content=" ".join(["w"] * 200), chunk_delay=0.001)
    runguard.autolog(max_output_tokens=50, on_trip=stop)
    received = 0
    with pytest.raises(Stop):
        for _ in client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True):
            received += 1
    assert seen == ["max_output_tokens"] and received < 150
    # a callable that returns lets the stream go on
    runguard.autolog(max_output_tokens=50, on_trip=seen.append)
    runguard.reset()
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    assert len(chunks) >= 200 and len(seen) == 2


def test_a_callable_on_trip_raising_between_attempts_keeps_them_charged(server):
    def stop(trip):
        raise Stop

    runguard.autolog(max_consecutive_429s=2, on_trip=stop)
    server.default = Reply(status=429, headers={"retry-after": "0"})
    with pytest.raises(Stop):
        chat(_client(server, 5))
    assert server.count() == 2
    assert runguard.current().requests == 2


def test_a_trip_between_attempts_says_how_many_were_sent(server):
    runguard.autolog(max_consecutive_429s=3)
    server.default = Reply(status=429, headers={"retry-after": "0"})
    with pytest.raises(runguard.RunGuardTripped) as trip:
        chat(_client(server, 5))
    assert "3 attempt(s) of this call had been sent" in str(trip.value)
    assert "not sent" not in str(trip.value)


def test_one_session_object_entered_by_many_tasks():
    guard = runguard.session("agent", max_calls=3)

    async def task(delay: float) -> str:
        async with guard:
            await asyncio.sleep(delay)
            return runguard.current().scope

    async def main():
        return await asyncio.gather(task(0.01), task(0.05), task(0.03))

    runguard.autolog()
    assert asyncio.run(main()) == ["session:agent"] * 3


def test_an_async_guarded_call_running_sync_sdk_code_in_a_thread_counts_every_attempt(server):
    sync = _client(server, 4)

    class SyncOnly(BaseChatModel):  # no native async: LangChain runs _generate in an executor thread
        model_name: str = MODEL

        @property
        def _llm_type(self) -> str:
            return "sync-only"

        def _generate(self, messages, stop=None, run_manager=None, **kwargs):
            reply = sync.chat.completions.create(model=MODEL, messages=MESSAGES)
            return ChatResult(generations=[ChatGeneration(message=AIMessage(content=reply.choices[0].message.content))])

    runguard.autolog(max_calls=100, max_consecutive_429s=2)
    server.script(*[Reply(status=429, headers={"retry-after": "0"}) for _ in range(4)], Reply())
    with pytest.raises(runguard.RunGuardTripped):
        asyncio.run(SyncOnly().ainvoke("hi"))
    assert server.count() == 2
    assert runguard.current().requests == 2


def test_a_retry_the_shared_budget_refuses_is_not_counted_locally(server, private_redis):
    runguard.autolog(store=private_redis.url, shared_budget=f"r-{uuid.uuid4().hex[:8]}", shared_max_requests=3,
                     max_calls="none")
    server.default = Reply(status=500)
    with pytest.raises(runguard.RunGuardTripped):
        chat(_client(server, 5))
    runguard.flush()
    assert server.count() == runguard.current_shared().requests == runguard.current().requests == 3


@pytest.mark.parametrize("policy", ["fail_closed", "fail_open"])
def test_a_store_outage_between_attempts(server, private_redis, policy):
    runguard.autolog(store=private_redis.url, shared_budget=f"o-{uuid.uuid4().hex[:8]}", shared_max_requests=100,
                     max_calls="none", store_outage=policy)
    redis_cli = shutil.which("redis-cli")
    if redis_cli is None:
        pytest.skip("redis-cli is not installed (Debian package redis-tools)")

    def pause(body):  # the store stops answering while the call is between attempts
        subprocess.run([redis_cli, "-p", str(private_redis.port), "client", "pause", "2000", "all"],
                       capture_output=True, check=True)
        return Reply(status=500)

    server.script(pause, Reply(status=500), Reply(status=500), Reply())
    client = _client(server, 3)
    if policy == "fail_closed":
        with pytest.raises(runguard.RunGuardTripped) as refused:
            chat(client)
        assert refused.value.limit == "store_outage"
        assert server.count() == 1  # no retry left while the budget could not be charged
    else:
        chat(client)
        assert server.count() == 4
    time.sleep(2.2)
    chat(client)  # the store answers again: what it missed is reconciled
    runguard.flush()
    time.sleep(0.3)
    runguard.flush()
    assert runguard.current_shared().requests == server.count()
