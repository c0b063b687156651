"""The one-frame guard of a plain sync chat call (``_fastpath``) against the general driver:
which calls take it, that both count exactly the same, and that it never breaks the host."""

from __future__ import annotations

import logging

import pytest

import runguard_autolog as runguard
from runguard_autolog import _fastpath, _guard, _runtime
from runguard_autolog.testing import Reply, ToolCall

from .conftest import MESSAGES, MODEL


@pytest.fixture
def general_calls(monkeypatch):
    """How many calls went through the general driver's admit()."""
    seen = []
    admit = _guard.admit

    def counting_admit(endpoint, kwargs):
        seen.append(endpoint.name)
        return admit(endpoint, kwargs)

    monkeypatch.setattr(_guard, "admit", counting_admit)
    return seen


def test_a_plain_chat_call_takes_the_fast_path_in_any_scope(client, server, general_calls):
    runguard.autolog(max_calls=10)
    client.chat.completions.create(model=MODEL, messages=MESSAGES)  # first sight of the model: general
    assert len(general_calls) == 1
    client.chat.completions.create(model=MODEL, messages=MESSAGES)
    with runguard.session("s"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
    assert len(general_calls) == 1
    assert runguard.current().calls == 3 and server.count() == 3  # the process counts the session's call too


@pytest.mark.parametrize("extra", [
    {"n": 1},
    {"stream": False},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
    {"messages": [{"role": "user", "content": "héllo"}]},  # not ASCII: the estimate is not inlined
    {"messages": [{"role": "user", "content": "hi", "name": "ann"}]},
    {"model": "no-such-model"},
])
def test_other_calls_take_the_general_driver(client, server, general_calls, extra):
    runguard.autolog(max_calls=10)
    client.chat.completions.create(model=MODEL, messages=MESSAGES)
    request = {"model": MODEL, "messages": MESSAGES, **extra}
    client.chat.completions.create(**request)
    assert len(general_calls) == 2
    assert runguard.current().calls == 2 and server.count() == 2


def test_both_paths_count_exactly_the_same(client, server, general_calls):
    runguard.autolog(max_calls=100)
    server.default = Reply(body={  # with cached prompt tokens, priced at their own rate
        "id": "c1", "object": "chat.completion", "created": 0, "model": MODEL,
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "a b c"}}],
        "usage": {"prompt_tokens": 41, "completion_tokens": 3, "total_tokens": 44,
                  "prompt_tokens_details": {"cached_tokens": 32}},
    })
    client.chat.completions.create(model=MODEL, messages=MESSAGES)  # warms the price cache
    with runguard.session("fast") as fast:
        for _ in range(5):
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=50)
    assert len(general_calls) == 1
    with runguard.session("general") as general:
        for _ in range(5):  # n=1 changes nothing but the path
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=50, n=1)
    assert len(general_calls) == 6
    a, b = fast.snapshot(), general.snapshot()
    for counter in ("calls", "requests", "input_tokens", "output_tokens", "total_tokens", "cost_usd"):
        assert getattr(a, counter) == getattr(b, counter), counter
    assert (a.calls, a.input_tokens, a.output_tokens) == (5, 205, 15)
    rates = runguard.pricing.rates_for(MODEL, "openai")
    assert a.cost_usd == pytest.approx(5 * rates.cost(41, 3, 32)) and rates.cost(41, 3, 32) < rates.cost(41, 3)


def test_the_fast_path_trips_and_refuses_like_the_general_one(client, server):
    runguard.autolog(max_calls=3, loop_repeats=2)
    server.default = Reply(tool_calls=[ToolCall("search", '{"q": "x"}')])
    client.chat.completions.create(model=MODEL, messages=MESSAGES)
    client.chat.completions.create(model=MODEL, messages=MESSAGES)  # the second identical tool call
    with pytest.raises(runguard.RunGuardTripped) as trip:
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert trip.value.limit == "loop_repeats" and server.count() == 2
    runguard.reset()
    server.default = Reply()
    for _ in range(3):
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    with pytest.raises(runguard.RunGuardTripped) as trip:
        client.chat.completions.create(model=MODEL, messages=MESSAGES)  # before it is sent
    assert trip.value.limit == "max_calls" and trip.value.observed == 3
    assert server.count() == 5


def test_an_internal_failure_on_the_fast_path_degrades_to_one_unguarded_call(client, server, monkeypatch, caplog):
    runguard.autolog(max_calls=10)
    client.chat.completions.create(model=MODEL, messages=MESSAGES)
    _runtime.set_strict(False)

    def broken():
        raise KeyError("a bug inside runguard")

    monkeypatch.setattr(_fastpath, "Call", broken)
    with caplog.at_level(logging.WARNING, logger="runguard_autolog"):
        reply = client.chat.completions.create(model=MODEL, messages=MESSAGES)
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert reply.choices[0].message.content == "ok"
    assert server.count() == 3  # each call sent exactly once
    assert caplog.text.count("internal error during preflight") == 1
