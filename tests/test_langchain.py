"""LangChain and LangGraph: real ChatOpenAI, real agents, against the loopback fake server."""

from __future__ import annotations

import json
import math

import httpx
import mlflow
import pytest
from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.errors import GraphRecursionError

import runguard_autolog as runguard
from runguard_autolog import _recording
from runguard_autolog.testing import Reply, ToolCall

MODEL = "gpt-4o-mini"


@pytest.fixture
def llm(server):
    # its own async HTTP client: langchain-openai's shared default one is bound to the event
    # loop of the first async test that used it
    return ChatOpenAI(model=MODEL, base_url=server.base_url, api_key="test", max_retries=0,
                      http_async_client=httpx.AsyncClient())


def make_search(runs: list):
    @tool
    def search(query: str) -> str:
        """Search the web."""
        runs.append(query)
        return "nothing new"

    return search


def test_invoke_counts_once_through_the_openai_sdk(llm, server):
    runguard.autolog(max_calls=3)
    for _ in range(3):
        llm.invoke("hello")
    with pytest.raises(runguard.RunGuardTripped) as info:
        llm.invoke("hello")
    assert server.count() == 3
    assert info.value.limit == "max_calls"
    snapshot = runguard.current()
    assert snapshot.calls == 3 and snapshot.input_tokens == 30  # one set of tokens per call


def test_stream_and_batch_count_once_per_call(llm, server):
    runguard.autolog(max_calls=4)
    assert "".join(chunk.content for chunk in llm.stream("hello"))
    llm.batch(["a", "b"])
    assert runguard.current().calls == 3
    with pytest.raises(runguard.RunGuardTripped):
        llm.batch(["c", "d"], config={"max_concurrency": 1})
    assert server.count() == 4  # the fourth call went out; the fifth was refused


async def test_async_invoke_stream_and_batch(llm, server):
    runguard.autolog(max_calls=4)
    await llm.ainvoke("hello")
    async for _ in llm.astream("hello"):
        pass
    await llm.abatch(["a", "b"])
    with pytest.raises(runguard.RunGuardTripped):
        await llm.ainvoke("again")
    assert server.count() == 4


def test_a_model_that_is_not_openai_is_guarded_and_settled_from_usage_metadata(server):
    runguard.autolog(max_calls=2)
    reply = AIMessage("hi", usage_metadata={"input_tokens": 40, "output_tokens": 5, "total_tokens": 45})
    model = GenericFakeChatModel(messages=iter([reply, reply, reply]))
    model.invoke("x")
    model.invoke("x")
    with pytest.raises(runguard.RunGuardTripped):
        model.invoke("x")
    assert runguard.current().input_tokens == 80


def test_react_agent_repeating_one_tool_call_trips_on_the_loop(llm, server):
    runguard.autolog(max_calls=100)
    server.default = Reply(tool_calls=[ToolCall("search", '{"query": "weather"}')])
    runs: list = []
    agent = create_agent(llm, [make_search(runs)])
    with pytest.raises(runguard.RunGuardTripped) as info:
        agent.invoke({"messages": [("user", "weather?")]}, {"recursion_limit": 100})
    assert info.value.limit == "loop_repeats"
    assert server.count() == 3  # the third reply repeated the call; no fourth model call
    assert len(runs) == 2  # the repeated call was refused before the tool ran a third time


def test_unguarded_react_agent_runs_to_its_recursion_limit(llm, server):
    server.default = Reply(tool_calls=[ToolCall("search", '{"query": "weather"}')])
    runs: list = []
    agent = create_agent(llm, [make_search(runs)])
    with pytest.raises(GraphRecursionError):
        agent.invoke({"messages": [("user", "weather?")]}, {"recursion_limit": 21})
    assert server.count() == 11 and len(runs) == 10


def test_abab_cycle_trips(llm, server):
    runguard.autolog()
    a, b = ToolCall("search", '{"query": "a"}'), ToolCall("search", '{"query": "b"}')
    server.script(*[Reply(tool_calls=[call]) for call in (a, b, a, b, a, b)])
    agent = create_agent(llm, [make_search([])])
    with pytest.raises(runguard.RunGuardTripped):
        agent.invoke({"messages": [("user", "?")]}, {"recursion_limit": 100})
    assert server.count() == 5


def test_one_tool_with_different_arguments_is_not_tripped(llm, server):
    runguard.autolog()
    server.script(*[Reply(tool_calls=[ToolCall("search", json.dumps({"query": f"q{i}"}))]) for i in range(10)])
    server.default = Reply(content="done")
    runs: list = []
    result = create_agent(llm, [make_search(runs)]).invoke({"messages": [("user", "?")]}, {"recursion_limit": 100})
    assert result["messages"][-1].content == "done"
    assert len(runs) == 10 and server.count() == 11


async def test_async_agent_trips_on_the_loop(llm, server):
    runguard.autolog()
    server.default = Reply(tool_calls=[ToolCall("search", '{"query": "async"}')])
    runs: list = []
    agent = create_agent(llm, [make_search(runs)])
    with pytest.raises(runguard.RunGuardTripped):
        await agent.ainvoke({"messages": [("user", "?")]}, {"recursion_limit": 100})
    assert server.count() == 3 and len(runs) == 2


def test_context_overflow_through_langchain_sends_nothing(llm, server):
    runguard.autolog(max_input_tokens=10**9)
    with pytest.raises(runguard.RunGuardTripped) as info:
        llm.invoke("word " * 100_000)
    assert info.value.limit == "max_context_fraction"
    assert server.count() == 0


@pytest.mark.parametrize("mlflow_first", [True, False])
def test_both_orders_with_mlflow_langchain_autolog_and_the_trip_on_the_trace(llm, server, tracking, mlflow_first):
    if mlflow_first:
        mlflow.langchain.autolog()
        runguard.autolog(max_calls=2)
    else:
        runguard.autolog(max_calls=2)
        mlflow.langchain.autolog()
    try:
        chain = llm | (lambda message: message.content)
        chain.invoke("one")
        chain.invoke("two")
        with pytest.raises(runguard.RunGuardTripped):
            chain.invoke("three")
        assert server.count() == 2
        assert runguard.current().calls == 2
        mlflow.flush_trace_async_logging()
        _recording.flush(10)
        traces = mlflow.search_traces(return_type="list")
        assert len(traces) >= 3
        refused = [t for t in traces if t.info.state.value == "ERROR"]
        assert refused, "the refused invocation shows as an error trace"
        text = json.dumps([s.to_dict() for s in refused[0].data.spans], default=str)
        assert "RunGuardTripped" in text or "runguard" in text
    finally:
        mlflow.langchain.autolog(disable=True)


def test_a_plain_llm_is_guarded_too(server):
    from langchain_core.language_models.fake import FakeListLLM

    runguard.autolog(max_calls=2, max_context_fraction=math.inf)
    llm = FakeListLLM(responses=["a", "b", "c"])
    llm.invoke("first prompt")
    assert "".join(llm.stream("second prompt"))
    with pytest.raises(runguard.RunGuardTripped):
        llm.invoke("third prompt")
    snapshot = runguard.current()
    assert snapshot.calls == 2
    assert snapshot.input_tokens == 4 + 5  # ceil(12 / 3) + ceil(13 / 3): the prompts estimated (no usage reported)


def test_a_non_openai_model_is_priced_by_its_provider(server):
    from genai_prices import Usage, calc_price

    class AnthropicLikeChat(GenericFakeChatModel):
        model_name: str = "claude-3-5-haiku-latest"

        def _get_ls_params(self, stop=None, **kwargs):
            return {"ls_provider": "anthropic", "ls_model_name": self.model_name, "ls_model_type": "chat"}

    runguard.autolog(max_cost_usd=1.0)
    reply = AIMessage("hi", usage_metadata={"input_tokens": 1000, "output_tokens": 100, "total_tokens": 1100})
    AnthropicLikeChat(messages=iter([reply])).invoke("x")
    expected = float(calc_price(Usage(input_tokens=1000, output_tokens=100), model_ref="claude-3-5-haiku-latest",
                                provider_id="anthropic").total_price)
    assert runguard.current().cost_usd == pytest.approx(expected)


def test_an_internal_failure_degrades_to_the_unguarded_langchain_call(llm, server, monkeypatch, caplog):
    from runguard_autolog import _runtime
    from runguard_autolog.integrations import langchain as integration

    def broken(self, kwargs):
        raise KeyError("unexpected shape")

    monkeypatch.setattr(integration.LangChainEndpoint, "forecast", broken)
    _runtime.set_strict(False)
    try:
        runguard.autolog(max_calls=1)
        reply = AIMessage("hi")
        model = GenericFakeChatModel(messages=iter([reply, reply]))
        assert model.invoke("one").content == model.invoke("two").content == "hi"  # unguarded, not broken
        llm.invoke("three")  # LangChain's layer is unguarded; the openai SDK's patch still counts it
        with pytest.raises(runguard.RunGuardTripped):
            llm.invoke("four")
    finally:
        _runtime.set_strict(True)
    assert server.count() == 1
    assert sum("internal error during preflight" in r.getMessage() for r in caplog.records) == 1


def test_identical_request_loop_through_langchain_only_when_enabled(llm, server):
    runguard.autolog()
    for _ in range(8):
        llm.invoke("same question")
    assert server.count() == 8  # off by default
    runguard.autolog(loop_identical_requests=3)
    with runguard.session():
        with pytest.raises(runguard.RunGuardTripped) as info:
            for _ in range(8):
                llm.invoke("same question")
    assert info.value.limit == "loop_identical_requests"
    assert server.count() == 8 + 2


def test_chatopenai_internal_retries_count_and_the_trip_is_not_hidden(server):
    server.default = Reply(status=429, headers={"retry-after-ms": "1"})
    llm = ChatOpenAI(model=MODEL, base_url=server.base_url, api_key="test", max_retries=6)
    runguard.autolog()
    with pytest.raises(runguard.RunGuardTripped) as caught:
        llm.invoke("hello")
    assert server.count() == 5  # the default max_consecutive_429s, not 1 + 6 retries
    assert caught.value.limit == "max_consecutive_429s"
    assert runguard.current().requests == 5 and runguard.current().calls == 0


async def test_async_chatopenai_internal_retries_stop_at_the_trip(server):
    server.default = Reply(status=429, headers={"retry-after-ms": "1"})
    llm = ChatOpenAI(model=MODEL, base_url=server.base_url, api_key="test", max_retries=6,
                     http_async_client=httpx.AsyncClient())
    runguard.autolog(max_consecutive_429s=2)
    with pytest.raises(runguard.RunGuardTripped):
        await llm.ainvoke("hello")
    assert server.count() == 2
