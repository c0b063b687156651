"""openai SDK (v1+): the entry points ``mlflow.openai.autolog()`` patches.

Patched: ``chat.completions.create/parse``, ``completions.create``,
``embeddings.create``, ``responses.create/parse`` — sync and async, streaming
included (``chat.completions.stream`` and ``responses.stream`` go through
``create``). Functions here only read requests, responses and stream chunks; they
do no I/O and keep no state.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

from openai.types import CompletionUsage

from .. import pricing, tokens
from .._attempts import HttpxReader, async_attempt, sync_attempt
from .._call import Endpoint as _Endpoint
from .._call import Usage
from .._patching import PatchSpec

NAME = "openai"
TARGET_MODULE = "openai"


class Endpoint(_Endpoint):
    """How to read one kind of openai request/response (the request is the call's keywords)."""

    __slots__ = ("kind", "name", "prices", "provider")

    def __init__(self, name: str, kind: str) -> None:
        self.name = name
        self.kind = kind
        self.provider = "openai"  # genai-prices provider of the models it serves
        self.prices = pricing.table_for(self.provider)

    # -- request ---------------------------------------------------------------------------
    def forecast(self, kwargs: dict) -> tuple[str, int, int]:
        """(model, prompt-token estimate, output cap or 0)."""
        model: Any = kwargs.get("model") or ""
        if not isinstance(model, str):
            model = str(model)
        kind = self.kind
        if kind == "chat":
            messages = kwargs.get("messages")
            if type(messages) is not list:  # the usual list needs no copying
                messages = _reusable(kwargs, "messages")
            prompt = tokens.messages_tokens(messages, model)
            if "tools" in kwargs:
                prompt += tokens.tools_tokens(kwargs["tools"], model)
            cap = 0
            if "max_completion_tokens" in kwargs or "max_tokens" in kwargs:
                cap = _cap(kwargs, "max_completion_tokens", "max_tokens")
                choices = kwargs.get("n")
                if isinstance(choices, int) and choices > 1 and cap:
                    cap *= choices
        elif kind == "responses":
            prompt = tokens.input_tokens(_reusable(kwargs, "input"), model)
            instructions = kwargs.get("instructions")
            if isinstance(instructions, str):
                prompt += tokens.counter_for(model)(instructions)
            prompt += tokens.tools_tokens(kwargs.get("tools"), model)
            cap = _cap(kwargs, "max_output_tokens")
        elif kind == "completion":
            prompt = tokens.input_tokens(_reusable(kwargs, "prompt"), model)
            cap = _cap(kwargs, "max_tokens")
            choices = kwargs.get("n")
            if isinstance(choices, int) and choices > 1 and cap:
                cap *= choices
        else:  # embeddings
            prompt = tokens.input_tokens(_reusable(kwargs, "input"), model)
            cap = 0
        return model, prompt, cap

    # -- response --------------------------------------------------------------------------
    stream_key = "stream"

    def reply(self, result: Any, tools: bool) -> tuple[Usage | None, list]:
        # NB: the commonest reply (a parsed chat completion) is read here in one pass: usage in
        # place, and tool calls only when a choice carries some (hot path)
        usage = getattr(result, "usage", None)
        if self.kind == "chat" and type(usage) is CompletionUsage:
            prompt, output, details = usage.prompt_tokens, usage.completion_tokens, usage.prompt_tokens_details
            cached = 0 if details is None else details.cached_tokens or 0
            if (
                type(prompt) is int
                and type(output) is int
                and type(cached) is int
                and prompt >= 0
                and output >= 0
                and cached >= 0
            ):
                if tools:
                    for choice in result.choices:
                        if choice.message.tool_calls:
                            return (prompt, output, cached), self.tool_calls(result)
                return (prompt, output, cached), []
        return self.usage(result), self.tool_calls(result) if tools else []

    def usage(self, result: Any) -> tuple[int, int, int] | None:
        """(input, output, cached input) tokens from a response, ``None`` when absent."""
        usage = getattr(result, "usage", None)  # (the commonest reply is read by reply(), in place)
        if usage is None and hasattr(result, "http_response") and callable(getattr(result, "parse", None)):
            # ``.with_raw_response``: parsing is cached by the SDK, so the user's own parse() is free
            usage = getattr(result.parse(), "usage", None)
        if usage is None:
            return None
        return _read_usage(usage, self.kind)

    def payload(self, kwargs: dict) -> Any:
        if self.kind == "chat":
            return {"messages": kwargs.get("messages"), "tools": kwargs.get("tools")}
        if self.kind == "responses":
            return {
                "input": kwargs.get("input"),
                "instructions": kwargs.get("instructions"),
                "tools": kwargs.get("tools"),
            }
        if self.kind == "completion":
            return {"prompt": kwargs.get("prompt")}
        return None  # embeddings: embedding the same text again is not a loop

    def tool_calls(self, result: Any) -> list[tuple[str, Any]]:
        """(name, arguments) of each tool call a reply asks for."""
        kind = self.kind
        if kind == "chat":
            choices = getattr(result, "choices", None)
            if choices is None and hasattr(result, "http_response"):  # .with_raw_response
                choices = getattr(result.parse(), "choices", None)
            found = []
            for choice in choices or ():
                message = getattr(choice, "message", None)
                for call in getattr(message, "tool_calls", None) or ():
                    function = getattr(call, "function", None)
                    if function is not None:
                        found.append((function.name, function.arguments))
                    else:  # a custom tool call
                        custom = getattr(call, "custom", None)
                        if custom is not None:
                            found.append((custom.name, custom.input))
            return found
        if kind == "responses":
            output = getattr(result, "output", None)
            if output is None and hasattr(result, "http_response"):
                output = getattr(result.parse(), "output", None)
            return [
                (item.name, getattr(item, "arguments", None) or getattr(item, "input", None))
                for item in output or ()
                if getattr(item, "type", None) in ("function_call", "custom_tool_call")
            ]
        return []

    # -- stream chunks ---------------------------------------------------------------------
    def chunk_usage(self, chunk: Any, usage: Usage | None) -> Usage | None:
        if self.kind == "responses":
            if getattr(chunk, "type", "") not in _RESPONSES_FINAL:
                return usage
            found = getattr(chunk.response, "usage", None)
            return _read_usage(found, "responses") if found is not None else usage
        found = getattr(chunk, "usage", None)
        return _read_usage(found, self.kind) if found is not None else usage

    def chunk_tool_calls(self, chunk: Any, into: dict) -> None:
        """Collect the tool calls a stream asks for: ``into[key] = [name, arguments text]``."""
        if self.kind == "responses":
            if getattr(chunk, "type", "") in _RESPONSES_FINAL:
                for position, (name, arguments) in enumerate(self.tool_calls(chunk.response)):
                    into[position] = [name, arguments]
            return
        if self.kind != "chat":
            return
        for choice in getattr(chunk, "choices", None) or ():
            delta = getattr(choice, "delta", None)
            for call in getattr(delta, "tool_calls", None) or ():
                function = getattr(call, "function", None)
                if function is None:
                    continue
                entry = into.setdefault((choice.index, call.index), ["", ""])
                entry[0] += function.name or ""
                entry[1] += function.arguments or ""

    def chunk_text(self, chunk: Any) -> str:
        """The generated text a chunk carries (used to estimate output as it streams)."""
        if self.kind == "responses":
            if getattr(chunk, "type", "") in _RESPONSES_DELTAS:
                delta = getattr(chunk, "delta", "")
                return delta if isinstance(delta, str) else ""
            return ""
        text = ""
        for choice in getattr(chunk, "choices", None) or ():
            if self.kind == "completion":
                text += getattr(choice, "text", "") or ""
                continue
            delta = getattr(choice, "delta", None)
            if delta is None:
                continue
            text += tokens.text_of(getattr(delta, "content", None))
            text += getattr(delta, "refusal", None) or ""
            for call in getattr(delta, "tool_calls", None) or ():
                function = getattr(call, "function", None)
                if function is not None:
                    text += (getattr(function, "name", None) or "") + (getattr(function, "arguments", None) or "")
        return text


_RESPONSES_FINAL = ("response.completed", "response.incomplete", "response.failed")
_RESPONSES_DELTAS = (
    "response.output_text.delta",
    "response.refusal.delta",
    "response.function_call_arguments.delta",
    "response.reasoning_text.delta",
    "response.reasoning_summary_text.delta",
)


def _reusable(kwargs: dict, name: str) -> Any:
    """The request field, with a one-shot iterable (a generator of messages, say) turned into a
    list in ``kwargs`` first, so counting it does not consume what the SDK is about to send."""
    value = kwargs.get(name)
    if type(value) is not list and isinstance(value, Iterator):  # NB: ABC checks are slow; lists skip it
        value = kwargs[name] = list(value)
    return value


def _cap(kwargs: dict, *names: str) -> int:
    """The request's output-token cap, 0 when it has none."""
    for name in names:
        value = kwargs.get(name)
        if value is not None and type(value) is int and value > 0:
            return value
    return 0


# NB: read only the fields each usage type defines: a missing attribute on a pydantic
# model costs microseconds (it raises inside ``__getattr__``), and this runs per call.
_USAGE_FIELDS = {
    "chat": ("prompt_tokens", "completion_tokens", "prompt_tokens_details"),
    "completion": ("prompt_tokens", "completion_tokens", "prompt_tokens_details"),
    "responses": ("input_tokens", "output_tokens", "input_tokens_details"),
    "embedding": ("prompt_tokens", None, None),
}


def _counts(*values: Any) -> bool:
    """Whether these are token counts (non-negative numbers)."""
    try:
        return min(values) >= 0
    except TypeError:
        return False


def _read_usage(usage: Any, kind: str) -> Usage:
    """(input, output, cached input) token counts, or a TypeError for a shape we do not know."""
    input_name, output_name, details_name = _USAGE_FIELDS[kind]
    get = usage.get if isinstance(usage, dict) else partial(getattr, usage)
    prompt = get(input_name)
    output = get(output_name) if output_name else 0
    details = get(details_name) if details_name else None
    cached = 0
    if details is not None:
        cached = (
            details.get("cached_tokens") if isinstance(details, dict) else getattr(details, "cached_tokens", 0)
        ) or 0
    if not _counts(prompt, output, cached):
        raise TypeError(f"unexpected usage shape from openai: {usage!r:.200}")
    return prompt, output, cached


CHAT = Endpoint("openai.chat.completions", "chat")
COMPLETION = Endpoint("openai.completions", "completion")
EMBEDDING = Endpoint("openai.embeddings", "embedding")
RESPONSES = Endpoint("openai.responses", "responses")


_READER = HttpxReader()

PATCHES: tuple[PatchSpec, ...] = (
    # every HTTP attempt, the client's own retries included (see _attempts)
    PatchSpec("openai._base_client", "SyncAPIClient._send_request", wrapper=sync_attempt(_READER)),
    PatchSpec("openai._base_client", "AsyncAPIClient._send_request", wrapper=async_attempt(_READER)),
    PatchSpec("openai.resources.chat.completions", "Completions.create", CHAT, is_async=False),
    PatchSpec("openai.resources.chat.completions", "Completions.parse", CHAT, is_async=False),
    PatchSpec("openai.resources.chat.completions", "AsyncCompletions.create", CHAT, is_async=True),
    PatchSpec("openai.resources.chat.completions", "AsyncCompletions.parse", CHAT, is_async=True),
    PatchSpec("openai.resources.completions", "Completions.create", COMPLETION, is_async=False),
    PatchSpec("openai.resources.completions", "AsyncCompletions.create", COMPLETION, is_async=True),
    PatchSpec("openai.resources.embeddings", "Embeddings.create", EMBEDDING, is_async=False),
    PatchSpec("openai.resources.embeddings", "AsyncEmbeddings.create", EMBEDDING, is_async=True),
    PatchSpec("openai.resources.responses", "Responses.create", RESPONSES, is_async=False),
    PatchSpec("openai.resources.responses", "Responses.parse", RESPONSES, is_async=False),
    PatchSpec("openai.resources.responses", "AsyncResponses.create", RESPONSES, is_async=True),
    PatchSpec("openai.resources.responses", "AsyncResponses.parse", RESPONSES, is_async=True),
)
