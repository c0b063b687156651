"""litellm: ``completion``, ``acompletion`` (streaming included), ``embedding`` and ``aembedding``,
as users call them (``litellm.completion(...)``).

The model's provider comes from litellm's own parsing (``litellm.get_llm_provider``), once per
model name. A call litellm makes through the openai SDK underneath is the same call (the SDK's
guard sees one in flight and passes it through; its HTTP attempts are counted on this call); a
call it makes with its own HTTP client (Anthropic, say) is counted here. Replies are litellm's
OpenAI-shaped ``ModelResponse`` / ``EmbeddingResponse``; prompt-cache reads and writes are read
from its usage when the provider reports them. Functions here do no I/O and keep no state but
the provider of each model name.
"""

from __future__ import annotations

from typing import Any

from .. import pricing, tokens
from .._attempts import HttpxReader, async_attempt, sync_attempt
from .._call import Endpoint as _Endpoint
from .._call import Usage
from .._patching import PatchSpec

NAME = "litellm"
TARGET_MODULE = "litellm"


def _provider(model: str) -> tuple[str, str | None]:
    """(the model's own name, its provider) as litellm parses ``model``."""
    try:
        import litellm

        name, provider, _, _ = litellm.get_llm_provider(model)
        return name, provider
    except Exception:  # a name litellm cannot place: priced by genai-prices' guess, if any
        return model, None


class Endpoint(_Endpoint):
    """How to read a litellm request (the call's keywords), reply and stream chunks."""

    __slots__ = ("kind", "name", "prices", "provider", "stream_key")

    def __init__(self, name: str, kind: str) -> None:
        self.name = name
        self.kind = kind
        self.provider = None
        self.prices = pricing.table_for("litellm")  # "<provider>/<model>" as given -> rates
        self.stream_key = "stream" if kind == "chat" else None

    def forecast(self, kwargs: dict) -> tuple[str, int, int]:
        model: Any = kwargs.get("model") or ""
        if not isinstance(model, str):
            model = str(model)
        if self.kind == "embedding":
            return model, tokens.input_tokens(kwargs.get("input"), model), 0
        messages = kwargs.get("messages")
        if type(messages) is not list and messages is not None:
            messages = kwargs["messages"] = list(messages)
        prompt = tokens.messages_tokens(messages, model)
        if kwargs.get("tools"):
            prompt += tokens.tools_tokens(kwargs["tools"], model)
        cap = kwargs.get("max_completion_tokens") or kwargs.get("max_tokens")
        return model, prompt, cap if type(cap) is int and cap > 0 else 0

    def rates(self, model: str, request: Any) -> Any:
        """Priced as litellm routes it: the provider's model, kept under the name as given."""
        name, provider = _provider(model)
        rates = pricing.rates_for(name, provider)
        self.prices[model] = rates
        return rates

    def payload(self, kwargs: dict) -> Any:
        if self.kind == "embedding":
            return None  # embedding the same text again is not a loop
        return {"messages": kwargs.get("messages"), "tools": kwargs.get("tools")}

    def reply(self, result: Any, tools: bool) -> tuple[Usage | None, list]:
        return self.usage(result), self.tool_calls(result) if tools else []

    def usage(self, result: Any) -> Usage | None:
        usage = getattr(result, "usage", None)
        return None if usage is None else read_usage(usage)

    def tool_calls(self, result: Any) -> list[tuple[str, Any]]:
        found = []
        for choice in getattr(result, "choices", None) or ():
            message = getattr(choice, "message", None)
            for call in getattr(message, "tool_calls", None) or ():
                function = getattr(call, "function", None)
                if function is not None:
                    found.append((function.name, function.arguments))
        return found

    def reply_model(self, result: Any) -> Any:
        return getattr(result, "model", None)

    def chunk_usage(self, chunk: Any, usage: Usage | None) -> Usage | None:
        found = getattr(chunk, "usage", None)
        return read_usage(found) if found is not None else usage

    def chunk_tool_calls(self, chunk: Any, into: dict) -> None:
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
        text = ""
        for choice in getattr(chunk, "choices", None) or ():
            delta = getattr(choice, "delta", None)
            if delta is None:
                continue
            text += tokens.text_of(getattr(delta, "content", None))
            for call in getattr(delta, "tool_calls", None) or ():
                function = getattr(call, "function", None)
                if function is not None:
                    text += (function.name or "") + (function.arguments or "")
        return text


def read_usage(usage: Any) -> Usage:
    """(input, output, read from a prompt cache, written to one) from litellm's OpenAI-shaped
    usage, or a TypeError for a shape we do not know."""
    get = usage.get if isinstance(usage, dict) else lambda name: getattr(usage, name, None)
    prompt = get("prompt_tokens") or 0
    output = get("completion_tokens") or 0
    details = get("prompt_tokens_details")
    cached = (details.get("cached_tokens") if isinstance(details, dict) else getattr(details, "cached_tokens", 0)) or 0
    written = get("cache_creation_input_tokens") or 0
    for value in (prompt, output, cached, written):
        if not isinstance(value, int) or value < 0:
            raise TypeError(f"unexpected usage shape from litellm: {usage!r:.200}")
    return prompt, output, cached, written


COMPLETION = Endpoint("litellm.completion", "chat")
EMBEDDING = Endpoint("litellm.embedding", "embedding")


class _HandlerReader(HttpxReader):
    """litellm's own HTTP client (``HTTPHandler.post``): it raises ``httpx.HTTPStatusError`` for
    an error status itself; that error's response is judged (a 429 feeds the 429 guard)."""

    def response_of(self, error: BaseException) -> Any:
        response = getattr(error, "response", None)  # httpx.HTTPStatusError (litellm masks its URL)
        return response if isinstance(getattr(response, "status_code", None), int) else None


_READER = _HandlerReader()
_HANDLER = "litellm.llms.custom_httpx.http_handler"

PATCHES: tuple[PatchSpec, ...] = (
    # the HTTP attempts litellm makes with its own client (providers it does not reach through
    # the openai SDK, whose attempts that SDK's patch counts)
    PatchSpec(_HANDLER, "HTTPHandler.post", wrapper=sync_attempt(_READER)),
    PatchSpec(_HANDLER, "AsyncHTTPHandler.post", wrapper=async_attempt(_READER)),
    PatchSpec("litellm", "completion", COMPLETION, is_async=False),
    PatchSpec("litellm", "acompletion", COMPLETION, is_async=True),
    PatchSpec("litellm", "embedding", EMBEDDING, is_async=False),
    PatchSpec("litellm", "aembedding", EMBEDDING, is_async=True),
)
