"""Loop detection: the same tool call requested again and again, or the same request resent.

A **tool call** is identified by its signature: the tool's name plus its canonicalised
arguments. Arguments given as a mapping, or as JSON text of at most
:data:`MAX_PARSED_ARGUMENTS` characters, are parsed and re-serialised with sorted keys
and no whitespace, so key order and formatting do not matter. Anything else (text that
is not JSON, or longer than that) is taken as text. Either way only a 16-byte BLAKE2b
digest is kept, never the arguments.

Each unit of work (the innermost scope) keeps the signatures of its last
``window = max(10, 3 * loop_repeats)`` tool calls in a ring with a count per
signature: observing one is O(1) and memory is bounded by the window. A signature seen
``loop_repeats`` times within the window is a loop, whether the repeats are consecutive
(A-A-A), interleaved (A-A'-A-A''-A) or a short cycle (A-B-A-B-A). The identical request
(same model and messages) is tracked the same way, in a ring of its own, when
``loop_identical_requests`` is set.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from collections import deque
from collections.abc import Iterable
from typing import Any

from ._counters import Trip, as_counters
from ._runtime import RUNTIME

MAX_PARSED_ARGUMENTS = 64 * 1024  # longer argument text is hashed as text, never parsed
MIN_WINDOW = 10

_lock = threading.Lock()
RUNTIME.fork_safe(sys.modules[__name__], "_lock", threading.Lock)


def window_for(repeats: float) -> int:
    return max(MIN_WINDOW, 3 * int(repeats))


def canonical(value: Any) -> bytes:
    """Arguments (or messages) as canonical bytes: parsed JSON re-serialised with sorted keys."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(value)
    if isinstance(value, str):
        if len(value) > MAX_PARSED_ARGUMENTS:
            return value.encode("utf-8", "surrogatepass")
        try:
            value = json.loads(value)
        except ValueError:
            return value.encode("utf-8", "surrogatepass")
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_plain)
    except (TypeError, ValueError):
        text = repr(value)
    return text.encode("utf-8", "surrogatepass")


def _plain(value: Any) -> Any:
    """SDK objects (pydantic models) as plain data for canonical JSON."""
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(exclude_none=True)
    return str(value)


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def tool_signature(name: str, arguments: Any) -> tuple[bytes, str]:
    """(signature, short hash of the arguments for trip reasons)."""
    args = canonical(arguments if arguments is not None else {})
    args_hash = hashlib.blake2b(args, digest_size=6).hexdigest()
    return digest(str(name).encode("utf-8", "surrogatepass") + b"\0" + args), args_hash


class _Ring:
    """The last ``window`` signatures with a count per signature: O(1) per observation."""

    __slots__ = ("counts", "recent")

    def __init__(self) -> None:
        self.recent: deque = deque()
        self.counts: dict[bytes, int] = {}

    def see(self, signature: bytes, window: int) -> int:
        recent, counts = self.recent, self.counts
        recent.append(signature)
        counts[signature] = counts.get(signature, 0) + 1
        while len(recent) > window:
            old = recent.popleft()
            left = counts[old] - 1
            if left:
                counts[old] = left
            else:
                del counts[old]
        return counts[signature]


class LoopWatch:
    """Recent tool calls and requests of one unit of work."""

    __slots__ = ("requests", "tool_calls")

    def __init__(self) -> None:
        self.tool_calls = _Ring()
        self.requests = _Ring()


def _watch(scope) -> LoopWatch:
    watch = scope.loops
    if watch is None:
        watch = scope.loops = LoopWatch()
    return watch


def observe_tool_calls(scope, calls: Iterable[tuple[str, Any]], repeats: float) -> Trip | None:
    """Record tool calls the model asked for; the trip when one reaches ``repeats``."""
    window = window_for(repeats)
    found = None
    for name, arguments in calls:
        signature, args_hash = tool_signature(name, arguments)
        with _lock:
            seen = _watch(scope).tool_calls.see(signature, window)
        if seen >= repeats and found is None:
            found = Trip(
                scope.name,
                "loop_repeats",
                int(repeats),
                seen,
                f"tool-call loop: {name} (arguments {args_hash}) requested {seen} times "
                f"in the last {window} tool calls (loop_repeats={int(repeats)})",
                as_counters(scope.used),
            )
    return found


def observe_request(scope, model: str, payload: Any, limit: float) -> Trip | None:
    """Record one request (model + messages); the trip when the identical one is seen ``limit`` times."""
    window = window_for(limit)
    request_hash = digest(str(model).encode("utf-8", "surrogatepass") + b"\0" + canonical(payload))
    with _lock:
        seen = _watch(scope).requests.see(request_hash, window)
    if seen < limit:
        return None
    return Trip(
        scope.name,
        "loop_identical_requests",
        int(limit),
        seen,
        f"identical-request loop: the same request to {model} (hash {request_hash.hex()[:12]}) "
        f"seen {seen} times in the last {window} requests (loop_identical_requests={int(limit)})",
        as_counters(scope.used),
    )
