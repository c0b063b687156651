"""litellm, and LangChain over Anthropic, under the breaker: counted once whether litellm goes
through the openai SDK underneath or its own HTTP client; ceilings, streams, exactness under
threads and asyncio, SDK retries. The real ``litellm`` and ``langchain-anthropic`` packages
against the package's fake server (litellm's price map is read locally, never fetched)."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

import runguard_autolog as runguard
from runguard_autolog.testing import Reply

from .conftest import wait_for

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
litellm = pytest.importorskip("litellm")

GPT, HAIKU = "openai/gpt-4o-mini", "anthropic/claude-3-5-haiku-latest"
MESSAGES = [{"role": "user", "content": "hello"}]


def complete(server, model: str = GPT, **extra):
    base = server.base_url.removesuffix("/v1") if model.startswith("anthropic/") else server.base_url
    messages = extra.pop("messages", MESSAGES)
    return litellm.completion(model=model, api_base=base, api_key="t", messages=messages, max_retries=0, **extra)


@pytest.mark.parametrize("model, path", [(GPT, "/chat/completions"), (HAIKU, "/v1/messages")])
def test_counted_once_through_the_openai_sdk_and_through_its_own_client(server, model, path):
    runguard.autolog(max_calls=3)
    sent = 0
    for _ in range(6):
        try:
            complete(server, model, max_tokens=50)
            sent += 1
        except runguard.RunGuardTripped as error:
            assert error.limit == "max_calls"
    assert sent == server.count(path) == server.count() == 3
    snap = runguard.current()
    assert (snap.calls, snap.requests, snap.input_tokens) == (3, 3, 30)
    assert snap.cost_usd > 0  # priced as litellm routes it (openai / anthropic)


def test_prices_follow_litellms_provider_parsing(server):
    server.default = Reply(usage=(1000, 100))
    runguard.autolog()
    complete(server, GPT)
    openai_cost = runguard.current().cost_usd
    runguard.reset()
    complete(server, HAIKU, max_tokens=200)
    claude_cost = runguard.current().cost_usd
    assert openai_cost == pytest.approx((1000 * 0.15 + 100 * 0.6) / 1e6)
    assert claude_cost == pytest.approx((1000 * 0.8 + 100 * 4.0) / 1e6)


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("model", [GPT, HAIKU])
def test_streams_are_metered_and_cut(server, model, mode):
    server.default = Reply(content=" ".join(["w"] * 300), chunk_delay=0.001)
    runguard.autolog(max_output_tokens=40)
    base = server.base_url.removesuffix("/v1") if model.startswith("anthropic/") else server.base_url
    request = {"model": model, "api_base": base, "api_key": "t", "messages": MESSAGES, "max_retries": 0,
               "stream": True}
    received: list[str] = []

    async def read_async():
        async for chunk in await litellm.acompletion(**request):
            received.append(chunk.choices[0].delta.content or "")

    with pytest.raises(runguard.RunGuardTripped) as cut:
        if mode == "sync":
            for chunk in litellm.completion(**request):
                received.append(chunk.choices[0].delta.content or "")
        else:
            asyncio.run(read_async())
    assert cut.value.limit == "max_output_tokens"
    assert len(received) < 100
    assert server.count() == 1
    assert wait_for(lambda: server.streams_cut == 1), "the HTTP response was not released"
    assert 40 < runguard.current().output_tokens < 100  # what arrived, not a provisional usage


def test_embeddings_count(server):
    runguard.autolog(max_calls=2)
    for _ in range(2):
        litellm.embedding(model="openai/text-embedding-3-small", api_base=server.base_url, api_key="t", input=["a"])
    with pytest.raises(runguard.RunGuardTripped):
        litellm.embedding(model="openai/text-embedding-3-small", api_base=server.base_url, api_key="t", input=["a"])
    assert server.count("/embeddings") == 2


@pytest.mark.parametrize("model", [GPT, HAIKU])
def test_exact_under_threads_and_asyncio(server, model):
    server.default = Reply(delay=0.005)
    runguard.autolog(max_calls=13)
    base = server.base_url.removesuffix("/v1") if model.startswith("anthropic/") else server.base_url

    def work(_):
        try:
            complete(server, model, max_tokens=20)
            return 1
        except runguard.RunGuardTripped:
            return 0

    with ThreadPoolExecutor(12) as pool:
        assert sum(pool.map(work, range(30))) == server.count() == 13
    server.reset()
    runguard.reset()
    runguard.autolog(max_calls=7)

    async def one():
        try:
            await litellm.acompletion(model=model, api_base=base, api_key="t", messages=MESSAGES, max_tokens=20,
                                      max_retries=0)
            return 1
        except runguard.RunGuardTripped:
            return 0

    async def many():
        return sum(await asyncio.gather(*(one() for _ in range(20))))

    assert asyncio.run(many()) == server.count() == 7


def test_sdk_retries_underneath_count_as_requests(server):
    server.script(Reply(status=500), Reply(status=500), Reply(content="fine"))
    runguard.autolog(max_requests=10)
    reply = litellm.completion(model=GPT, api_base=server.base_url, api_key="t", messages=MESSAGES, max_retries=2)
    assert reply.choices[0].message.content == "fine"
    snap = runguard.current()
    assert (snap.calls, snap.requests) == (1, 3) and server.count() == 3


def test_langchain_over_anthropic_is_counted_once(server):
    langchain_anthropic = pytest.importorskip("langchain_anthropic")
    model = langchain_anthropic.ChatAnthropic(model="claude-3-5-haiku-latest", base_url=server.base_url.removesuffix(
        "/v1"), api_key="t", max_retries=0, max_tokens=50)
    runguard.autolog(max_calls=2)
    assert model.invoke("hello").content == "ok"
    assert "".join(chunk.content for chunk in model.stream("hello")) == "ok"
    with pytest.raises(runguard.RunGuardTripped):
        model.invoke("hello")
    assert server.count("/v1/messages") == 2
    assert runguard.current().calls == 2


@pytest.mark.parametrize("model", [GPT, HAIKU])
def test_429s_trip_through_the_openai_sdk_and_through_litellms_own_client(server, model):
    server.default = Reply(status=429, headers={"retry-after": "0"})
    runguard.autolog(max_consecutive_429s=2)
    outcomes = []
    for _ in range(4):
        try:
            complete(server, model, max_tokens=20)
        except runguard.RunGuardTripped as error:
            outcomes.append(error.limit)
        except litellm.RateLimitError:
            outcomes.append("429")
    assert outcomes == ["429", "max_consecutive_429s", "max_consecutive_429s", "max_consecutive_429s"]
    assert server.count() == 2  # the second 429 tripped the scope: nothing more was sent
    assert runguard.current().requests == 2


@pytest.mark.parametrize("model", [GPT, HAIKU])
def test_tool_call_loops_trip(server, model):
    from runguard_autolog.testing import ToolCall

    server.default = Reply(tool_calls=[ToolCall("search", '{"q": "weather"}')])
    runguard.autolog(max_calls=100)
    messages = list(MESSAGES)
    tools = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]
    with pytest.raises(runguard.RunGuardTripped) as tripped:
        for _ in range(10):
            reply = complete(server, model, messages=messages, tools=tools, max_tokens=50)
            call = reply.choices[0].message.tool_calls[0]
            messages += [reply.choices[0].message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": "nothing"}]
    assert tripped.value.limit == "loop_repeats"
    assert server.count() == 3


def test_a_trip_is_recorded_on_the_mlflow_run(server, tracking):
    import mlflow

    runguard.autolog(max_calls=1, agent="litellm-agent")
    with mlflow.start_run() as run:
        complete(server)
        with pytest.raises(runguard.RunGuardTripped):
            complete(server)
    runguard.flush()
    data = mlflow.get_run(run.info.run_id).data
    assert data.tags["runguard.trip_limit"] == "max_calls" and data.tags["runguard.agent"] == "litellm-agent"
    assert data.metrics["runguard.tripped"] == 1 and data.metrics["runguard.calls"] == 1


def test_prompt_cache_reads_and_writes_through_litellm_are_priced_apart(server):
    from genai_prices import Usage, calc_price

    server.default = Reply(usage=(1000, 200), cache_read_input_tokens=4000, cache_creation_input_tokens=3000)
    runguard.autolog()
    complete(server, HAIKU, max_tokens=300)
    expected = calc_price(Usage(input_tokens=8000, output_tokens=200, cache_read_tokens=4000, cache_write_tokens=3000),
                          "claude-3-5-haiku-latest", provider_id="anthropic").total_price
    snap = runguard.current()
    assert (snap.input_tokens, snap.output_tokens) == (8000, 200)
    assert snap.cost_usd == pytest.approx(float(expected), rel=1e-9)


@pytest.mark.parametrize("model", [GPT, HAIKU])
def test_sessions_are_scopes_of_their_own(server, model):
    runguard.autolog(max_calls=100)
    with runguard.session("agent-a", max_calls=2):
        complete(server, model, max_tokens=20)
        complete(server, model, max_tokens=20)
        with pytest.raises(runguard.RunGuardTripped) as tripped:
            complete(server, model, max_tokens=20)
        assert tripped.value.scope == "session:agent-a"
    with runguard.session("agent-b", max_calls=2):
        complete(server, model, max_tokens=20)  # another session's trip does not stop this one
    assert server.count() == 3
    assert runguard.current().calls == 3  # the process scope saw every call sent
