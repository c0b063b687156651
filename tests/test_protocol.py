"""The one guarded-call protocol, on the defects the hand-written copies had: each request
leaves the process at most once whatever fails, a raising ``on_trip`` stops the call, one
oversized request does not trip the scope, and LangChain streams are cut like SDK streams.
Each test runs with strict mode off, as users run, so runguard's own safety net is active."""

from __future__ import annotations

import time

import openai
import pytest
from langchain_openai import ChatOpenAI

import runguard_autolog as runguard
from runguard_autolog import _runtime
from runguard_autolog.testing import Reply

from .conftest import MESSAGES, MODEL, chat

TOOLS = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {}}}}]
LONG = " ".join(["word"] * 400)


@pytest.fixture(autouse=True)
def lenient():
    _runtime.set_strict(False)
    yield
    _runtime.set_strict(True)


def test_a_provider_500_is_sent_once_and_counted_never_resent(client, server):
    runguard.autolog(max_calls=2)
    for _ in range(6):
        server.script(Reply(status=500), Reply())
    outcomes = []
    for _ in range(6):
        try:
            chat(client, tools=TOOLS)
            outcomes.append("ok")
        except openai.InternalServerError:
            outcomes.append("500")
        except runguard.RunGuardTripped:
            outcomes.append("tripped")
    assert outcomes == ["500", "ok", "500", "ok", "tripped", "tripped"]
    assert server.count() == 4  # each attempt left once; nothing re-sent unguarded
    assert runguard.current().calls == 2
    assert runguard.current().requests == 4


def test_sdk_retries_of_500s_leave_once_each(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="t", max_retries=2)
    server.default = Reply(status=500)
    runguard.autolog(max_calls=5)
    with pytest.raises(openai.InternalServerError):
        chat(client, tools=TOOLS)
    assert server.count() == 3
    assert runguard.current().requests == 3
    assert runguard.current().calls == 0


def test_a_client_timeout_reaches_the_provider_once(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="t", max_retries=0, timeout=0.2)
    server.script(Reply(delay=1.0))
    runguard.autolog(max_calls=5)
    with pytest.raises(openai.APITimeoutError):
        chat(client, messages=[{"role": "user", "content": "héllo"}])
    time.sleep(1.0)
    assert server.count() == 1
    assert runguard.current().calls == 0 and runguard.current().requests == 1


def test_an_on_trip_callable_that_raises_stops_the_call(client, server):
    seen = []

    def stop(trip):
        seen.append(trip.limit)
        raise ValueError("stop")

    runguard.autolog(max_calls=2, on_trip=stop)
    chat(client)
    chat(client)
    for _ in range(3):
        with pytest.raises(ValueError, match="stop"):
            chat(client)
    assert server.count() == 2
    assert seen == ["max_calls"] * 3
    assert runguard.current().calls == 2


def test_an_on_trip_callable_that_returns_lets_the_call_proceed_as_in_shadow_mode(client, server):
    runguard.autolog(max_calls=1, on_trip=lambda trip: None)
    for _ in range(3):
        chat(client)
    assert server.count() == 3
    assert runguard.current().calls == 3


def test_one_oversized_request_is_refused_without_tripping_the_scope(client, server):
    runguard.autolog(max_calls=5)
    with pytest.raises(runguard.RunGuardTripped) as refused:
        chat(client, max_tokens=200_000)
    assert refused.value.limit == "max_output_tokens"
    assert server.count() == 0
    assert runguard.current().tripped is None
    chat(client)  # a normal call goes through
    assert server.count() == 1


def test_a_context_overflow_still_trips_the_scope(client, server):
    runguard.autolog(max_calls=5)
    huge = [{"role": "user", "content": "x " * 400_000}]
    with pytest.raises(runguard.RunGuardTripped) as refused:
        chat(client, messages=huge, model="gpt-4o")
    assert refused.value.limit in ("max_context_fraction", "max_input_tokens")
    if refused.value.limit == "max_context_fraction":
        assert runguard.current().tripped is not None


def test_a_langchain_stream_is_cut_mid_flight(server):
    server.default = Reply(content=LONG, chunk_delay=0.002)
    llm = ChatOpenAI(model=MODEL, base_url=server.base_url, api_key="test", max_retries=0)
    runguard.autolog(max_output_tokens=20)
    received = []
    with pytest.raises(runguard.RunGuardTripped) as cut:
        for chunk in llm.stream("hello"):
            received.append(chunk)
    assert cut.value.limit == "max_output_tokens"
    assert 0 < len(received) < 200
    deadline = time.time() + 3
    while time.time() < deadline and server.streams_completed:
        time.sleep(0.05)
    assert server.streams_completed == 0  # the response was released: the provider stopped
    with pytest.raises(runguard.RunGuardTripped):  # the circuit is open
        llm.invoke("again")
    assert server.count() == 1


async def test_a_langchain_astream_is_cut_mid_flight(server):
    server.default = Reply(content=LONG, chunk_delay=0.002)
    llm = ChatOpenAI(model=MODEL, base_url=server.base_url, api_key="test", max_retries=0)
    runguard.autolog(max_output_tokens=20)
    received = 0
    with pytest.raises(runguard.RunGuardTripped):
        async for _ in llm.astream("hello"):
            received += 1
    assert 0 < received < 200
    assert server.count() == 1
    assert runguard.current().tripped is not None


def test_a_langchain_stream_never_iterated_reserves_nothing(server):
    llm = ChatOpenAI(model=MODEL, base_url=server.base_url, api_key="test", max_retries=0)
    runguard.autolog(max_calls=1)
    stream = llm.stream("hello")
    del stream
    llm.invoke("hello")
    assert server.count() == 1
    assert runguard.current().calls == 1


def test_reset_clears_the_holds_of_a_settle_that_failed(client, server, monkeypatch):
    from runguard_autolog import _store

    runguard.autolog(max_calls=3)
    original = _store.MemoryStore.settle

    def broken(self, reservation, actual, ok=True):
        raise RuntimeError("settle failed")

    monkeypatch.setattr(_store.MemoryStore, "settle", broken)
    chat(client)  # the reply is returned; the hold must not outlive the call
    monkeypatch.setattr(_store.MemoryStore, "settle", original)
    runguard.reset()
    for _ in range(3):
        chat(client)
    with pytest.raises(runguard.RunGuardTripped):
        chat(client)
    assert server.count() == 4
