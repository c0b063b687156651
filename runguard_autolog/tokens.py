"""Prompt token forecasts: exact with tiktoken when an encoding is available offline,
else a documented conservative estimate.

Exact path: the model's tiktoken encoding is used only if it is already loaded, was
registered with :func:`register_encoding`, or sits in tiktoken's local cache
(``TIKTOKEN_CACHE_DIR`` / ``DATA_GYM_CACHE_DIR``). runguard never downloads an
encoding. The choice is made once per model and cached; no tokenizer is loaded per call.

Fallback estimate (conservative: it over-counts typical English and code by about
a third): ``ceil(utf8_bytes / 3)`` per text, plus 4 tokens per chat message and 3
for the reply priming, 765 tokens per image part, and tool definitions counted as
their JSON text. Pathological text (random Unicode, long digit runs) can exceed it;
the settled count always comes from the provider's reported usage.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import Any

from ._runtime import RUNTIME, log_once

PER_MESSAGE = 4
REPLY_PRIMING = 3
IMAGE_TOKENS = 765

_registered: list[tuple[str, Any]] = []
_counters: dict[str, Callable[[str], int]] = {}  # model -> exact counter, or estimate_text
_lock = threading.Lock()
RUNTIME.fork_safe(sys.modules[__name__], "_lock", threading.Lock)


def estimate_text(text: str) -> int:
    """Conservative token estimate of one text without a tokenizer."""
    if not text:
        return 0
    size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    return (size + 2) // 3


def register_encoding(model_pattern: str, encoding: Any) -> None:
    """Use ``encoding`` (a ``tiktoken.Encoding``) for models matching ``model_pattern`` (fnmatch)."""
    with _lock:
        _registered.insert(0, (model_pattern, encoding))
        _counters.clear()


def clear_encodings() -> None:
    with _lock:
        _registered.clear()
        _counters.clear()


def _tiktoken_cache_path(name: str) -> str | None:
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        cache_dir = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        cache_dir = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not cache_dir:
        return None
    url = f"https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
    return os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())


def _offline_encoding(model: str):
    for pattern, encoding in _registered:
        if fnmatch.fnmatchcase(model, pattern):
            return encoding
    try:
        import tiktoken
        import tiktoken.registry
    except ImportError:
        return None
    try:
        name = tiktoken.encoding_name_for_model(model)
    except Exception:
        return None
    loaded = getattr(tiktoken.registry, "ENCODINGS", {}).get(name)
    if loaded is not None:
        return loaded
    path = _tiktoken_cache_path(name)
    if path and os.path.exists(path):
        try:
            return tiktoken.get_encoding(name)
        except Exception as error:  # a corrupt cache must not trigger a download attempt loop
            log_once(("tiktoken", name), "runguard: tiktoken encoding %s unusable (%s); estimating", name, error)
    return None


def counter_for(model: str) -> Callable[[str], int]:
    """The per-text token counter for a model (exact or estimate), resolved once per model."""
    counter = _counters.get(model)
    if counter is None:
        encoding = _offline_encoding(model or "")
        if encoding is None:
            counter = estimate_text
        else:
            encode = encoding.encode

            def counter(text: str, _encode=encode) -> int:
                return len(_encode(text, disallowed_special=())) if text else 0

        with _lock:
            _counters[model] = counter
    return counter


def is_exact(model: str) -> bool:
    return counter_for(model) is not estimate_text


def _content_tokens(content: Any, count: Callable[[str], int]) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return count(content)
    if isinstance(content, (list, tuple)):
        total = 0
        for part in content:
            if isinstance(part, str):
                total += count(part)
            elif isinstance(part, dict):
                kind = part.get("type", "")
                if "image" in kind:
                    total += IMAGE_TOKENS
                else:
                    text = part.get("text")
                    if text is None:
                        text = part.get("input_text") or part.get("output") or part.get("arguments")
                    total += _content_tokens(text, count) if text is not None else count(_dumps(part))
            else:
                total += count(str(part))
        return total
    if isinstance(content, dict):
        return count(_dumps(content))
    return count(str(content))


def text_of(content: Any) -> str:
    """The text of a message or chunk ``content``: a string, or a list of parts (``{"type":
    "text", "text": ...}`` dicts, or strings), as Databricks and LangChain stream it."""
    if content is None:
        return ""
    if type(content) is str:
        return content
    if isinstance(content, (list, tuple)):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
        return "".join(texts)
    return ""


def _dumps(value: Any) -> str:
    try:
        return json.dumps(value, default=str, separators=(",", ":"))
    except Exception:
        return str(value)


def _get(message: Any, key: str) -> Any:
    if isinstance(message, dict):
        return message.get(key)
    fields = getattr(message, "__dict__", None)  # pydantic (SDK and LangChain messages) keeps fields
    if fields is not None and key in fields:  # here; a missing one raises slowly in __getattr__
        return fields[key]
    return getattr(message, key, None)


def messages_tokens(messages: Any, model: str) -> int:
    """Chat Completions ``messages`` (dicts or SDK objects)."""
    count = _counters.get(model) or counter_for(model)
    estimating = count is estimate_text
    total = REPLY_PRIMING
    for message in messages or ():
        # fast path: a message that is only a role and a text ({"role", "content"} dict, or a
        # LangChain/SDK message whose fields say so)
        if type(message) is dict:
            content = message.get("content") if len(message) == 2 else None
        else:
            fields = getattr(message, "__dict__", None)
            content = (
                None if fields is None or fields.get("tool_calls") or fields.get("name") else fields.get("content")
            )
        if type(content) is str:
            if estimating and content.isascii():
                total += PER_MESSAGE + (len(content) + 2) // 3  # estimate_text, inlined
            else:
                total += PER_MESSAGE + count(content)
            continue
        total += PER_MESSAGE + _content_tokens(_get(message, "content"), count)
        name = _get(message, "name")
        if name:
            total += count(str(name))
        tool_calls = _get(message, "tool_calls")
        if tool_calls:
            total += count(_dumps([_plain(call) for call in tool_calls]))
    return total


def _plain(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    return dump() if dump else value


def input_tokens(value: Any, model: str) -> int:
    """A ``prompt`` / ``input`` value: text, list of texts, token arrays, or Responses items."""
    count = counter_for(model)
    if value is None:
        return 0
    if isinstance(value, str):
        return count(value)
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, int) for v in value):
            return len(value)
        total = 0
        for item in value:
            if isinstance(item, str):
                total += count(item)
            elif isinstance(item, (list, tuple)) and all(isinstance(v, int) for v in item):
                total += len(item)
            elif isinstance(item, dict) or hasattr(item, "model_dump"):
                item = _plain(item)
                if "content" in item:
                    total += PER_MESSAGE + _content_tokens(item.get("content"), count)
                else:
                    total += _content_tokens([item], count)
            else:
                total += count(str(item))
        return total
    return count(str(value))


def tools_tokens(tools: Any, model: str) -> int:
    if not tools:
        return 0
    return counter_for(model)(_dumps([_plain(tool) for tool in tools]))


RUNTIME.on_reset(clear_encodings)
