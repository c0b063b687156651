"""The Anthropic SDK under the breaker: the same ceilings, scopes, exactness under threads and
asyncio, 429/529 guard, loop detection, prices (prompt-cache reads and writes) and MLflow record
as openai, driven by the real ``anthropic`` package against the package's fake server."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import mlflow
import pytest
from genai_prices import Usage, calc_price

import runguard_autolog as runguard
from runguard_autolog.testing import Reply, ToolCall

from .conftest import wait_for

anthropic = pytest.importorskip("anthropic")

MODEL = "claude-3-5-haiku-latest"
MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture
def claude(server):
    return anthropic.Anthropic(base_url=server.base_url.removesuffix("/v1"), api_key="t", max_retries=0)


@pytest.fixture
def async_claude(server):
    return anthropic.AsyncAnthropic(base_url=server.base_url.removesuffix("/v1"), api_key="t", max_retries=0)


def ask(client, **extra):
    return client.messages.create(model=MODEL, max_tokens=extra.pop("max_tokens", 100), messages=MESSAGES, **extra)


def test_call_ceiling_is_sticky_and_counts_what_was_sent(claude, server):
    runguard.autolog(max_calls=3)
    sent = 0
    for _ in range(6):
        try:
            ask(claude)
            sent += 1
        except runguard.RunGuardTripped as error:
            assert error.limit == "max_calls"
    assert sent == server.count("/v1/messages") == 3
    snap = runguard.current()
    assert (snap.calls, snap.requests, snap.input_tokens, snap.output_tokens) == (3, 3, 30, 3)


def test_cost_counts_prompt_cache_reads_and_writes_at_their_own_prices(claude, server):
    server.default = Reply(usage=(1000, 200), cache_read_input_tokens=4000, cache_creation_input_tokens=3000)
    runguard.autolog(max_cost_usd=1.0)
    ask(claude)
    expected = calc_price(
        Usage(input_tokens=8000, output_tokens=200, cache_read_tokens=4000, cache_write_tokens=3000),
        MODEL,
        provider_id="anthropic",
    ).total_price
    snap = runguard.current()
    assert snap.input_tokens == 8000 and snap.output_tokens == 200
    assert snap.cost_usd == pytest.approx(float(expected), rel=1e-9)


def test_max_tokens_bounds_the_forecast_so_a_cost_ceiling_is_never_overshot(claude, server):
    server.default = Reply(content=" ".join(["w"] * 400))
    runguard.autolog(max_cost_usd=0.004, max_calls="none")
    sent = 0
    for _ in range(20):
        try:
            ask(claude, max_tokens=300)
            sent += 1
        except runguard.RunGuardTripped as error:
            assert error.limit == "max_cost_usd"
            break
    assert runguard.current().cost_usd <= 0.004
    assert sent == server.count("/v1/messages") and sent >= 1


def test_count_tokens_is_not_billed(claude, server):
    runguard.autolog(max_calls=1)
    ask(claude)
    for _ in range(3):
        assert claude.messages.count_tokens(model=MODEL, messages=MESSAGES).input_tokens == 10
    assert runguard.current().calls == 1
    assert server.count("/v1/messages/count_tokens") == 3


def test_exact_under_threads(server):
    client = anthropic.Anthropic(base_url=server.base_url.removesuffix("/v1"), api_key="t", max_retries=0)
    server.default = Reply(delay=0.005)
    runguard.autolog(max_calls=25)

    def work(_):
        done = 0
        for _ in range(10):
            try:
                ask(client)
                done += 1
            except runguard.RunGuardTripped:
                return done
        return done

    with ThreadPoolExecutor(16) as pool:
        assert sum(pool.map(work, range(16))) == server.count("/v1/messages") == 25


async def test_exact_under_asyncio(async_claude, server):
    runguard.autolog(max_calls=17)

    async def one():
        try:
            await async_claude.messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)
            return 1
        except runguard.RunGuardTripped:
            return 0

    assert sum(await asyncio.gather(*(one() for _ in range(40)))) == server.count("/v1/messages") == 17


def test_streams_settle_their_usage_in_both_forms(claude, server):
    server.default = Reply(content="one two three four", usage=(50, 4))
    runguard.autolog()
    with claude.messages.stream(model=MODEL, max_tokens=50, messages=MESSAGES) as stream:
        assert "".join(stream.text_stream) == "one two three four"
    events = list(ask(claude, stream=True))
    assert events[-1].type == "message_stop"
    snap = runguard.current()
    assert (snap.calls, snap.input_tokens, snap.output_tokens) == (2, 100, 8)


# the request caps output at 50 tokens, which a proxy ignoring it (the body's 1000) overruns
OVERRUN = {"model": MODEL, "max_tokens": 50, "messages": MESSAGES, "extra_body": {"max_tokens": 1000}}


def _read_stream(client, form: str, received: list[str]) -> None:
    """Read a stream of text deltas in one of the two forms (``create(stream=True)`` events or the
    ``messages.stream`` helper) into ``received`` as they arrive (what arrived before a cut stays)."""
    request = OVERRUN
    if form == "create":
        for event in client.messages.create(stream=True, **request):
            if event.type == "content_block_delta":
                received.append(event.delta.text)
    else:
        with client.messages.stream(**request) as stream:
            for text in stream.text_stream:
                received.append(text)


async def _aread_stream(client, form: str, received: list[str]) -> None:
    request = OVERRUN
    if form == "create":
        async for event in await client.messages.create(stream=True, **request):
            if event.type == "content_block_delta":
                received.append(event.delta.text)
    else:
        async with client.messages.stream(**request) as stream:
            async for text in stream.text_stream:
                received.append(text)


# haiku: 10 input tokens at $0.8/Mtok + 50 forecast output at $4/Mtok = $0.000208, admitted
CUTS = {"max_output_tokens": 60, "max_cost_usd": 0.00025}


@pytest.mark.parametrize("limit", sorted(CUTS))
@pytest.mark.parametrize("form", ["create", "stream"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_stream_is_cut_mid_flight_when_it_crosses_a_ceiling(server, form, mode, limit):
    """Output beyond the request's own cap (a proxy that ignores it) is cut as it streams, in both
    forms, sync and async, on output and on cost; what arrived is what is counted."""
    server.default = Reply(content=" ".join(["w"] * 300), chunk_delay=0.001, usage=(10, 300))
    runguard.autolog(**{limit: CUTS[limit]})
    base = server.base_url.removesuffix("/v1")
    received: list[str] = []
    with pytest.raises(runguard.RunGuardTripped) as cut:
        if mode == "sync":
            _read_stream(anthropic.Anthropic(base_url=base, api_key="t", max_retries=0), form, received)
        else:
            client = anthropic.AsyncAnthropic(base_url=base, api_key="t", max_retries=0)
            asyncio.run(_aread_stream(client, form, received))
    assert cut.value.limit == limit
    assert server.count("/v1/messages") == 1
    assert wait_for(lambda: server.streams_cut == 1), "the HTTP response was not released"
    snap = runguard.current()
    assert 50 < snap.output_tokens < 100  # the deltas that arrived, not the 1 token message_start says
    # every delta that arrived is counted (the one that crossed the ceiling too, not handed over)
    assert snap.output_tokens == len(received) + 1


@pytest.mark.parametrize("form", ["create", "stream"])
def test_a_stream_left_after_its_final_usage_counts_the_replys_usage(claude, server, form):
    """Closed, exited or dropped after the final usage arrived (no StopIteration): the reply's usage
    counts, not runguard's own estimate of the text."""
    server.default = Reply(content=" ".join(["wordy"] * 30), usage=(10, 30))
    runguard.autolog()
    if form == "create":
        events = ask(claude, stream=True, max_tokens=1000)
        for event in events:
            if event.type == "message_delta":  # the final usage: message_stop is still to come
                break
        events.close()
    else:
        with claude.messages.stream(model=MODEL, max_tokens=1000, messages=MESSAGES) as stream:
            for event in stream:
                if event.type == "message_delta":
                    break
    snap = runguard.current()
    assert (snap.calls, snap.output_tokens) == (1, 30)


def test_a_stream_closed_early_counts_what_arrived(claude, server):
    server.default = Reply(content=" ".join(["w"] * 300), usage=(10, 300))
    runguard.autolog()
    events = ask(claude, stream=True, max_tokens=1000)
    deltas = 0
    for event in events:
        deltas += event.type == "content_block_delta"
        if deltas == 30:
            break
    events.close()
    snap = runguard.current()
    assert snap.calls == 1 and snap.output_tokens == 30


def test_sdk_retries_are_requests_and_429s_trip_with_retry_after(server):
    client = anthropic.Anthropic(base_url=server.base_url.removesuffix("/v1"), api_key="t", max_retries=5)
    runguard.autolog(max_consecutive_429s=3)
    server.default = Reply(status=429, headers={"retry-after": "0"})
    with pytest.raises(runguard.RunGuardTripped) as tripped:
        ask(client)
    assert tripped.value.limit == "max_consecutive_429s"
    assert server.count("/v1/messages") == 3  # the SDK would have retried 5 times
    server.reset()
    runguard.reset()
    server.default = Reply(status=529, headers={"retry-after": "2"})  # overloaded: throttled like a 429
    client = anthropic.Anthropic(base_url=server.base_url.removesuffix("/v1"), api_key="t", max_retries=0)
    runguard.autolog(max_consecutive_429s=2)
    with pytest.raises(anthropic.APIStatusError):
        ask(client)
    with pytest.raises(runguard.RunGuardTripped) as tripped:
        ask(client)
    assert tripped.value.limit == "max_consecutive_429s" and "Retry-After: 2 s" in tripped.value.reason
    assert server.count("/v1/messages") == 2
    server.reset()
    runguard.reset()
    client = anthropic.Anthropic(base_url=server.base_url.removesuffix("/v1"), api_key="t", max_retries=5)
    server.script(Reply(status=529), Reply(status=500), Reply(content="fine"))
    runguard.autolog(max_consecutive_429s=5)
    assert ask(client).content[0].text == "fine"
    snap = runguard.current()
    assert (snap.calls, snap.requests) == (1, 3)


def test_tool_use_loops_trip_before_the_next_billed_call(claude, server):
    server.default = Reply(tool_calls=[ToolCall("search", '{"q": "weather", "page": 1}')])
    runguard.autolog(max_calls=100)
    messages = list(MESSAGES)
    with pytest.raises(runguard.RunGuardTripped) as tripped:
        for _ in range(20):
            reply = claude.messages.create(model=MODEL, max_tokens=100, messages=messages)
            messages.append({"role": "assistant", "content": [block.model_dump() for block in reply.content]})
            tool_use = next(block for block in reply.content if block.type == "tool_use")
            messages.append({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": tool_use.id, "content": "no result"}]})
    assert tripped.value.limit == "loop_repeats"
    assert server.count("/v1/messages") == 3
    assert "weather" not in str(tripped.value)


def test_a_trip_is_recorded_on_the_mlflow_run(claude, server, tracking):
    runguard.autolog(max_calls=2, agent="claude-agent")
    with mlflow.start_run() as run:
        with pytest.raises(runguard.RunGuardTripped):
            for _ in range(3):
                ask(claude)
    runguard.flush()
    data = mlflow.get_run(run.info.run_id).data
    assert data.tags["runguard.trip_limit"] == "max_calls"
    assert data.tags["runguard.agent"] == "claude-agent"
    assert data.metrics["runguard.calls_at_trip"] == 2
    assert data.metrics["runguard.tripped"] == 1


def test_context_windows_come_from_genai_prices(claude, server):
    runguard.autolog(max_context_fraction=0.5)
    big = "word " * 120_000  # about 160k tokens by the conservative estimate: over half of 200k
    with pytest.raises(runguard.RunGuardTripped) as tripped:
        claude.messages.create(model=MODEL, max_tokens=100, messages=[{"role": "user", "content": big}])
    assert tripped.value.limit == "max_context_fraction"
    assert server.count("/v1/messages") == 0


def test_sessions_are_scopes_of_their_own(claude, server):
    runguard.autolog(max_calls=100)
    with runguard.session("agent-a", max_calls=2):
        ask(claude)
        ask(claude)
        with pytest.raises(runguard.RunGuardTripped) as tripped:
            ask(claude)
        assert tripped.value.scope == "session:agent-a"
    with runguard.session("agent-b", max_calls=2):
        ask(claude)  # another session's trip does not stop this one
    assert server.count("/v1/messages") == 3
    assert runguard.current().calls == 3  # the process scope saw every call sent
