"""Loop detection and context overflow on the openai SDK (agents written against it directly)."""

from __future__ import annotations

import json

import mlflow
import pytest
from mlflow import MlflowClient

import runguard_autolog as runguard
from runguard_autolog import _recording
from runguard_autolog._loops import canonical, tool_signature
from runguard_autolog.testing import Reply, ToolCall

from .conftest import MESSAGES, MODEL

TOOLS = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]


def agent_loop(client, turns: int, tools_run: list) -> None:
    """A raw-SDK ReAct loop: call the model, run every tool it asks for, feed results back."""
    messages = list(MESSAGES)
    for _ in range(turns):
        reply = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
        message = reply.choices[0].message
        if not message.tool_calls:
            return
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls:
            tools_run.append((call.function.name, call.function.arguments))
            messages.append({"role": "tool", "tool_call_id": call.id, "content": "no result"})


def test_the_same_tool_call_three_times_trips_before_the_next_billed_call(client, server):
    runguard.autolog(max_calls=100)
    server.default = Reply(tool_calls=[ToolCall("search", '{"q": "weather", "page": 1}')])
    tools_run: list = []
    with pytest.raises(runguard.RunGuardTripped) as info:
        agent_loop(client, 50, tools_run)
    assert server.count() == 3  # the third reply repeats the call: the fourth model call is refused
    assert info.value.limit == "loop_repeats"
    assert "search" in str(info.value) and "weather" not in str(info.value)  # never argument text
    assert len(tools_run) == 3  # the agent ran the tool for the replies it got, never a 4th time


def test_unguarded_control_runs_until_its_own_turn_limit(client, server):
    server.default = Reply(tool_calls=[ToolCall("search", '{"q": "weather"}')])
    tools_run: list = []
    agent_loop(client, 12, tools_run)
    assert server.count() == 12


def test_key_order_and_whitespace_do_not_hide_a_repeat(client, server):
    runguard.autolog()
    server.script(
        Reply(tool_calls=[ToolCall("search", '{"q": "x", "page": 1}')]),
        Reply(tool_calls=[ToolCall("search", '{ "page": 1,  "q": "x" }')]),
        Reply(tool_calls=[ToolCall("search", '{"page":1,"q":"x"}')]),
    )
    with pytest.raises(runguard.RunGuardTripped):
        agent_loop(client, 10, [])
    assert server.count() == 3


def test_a_short_cycle_trips(client, server):
    runguard.autolog()
    a, b = ToolCall("open_page", '{"url": "a"}'), ToolCall("open_page", '{"url": "b"}')
    server.script(*[Reply(tool_calls=[call]) for call in (a, b, a, b, a, b, a, b)])
    with pytest.raises(runguard.RunGuardTripped) as info:
        agent_loop(client, 10, [])
    assert server.count() == 5  # A-B-A-B-A: the third A trips, the sixth call is refused
    assert info.value.limit == "loop_repeats"


def test_one_tool_with_different_arguments_is_not_a_loop(client, server):
    runguard.autolog()
    server.script(*[Reply(tool_calls=[ToolCall("search", json.dumps({"q": f"topic {i}"}))]) for i in range(10)])
    server.default = Reply(content="done")
    tools_run: list = []
    agent_loop(client, 20, tools_run)
    assert len(tools_run) == 10
    assert server.count() == 11


def test_repeats_outside_the_window_are_not_a_loop(client, server):
    runguard.autolog(loop_repeats=3)  # window: the last 10 tool calls
    steps = ["A"] + [f"x{i}" for i in range(9)] + ["A"] + [f"y{i}" for i in range(9)] + ["A"]
    server.script(*[Reply(tool_calls=[ToolCall("t", json.dumps({"arg": s}))]) for s in steps])
    server.default = Reply(content="done")
    agent_loop(client, 40, [])
    assert server.count() == len(steps) + 1


def test_loop_repeats_is_configurable_and_reset_forgets_the_history(client, server):
    runguard.autolog(loop_repeats=2)
    server.default = Reply(tool_calls=[ToolCall("search", '{"q": 1}')])
    with pytest.raises(runguard.RunGuardTripped):
        agent_loop(client, 10, [])
    assert server.count() == 2
    runguard.reset()
    server.default = Reply(content="done")
    agent_loop(client, 10, [])  # one more call goes through: the history went with the circuit
    assert server.count() == 3


def test_responses_api_function_calls_are_watched(client, server):
    runguard.autolog()
    server.default = Reply(tool_calls=[ToolCall("lookup", '{"id": 7}')])
    with pytest.raises(runguard.RunGuardTripped) as info:
        for _ in range(10):
            client.responses.create(model=MODEL, input="find 7")
    assert server.count("/responses") == 3
    assert info.value.limit == "loop_repeats"


def test_streamed_tool_calls_are_watched(client, server):
    runguard.autolog()
    server.default = Reply(tool_calls=[ToolCall("search", '{"q": "stream"}')])
    with pytest.raises(runguard.RunGuardTripped):
        for _ in range(10):
            for _chunk in client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, stream=True):
                pass
    assert server.count() == 3


async def test_async_agent_loop_trips(async_client, server):
    runguard.autolog()
    server.default = Reply(tool_calls=[ToolCall("search", '{"q": "async"}')])
    with pytest.raises(runguard.RunGuardTripped):
        for _ in range(10):
            await async_client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS)
    assert server.count() == 3


def test_loop_state_belongs_to_the_innermost_session(client, server):
    runguard.autolog()
    server.default = Reply(tool_calls=[ToolCall("search", '{"q": "same"}')])
    for _ in range(3):  # each session sees the call twice: no loop in either
        with runguard.session():
            agent_loop(client, 2, [])
    assert server.count() == 6


def test_identical_requests_are_not_a_loop_by_default(client, server):
    runguard.autolog()
    for _ in range(8):
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert server.count() == 8


def test_identical_request_loop_when_enabled(client, server):
    runguard.autolog(loop_identical_requests=3)
    with pytest.raises(runguard.RunGuardTripped) as info:
        for _ in range(8):
            client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert server.count() == 2  # the third identical request is refused before it is sent
    assert info.value.limit == "loop_identical_requests"
    assert "terse" not in str(info.value)  # never prompt text


def test_identical_request_loop_ignores_changed_requests(client, server):
    runguard.autolog(loop_identical_requests=3)
    for i in range(8):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"question {i}"}])
    assert server.count() == 8


def test_context_overflow_is_refused_before_sending(client, server):
    runguard.autolog(max_input_tokens=10**9)
    long_prompt = "word " * 100_000  # ~167k estimated tokens > 0.95 x 128k for gpt-4o-mini
    with pytest.raises(runguard.RunGuardTripped) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_prompt}])
    assert server.count() == 0
    assert info.value.limit == "max_context_fraction"
    assert "128000" in str(info.value) and "word" not in str(info.value)


def test_context_fraction_is_configurable(client, server):
    runguard.autolog(max_context_fraction=0.01)  # 1% of 128k: 1,280 tokens
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x " * 1000}])
    with pytest.raises(runguard.RunGuardTripped):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x " * 3000}])
    assert server.count() == 1


def test_unknown_context_window_does_not_trip_and_logs_once(client, server, caplog):
    runguard.autolog(max_input_tokens=10**9)
    for _ in range(2):
        client.chat.completions.create(model="my-private-model", messages=[{"role": "user", "content": "y " * 300_000}])
    assert server.count() == 2
    notes = [r for r in caplog.records if "no context window" in r.getMessage()]
    assert len(notes) == 1


def test_loop_trip_is_recorded_on_the_run(client, server, tracking):
    runguard.autolog()
    server.default = Reply(tool_calls=[ToolCall("search", '{"q": "run"}')])
    with mlflow.start_run() as run:
        with pytest.raises(runguard.RunGuardTripped):
            agent_loop(client, 10, [])
    _recording.flush(10)
    tags = MlflowClient().get_run(run.info.run_id).data.tags
    assert tags["runguard.trip_limit"] == "loop_repeats"
    assert tags["runguard.tripped"].startswith("tool-call loop: search")


def test_canonical_arguments():
    assert canonical('{"b": 1, "a": [1, 2]}') == canonical({"a": [1, 2], "b": 1})
    assert canonical("not json") == b"not json"
    huge = '{"q": "' + "z" * 100_000 + '"}'
    assert canonical(huge) == huge.encode()  # too long to parse: hashed as text
    assert tool_signature("a", "{}")[0] != tool_signature("b", "{}")[0]
    assert len(tool_signature("a", huge)[0]) == 16  # only a digest is kept
