"""What the fake servers answer: scripted replies (stdlib only)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCall:
    name: str
    arguments: str = "{}"


@dataclass
class Reply:
    """One scripted answer. ``usage`` is (prompt_tokens, completion_tokens); by default the
    prompt costs ``prompt_tokens`` and each word of ``content`` one completion token,
    cut at the request's max-token cap like a real provider."""

    content: str = "ok"
    tool_calls: list[ToolCall] = field(default_factory=list)
    usage: tuple[int, int] | None = None
    prompt_tokens: int = 10
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None  # raw JSON body overriding everything (for odd shapes)
    delay: float = 0.0  # seconds before answering
    chunk_delay: float = 0.0  # seconds between stream chunks
    include_usage_in_stream: bool | None = None  # None: as the request's stream_options asks
    model: str | None = None
    content_parts: bool = False  # stream each delta's content as a list of text parts (Databricks-style)
    cache_creation_input_tokens: int = 0  # Anthropic prompt caching (FakeAnthropicServer)
    cache_read_input_tokens: int = 0  # prompt-cache reads (OpenAI chat: prompt_tokens_details.cached_tokens)


def completion_tokens(reply: Reply, body: dict) -> tuple[list[str], int, int]:
    words = reply.content.split(" ") if reply.content else []
    cap = body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens")
    if isinstance(cap, int) and cap > 0:
        words = words[:cap]
    pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
    if reply.usage is not None:
        return pieces, reply.usage[0], reply.usage[1]
    tool_tokens = sum(1 + len(t.arguments) // 4 for t in reply.tool_calls)
    return pieces, reply.prompt_tokens, len(pieces) + tool_tokens
