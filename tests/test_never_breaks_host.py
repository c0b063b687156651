"""Failures inside runguard degrade to the unguarded call (called exactly once) and log once;
SDK errors propagate unchanged; only RunGuardTripped is raised by design."""

from __future__ import annotations


import httpx
import openai
import pytest

import runguard_autolog as runguard
from runguard_autolog import _runtime
from runguard_autolog.testing import Reply

from .conftest import MODEL, chat, mock_client

ODD_SHAPE = {
    "id": "x", "object": "chat.completion", "created": 0, "model": MODEL,
    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}],
    "usage": {"prompt_tokens": "lots", "completion_tokens": None},
}


@pytest.fixture
def lenient():
    _runtime.set_strict(False)
    yield
    _runtime.set_strict(True)


def _runguard_warnings(caplog):
    return [r for r in caplog.records if r.name == "runguard_autolog" and "internal error" in r.message]


def test_unparseable_usage_degrades_to_the_unguarded_result_and_logs_once(client, server, lenient, caplog):
    server.default = Reply(body=ODD_SHAPE)
    runguard.autolog(max_calls=10)
    results = [chat(client) for _ in range(3)]
    assert [r.choices[0].message.content for r in results] == ["hi"] * 3
    assert server.count() == 3  # each call sent exactly once
    assert len(_runguard_warnings(caplog)) == 1
    assert runguard.current().calls == 3  # still counted (charged its forecast)


def test_strict_mode_surfaces_internal_errors_for_tests(client, server):
    server.default = Reply(body=ODD_SHAPE)
    runguard.autolog()
    with pytest.raises(TypeError, match="usage shape"):
        chat(client)


def test_a_failing_preflight_calls_the_original_exactly_once(client, server, lenient, caplog):
    class BrokenEncoding:
        def encode(self, *args, **kwargs):
            raise RuntimeError("tokenizer exploded")

    runguard.register_encoding("gpt-4o-mini*", BrokenEncoding())
    runguard.autolog(max_calls=1)
    assert chat(client).choices[0].message.content == "ok"
    assert chat(client).choices[0].message.content == "ok"
    assert server.count() == 2
    assert len(_runguard_warnings(caplog)) == 1
    assert "preflight" in _runguard_warnings(caplog)[0].message


def test_a_failing_stream_accounting_keeps_yielding_chunks(client, server, lenient, caplog, monkeypatch):
    from runguard_autolog.integrations import openai as openai_integration

    def boom(self, chunk):
        raise ValueError("odd chunk")

    monkeypatch.setattr(openai_integration.Endpoint, "chunk_usage", boom)
    server.default = Reply(content="a b c d e")
    runguard.autolog()
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "a b c d e"
    assert len(_runguard_warnings(caplog)) == 1
    assert runguard.current().calls == 1


def test_sdk_errors_propagate_unchanged_and_release_the_reservation(client, server):
    server.default = Reply(status=404, content="no such model")
    runguard.autolog(max_calls=2)
    for _ in range(3):
        with pytest.raises(openai.NotFoundError):
            chat(client)
    assert runguard.current().calls == 0  # nothing billed, nothing held
    assert runguard.current().requests == 3  # but each HTTP attempt counts
    assert runguard.current().tripped is None


def test_mock_transport_in_process_client_is_guarded_too():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={**ODD_SHAPE, "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})

    runguard.autolog(max_calls=1)
    client = mock_client(handler)
    chat(client)
    with pytest.raises(runguard.RunGuardTripped):
        chat(client)
    assert len(seen) == 1


def test_tracking_failures_never_replace_the_trip(client, server, tracking, caplog, monkeypatch):
    import mlflow

    from runguard_autolog import _recording

    def fail(*args, **kwargs):
        raise ConnectionError("tracking server down")

    monkeypatch.setattr(_recording, "write_run", fail)
    monkeypatch.setattr(mlflow, "get_current_active_span", fail)
    runguard.autolog(max_calls=1)
    with mlflow.start_run():
        chat(client)
        with pytest.raises(runguard.RunGuardTripped):
            chat(client)
        runguard.flush()
    messages = [r.message for r in caplog.records if r.name == "runguard_autolog"]
    assert any("could not write to MLflow" in m for m in messages)
    assert any("could not record a refusal" in m for m in messages)


def test_one_shot_iterables_are_counted_without_being_consumed(client, server):
    runguard.autolog(max_calls=5)
    messages = ({"role": "user", "content": f"part {i}"} for i in range(3))
    chat(client, messages=messages)
    assert [m["content"] for m in server.requests[-1]["body"]["messages"]] == ["part 0", "part 1", "part 2"]
    client.embeddings.create(model="text-embedding-3-small", input=iter(["a", "b"]))
    assert server.requests[-1]["body"]["input"] == ["a", "b"]
    assert runguard.current().calls == 2
