"""Streams: output counted as chunks arrive; a breach closes the response and raises."""

from __future__ import annotations


import pytest

import runguard_autolog as runguard
from runguard_autolog.testing import Reply

from .conftest import MESSAGES, MODEL, wait_for

LONG = " ".join(f"w{i}" for i in range(300))


def test_stream_is_cut_mid_flight_when_output_ceiling_is_crossed(client, server):
    server.default = Reply(content=LONG, chunk_delay=0.002)
    runguard.autolog(max_output_tokens=20)
    received = []
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    with pytest.raises(runguard.RunGuardTripped) as info:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
    assert info.value.limit == "max_output_tokens"
    assert "mid-stream" in info.value.reason
    assert 15 <= len(received) <= 21  # stopped near the ceiling, far before 300
    assert server.count() == 1
    assert wait_for(lambda: server.streams_cut == 1), "the HTTP response was not released"
    assert server.streams_completed == 0
    with pytest.raises(runguard.RunGuardTripped):  # and the circuit is open
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert server.count() == 1


async def test_async_stream_is_cut_mid_flight(async_client, server):
    server.default = Reply(content=LONG, chunk_delay=0.002)
    runguard.autolog(max_output_tokens=20)
    received = 0
    stream = await async_client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    with pytest.raises(runguard.RunGuardTripped):
        async for chunk in stream:
            received += 1
    assert received < 30
    assert server.count() == 1
    assert wait_for(lambda: server.streams_cut == 1)


def test_stream_settles_with_the_usage_chunk_and_keeps_context_manager_use(client, server):
    server.default = Reply(content="a b c d", prompt_tokens=12)
    runguard.autolog(max_calls=2)
    with client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    ) as stream:
        assert stream.response.status_code == 200  # attributes pass through the proxy
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "a b c d"
    snapshot = runguard.current()
    assert (snapshot.calls, snapshot.input_tokens, snapshot.output_tokens) == (1, 12, 4)


def test_stream_without_usage_is_estimated_from_deltas(client, server):
    server.default = Reply(content="one two three four five six")
    runguard.autolog()
    for _ in client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True):
        pass
    snapshot = runguard.current()
    assert snapshot.calls == 1
    assert snapshot.output_tokens >= 6  # one per delta at least: a conservative estimate


def test_closing_a_stream_early_settles_it_once(client, server):
    server.default = Reply(content=LONG)
    runguard.autolog(max_calls=3)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    next(iter(stream))
    next(stream)
    stream.close()
    stream.close()
    assert runguard.current().calls == 1
    assert runguard.current().output_tokens >= 1


def test_chat_completions_stream_helper_is_guarded(client, server):
    server.default = Reply(content=LONG, chunk_delay=0.001)
    runguard.autolog(max_output_tokens=10)
    with pytest.raises(runguard.RunGuardTripped):
        with client.chat.completions.stream(model=MODEL, messages=MESSAGES) as stream:
            for _ in stream:
                pass
    assert server.count() == 1


def test_responses_stream_counts_output_and_uses_final_usage(client, server):
    server.default = Reply(content="x y z", prompt_tokens=9)
    runguard.autolog()
    events = [event.type for event in client.responses.create(model=MODEL, input="hi", stream=True)]
    assert events[-1] == "response.completed"
    snapshot = runguard.current()
    assert (snapshot.calls, snapshot.input_tokens, snapshot.output_tokens) == (1, 9, 3)


def test_responses_stream_is_cut_on_breach(client, server):
    server.default = Reply(content=LONG, chunk_delay=0.002)
    runguard.autolog(max_output_tokens=15)
    with pytest.raises(runguard.RunGuardTripped):
        for _ in client.responses.create(model=MODEL, input="hi", stream=True):
            pass
    assert wait_for(lambda: server.streams_cut == 1)


def test_stream_with_cap_is_refused_up_front_when_the_cap_does_not_fit(client, server):
    runguard.autolog(max_output_tokens=10)
    with pytest.raises(runguard.RunGuardTripped):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, max_tokens=50)
    assert server.count() == 0


def test_shadow_mode_records_a_mid_stream_breach_but_lets_the_stream_finish(client, server, caplog):
    server.default = Reply(content=" ".join(["w"] * 60))
    runguard.autolog(max_output_tokens=20, on_trip="warn")
    chunks = [c for c in client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)]
    assert len(chunks) >= 60
    assert wait_for(lambda: server.streams_completed == 1)
    assert any("would cut a stream" in r.message for r in caplog.records)


def test_a_stream_whose_content_is_a_list_of_parts_is_metered_and_cut(client, server):
    server.default = Reply(content=LONG, content_parts=True, chunk_delay=0.002)
    runguard.autolog(max_output_tokens=20)
    received = 0
    with pytest.raises(runguard.RunGuardTripped) as cut:
        for _ in client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True):
            received += 1
    assert cut.value.limit == "max_output_tokens"
    assert 0 < received < 100
    assert runguard.current().output_tokens >= 20
