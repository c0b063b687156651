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

from .. import pricing
from .._attempts import HttpxReader, async_attempt, sync_attempt
from .._call import Usage
from .._patching import PatchSpec
from . import openai

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


class Endpoint(openai.Endpoint):
    """litellm's requests and replies are OpenAI-shaped: read as openai's (chat or embedding),
    priced as litellm routes the model, with prompt-cache writes from its usage."""

    __slots__ = ()

    def __init__(self, name: str, kind: str) -> None:
        super().__init__(name, kind)
        self.provider = None
        self.prices = pricing.table_for("litellm")  # "<provider>/<model>" as given -> rates

    def rates(self, model: str, request: Any) -> Any:
        """Priced as litellm routes it: the provider's model, kept under the name as given."""
        name, provider = _provider(model)
        rates = pricing.rates_for(name, provider)
        self.prices[model] = rates
        return rates

    def reply(self, result: Any, tools: bool) -> tuple[Usage | None, list]:
        return self.usage(result), self.tool_calls(result) if tools else []

    def usage(self, result: Any) -> Usage | None:
        usage = getattr(result, "usage", None)
        return None if usage is None else with_cache_writes(usage, super().usage(result))

    def chunk_usage(self, chunk: Any, usage: Usage | None) -> Usage | None:
        found = getattr(chunk, "usage", None)
        return usage if found is None else with_cache_writes(found, super().chunk_usage(chunk, usage))


def with_cache_writes(usage: Any, counted: Usage | None) -> Usage | None:
    """openai's (input, output, cached input), plus the input tokens litellm reports as written to
    a prompt cache (Anthropic's, through litellm)."""
    written = (usage.get if isinstance(usage, dict) else lambda name: getattr(usage, name, None))(
        "cache_creation_input_tokens"
    )
    if counted is None or not written:
        return counted
    if not isinstance(written, int) or written < 0:
        raise TypeError(f"unexpected usage shape from litellm: {usage!r:.200}")
    return (*counted[:3], written)


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
