"""anthropic SDK: ``messages.create`` (sync and async, ``stream=True`` included) and
``messages.stream``, plus every HTTP attempt of the client (its own retries).

``messages.count_tokens`` is not billed and not patched. The request's ``max_tokens`` (mandatory
in this API) bounds the forecast output. Usage is read from ``usage``: the input counted is all
of it (``input_tokens`` plus the tokens read from and written to the prompt cache), the cache
reads priced at the cache-read rate and the writes at the cache-write rate (genai-prices).
``tool_use`` blocks feed loop detection. Functions here only read requests, replies and stream
events; they do no I/O and keep no state.
"""

from __future__ import annotations

import json
from typing import Any

from .. import pricing, tokens
from .._attempts import HttpxReader, async_attempt, sync_attempt
from .._call import Endpoint as _Endpoint
from .._call import Usage
from .._guard import async_driver, sync_driver
from .._patching import PatchSpec

NAME = "anthropic"
TARGET_MODULE = "anthropic"


class Endpoint(_Endpoint):
    """How to read a Messages API request (the call's keywords), reply and stream events."""

    __slots__ = ("name", "prices", "provider")
    stream_key = "stream"

    def __init__(self, name: str) -> None:
        self.name = name
        self.provider = "anthropic"
        self.prices = pricing.table_for(self.provider)

    # -- request ---------------------------------------------------------------------------
    def forecast(self, kwargs: dict) -> tuple[str, int, int]:
        model: Any = kwargs.get("model") or ""
        if not isinstance(model, str):
            model = str(model)
        messages = kwargs.get("messages")
        if type(messages) is not list and messages is not None:
            messages = kwargs["messages"] = list(messages)  # a one-shot iterable, kept for the SDK
        prompt = tokens.messages_tokens(messages, model)
        system = kwargs.get("system")
        if system:
            prompt += tokens.counter_for(model)(tokens.text_of(system) if not isinstance(system, str) else system)
        if kwargs.get("tools"):
            prompt += tokens.tools_tokens(kwargs["tools"], model)
        cap = kwargs.get("max_tokens")
        return model, prompt, cap if type(cap) is int and cap > 0 else 0

    def payload(self, kwargs: dict) -> Any:
        return {"messages": kwargs.get("messages"), "system": kwargs.get("system"), "tools": kwargs.get("tools")}

    # -- reply -----------------------------------------------------------------------------
    def reply(self, result: Any, tools: bool) -> tuple[Usage | None, list]:
        return self.usage(result), self.tool_calls(result) if tools else []

    def usage(self, result: Any) -> Usage | None:
        usage = getattr(result, "usage", None)
        if usage is None and hasattr(result, "http_response") and callable(getattr(result, "parse", None)):
            usage = getattr(result.parse(), "usage", None)  # .with_raw_response (parsing is cached)
        return None if usage is None else read_usage(usage)

    def tool_calls(self, result: Any) -> list[tuple[str, Any]]:
        content = getattr(result, "content", None)
        if content is None and hasattr(result, "http_response"):
            content = getattr(result.parse(), "content", None)
        return [
            (block.name, json.dumps(block.input, sort_keys=True, default=str))
            for block in content or ()
            if getattr(block, "type", None) == "tool_use"
        ]

    def reply_model(self, result: Any) -> Any:
        return getattr(result, "model", None)

    # -- stream events ---------------------------------------------------------------------
    def chunk_usage(self, chunk: Any, usage: Usage | None) -> Usage | None:
        kind = getattr(chunk, "type", None)
        if kind == "message_start":
            return read_usage(chunk.message.usage)
        if kind == "message_delta" and getattr(chunk, "usage", None) is not None:
            output = chunk.usage.output_tokens  # cumulative
            if usage is None:
                return read_usage(chunk.usage)
            return (usage[0], output, *usage[2:]) if isinstance(output, int) and output >= 0 else usage
        return usage

    def chunk_tool_calls(self, chunk: Any, into: dict) -> None:
        kind = getattr(chunk, "type", None)
        if kind == "content_block_start" and getattr(chunk.content_block, "type", None) == "tool_use":
            into[chunk.index] = [chunk.content_block.name, ""]
        elif kind == "content_block_delta" and getattr(chunk.delta, "type", None) == "input_json_delta":
            entry = into.get(chunk.index)
            if entry is not None:
                entry[1] += chunk.delta.partial_json or ""

    def chunk_text(self, chunk: Any) -> str:
        if getattr(chunk, "type", None) != "content_block_delta":
            return ""
        delta = chunk.delta
        kind = getattr(delta, "type", None)
        if kind == "text_delta":
            return delta.text or ""
        if kind == "input_json_delta":
            return delta.partial_json or ""
        if kind == "thinking_delta":
            return delta.thinking or ""
        return ""


def read_usage(usage: Any) -> Usage:
    """(all input tokens, output, read from the prompt cache, written to it), or a TypeError for
    a shape we do not know."""
    get = usage.get if isinstance(usage, dict) else lambda name: getattr(usage, name, None)
    fresh = get("input_tokens") or 0
    output = get("output_tokens") or 0
    read = get("cache_read_input_tokens") or 0
    written = get("cache_creation_input_tokens") or 0
    for value in (fresh, output, read, written):
        if not isinstance(value, int) or value < 0:
            raise TypeError(f"unexpected usage shape from anthropic: {usage!r:.200}")
    return fresh + read + written, output, read, written


MESSAGES = Endpoint("anthropic.messages")


_READER = HttpxReader(in_tuple=True)


# ``messages.stream(...)`` returns a manager that sends its request on ``__enter__`` through a
# function of its own (not ``create``); the async manager awaits a coroutine made up front. That
# request is guarded as a streaming ``create`` would be, so the events the SDK's MessageStream
# reads are metered and cut like any stream.
def _stream_manager(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    manager = wrapped(*args, **kwargs)
    request = getattr(manager, "_MessageStreamManager__api_request", None)
    if request is not None:  # (an SDK shape this does not know is left as it is)
        sent = {**kwargs, "stream": True}
        manager._MessageStreamManager__api_request = lambda: _SYNC_STREAM(lambda **_: request(), instance, (), sent)
    return manager


def _async_stream_manager(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    manager = wrapped(*args, **kwargs)
    pending = getattr(manager, "_AsyncMessageStreamManager__api_request", None)
    if pending is not None:
        sent = {**kwargs, "stream": True}

        async def request() -> Any:
            try:
                return await _ASYNC_STREAM(lambda **_: pending, instance, (), sent)
            finally:
                pending.close()  # a request refused before it was sent: never awaited, no warning

        manager._AsyncMessageStreamManager__api_request = request()
    return manager


_SYNC_STREAM, _ASYNC_STREAM = sync_driver(MESSAGES), async_driver(MESSAGES)

PATCHES: tuple[PatchSpec, ...] = (
    # every HTTP attempt, the client's own retries included (see _attempts)
    PatchSpec("anthropic._base_client", "SyncAPIClient._attempt_request", wrapper=sync_attempt(_READER)),
    PatchSpec("anthropic._base_client", "AsyncAPIClient._attempt_request", wrapper=async_attempt(_READER)),
    PatchSpec("anthropic.resources.messages.messages", "Messages.create", MESSAGES, is_async=False),
    PatchSpec("anthropic.resources.messages.messages", "AsyncMessages.create", MESSAGES, is_async=True),
    PatchSpec("anthropic.resources.messages.messages", "Messages.stream", MESSAGES, wrapper=_stream_manager),
    PatchSpec("anthropic.resources.messages.messages", "AsyncMessages.stream", MESSAGES, wrapper=_async_stream_manager),
)
