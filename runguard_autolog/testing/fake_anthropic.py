"""The Anthropic Messages API on the loopback fake server: JSON and SSE streaming, ``tool_use``,
``count_tokens``, and errors shaped as Anthropic sends them (429 ``rate_limit_error`` with
``retry-after``, 529 ``overloaded_error``, ...).

Every fake server answers these paths; ``FakeAnthropicServer`` is the same server as
``FakeOpenAIServer`` (one script, one record of requests), its ``base_url`` as the ``anthropic``
client wants it::

    with FakeAnthropicServer() as server:
        client = anthropic.Anthropic(base_url=server.base_url, api_key="test")
        server.script(Reply(status=529), Reply(content="hi", tool_calls=[ToolCall("search", '{"q": "x"}')]))
"""

from __future__ import annotations

import json
from typing import Any

from .replies import Reply, completion_tokens

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def is_messages(path: str) -> bool:
    return path.endswith(("/v1/messages", "/v1/messages/count_tokens"))


def error_json(reply: Reply) -> dict:
    message = reply.content if reply.content != "ok" else "error"
    return {"type": "error", "error": {"type": ERROR_TYPES.get(reply.status, "api_error"), "message": message}}


def _usage(reply: Reply, prompt: int, completion: int) -> dict[str, int]:
    return {
        "input_tokens": prompt,
        "output_tokens": completion,
        "cache_creation_input_tokens": reply.cache_creation_input_tokens,
        "cache_read_input_tokens": reply.cache_read_input_tokens,
    }


def _blocks(reply: Reply, pieces: list[str]) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = [{"type": "text", "text": "".join(pieces)}] if pieces else []
    for i, tool in enumerate(reply.tool_calls):
        blocks.append({"type": "tool_use", "id": f"toolu_{i}", "name": tool.name, "input": json.loads(tool.arguments)})
    return blocks


def _stop_reason(reply: Reply, body: dict, pieces: list[str]) -> str:
    if reply.tool_calls:
        return "tool_use"
    words = len(reply.content.split(" ")) if reply.content else 0
    return "max_tokens" if len(pieces) < words else "end_turn"


def message_json(reply: Reply, body: dict) -> dict:
    pieces, prompt, completion = completion_tokens(reply, body)
    return {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": reply.model or body.get("model", "claude-3-5-haiku-latest"),
        "content": _blocks(reply, pieces),
        "stop_reason": _stop_reason(reply, body, pieces),
        "stop_sequence": None,
        "usage": _usage(reply, prompt, completion),
    }


def count_tokens_json(reply: Reply, body: dict) -> dict:
    return {"input_tokens": reply.usage[0] if reply.usage else reply.prompt_tokens}


def message_events(reply: Reply, body: dict):
    """The SSE events of a streamed message, in Anthropic's order; output tokens grow per delta."""
    pieces, prompt, completion = completion_tokens(reply, body)
    model = reply.model or body.get("model", "claude-3-5-haiku-latest")
    start: dict[str, Any] = {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": _usage(reply, prompt, 1),
    }
    yield {"type": "message_start", "message": start}
    index = 0
    if pieces:
        yield {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
        yield {"type": "ping"}
        for piece in pieces:
            yield {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}
        yield {"type": "content_block_stop", "index": 0}
        index = 1
    for offset, tool in enumerate(reply.tool_calls):
        block = {"type": "tool_use", "id": f"toolu_{offset}", "name": tool.name, "input": {}}
        yield {"type": "content_block_start", "index": index + offset, "content_block": block}
        delta = {"type": "input_json_delta", "partial_json": tool.arguments}
        yield {"type": "content_block_delta", "index": index + offset, "delta": delta}
        yield {"type": "content_block_stop", "index": index + offset}
    stop = {"stop_reason": _stop_reason(reply, body, pieces), "stop_sequence": None}
    yield {"type": "message_delta", "delta": stop, "usage": {"output_tokens": completion}}
    yield {"type": "message_stop"}
