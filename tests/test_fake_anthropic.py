"""The package's fake Anthropic Messages server, driven by the real ``anthropic`` SDK: what the
SDK parses from it (text, ``tool_use``, usage with cache tokens, SSE streams, ``count_tokens``),
its errors as the SDK types them, and a 429 with ``retry-after`` retried by the SDK (each attempt
reaches the server, as with a real provider)."""

from __future__ import annotations

import time

import pytest

from runguard_autolog.testing import FakeAnthropicServer, Reply, ToolCall

anthropic = pytest.importorskip("anthropic")

MODEL = "claude-3-5-haiku-latest"
MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def _server():
    with FakeAnthropicServer() as server:
        yield server


@pytest.fixture
def server(_server):
    _server.reset()
    yield _server
    _server.reset()


def client_for(server: FakeAnthropicServer, retries: int = 0) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key="test", max_retries=retries)


def test_a_message_with_text_tool_use_and_usage(server):
    server.script(
        Reply(content="let me look", tool_calls=[ToolCall("search", '{"q": "runguard"}')], usage=(120, 9),
              cache_read_input_tokens=50, cache_creation_input_tokens=7)
    )
    message = client_for(server).messages.create(model=MODEL, max_tokens=100, messages=MESSAGES)
    assert [block.type for block in message.content] == ["text", "tool_use"]
    assert message.content[0].text == "let me look"
    assert (message.content[1].name, message.content[1].input) == ("search", {"q": "runguard"})
    assert message.stop_reason == "tool_use" and message.model == MODEL
    usage = message.usage
    assert (usage.input_tokens, usage.output_tokens) == (120, 9)
    assert (usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (50, 7)
    assert server.requests[0]["body"]["max_tokens"] == 100


def test_max_tokens_cuts_the_reply(server):
    server.default = Reply(content="one two three four five")
    message = client_for(server).messages.create(model=MODEL, max_tokens=2, messages=MESSAGES)
    assert message.content[0].text == "one two" and message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 2


def test_streams_as_events_and_through_messages_stream(server):
    server.default = Reply(content="a b c d", tool_calls=[ToolCall("t", '{"x": 1}')])
    events = list(client_for(server).messages.create(model=MODEL, max_tokens=50, messages=MESSAGES, stream=True))
    kinds = [event.type for event in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta") \
        == "a b c d"
    assert events[-2].usage.output_tokens == 4 + 1 + len('{"x": 1}') // 4
    with client_for(server).messages.stream(model=MODEL, max_tokens=50, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "a b c d"
    assert final.content[1].input == {"x": 1} and final.usage.input_tokens == 10
    # the server counts a stream after its last byte, which the client may have read first
    deadline = time.time() + 3
    while server.streams_completed < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert server.streams_completed == 2


def test_count_tokens_and_async(server):
    assert client_for(server).messages.count_tokens(model=MODEL, messages=MESSAGES).input_tokens == 10
    assert server.count("/v1/messages/count_tokens") == 1

    async def call():
        client = anthropic.AsyncAnthropic(base_url=server.base_url, api_key="test", max_retries=0)
        return await client.messages.create(model=MODEL, max_tokens=5, messages=MESSAGES)

    import asyncio

    assert asyncio.run(call()).content[0].text == "ok"


@pytest.mark.parametrize(
    "status, error",
    [(400, "BadRequestError"), (401, "AuthenticationError"), (429, "RateLimitError"), (500, "InternalServerError"),
     (529, "OverloadedError")],
)
def test_errors_are_typed_by_the_sdk(server, status, error):
    server.default = Reply(status=status)
    with pytest.raises(anthropic.APIStatusError) as raised:
        client_for(server).messages.create(model=MODEL, max_tokens=5, messages=MESSAGES)
    assert type(raised.value).__name__ == error and raised.value.status_code == status
    assert server.count("/v1/messages") == 1


def test_a_429_with_retry_after_is_retried_by_the_sdk(server):
    server.script(Reply(status=429, headers={"retry-after": "0"}), Reply(status=529), Reply(content="done"))
    message = client_for(server, retries=3).messages.create(model=MODEL, max_tokens=5, messages=MESSAGES)
    assert message.content[0].text == "done"
    assert server.count("/v1/messages") == 3  # every attempt left the process
    server.script(Reply(status=429, headers={"retry-after": "7"}))
    with pytest.raises(anthropic.RateLimitError) as limited:
        client_for(server, retries=0).messages.create(model=MODEL, max_tokens=5, messages=MESSAGES)
    assert limited.value.response.headers["retry-after"] == "7"
    assert limited.value.body["error"]["type"] == "rate_limit_error"
