"""What the ASGI and WSGI middlewares share: the 429 a trip becomes, and checking their options."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from typing import Any

from ._config import parse_budget_name
from ._errors import RunGuardConfigError, RunGuardTripped
from ._runtime import log_once
from ._scopes import session


def retry_after(trip: RunGuardTripped) -> int | None:
    """``details["retry_after"]`` (seconds, a number) as the whole seconds of a ``Retry-After``
    header, rounded up; None when the trip carries none (or nothing usable)."""
    details = getattr(trip, "details", None)
    value = details.get("retry_after") if isinstance(details, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return math.ceil(value)


def rejection(trip: RunGuardTripped) -> tuple[int, list[tuple[str, str]], bytes]:
    """The 429 a trip becomes: (status, headers, body)."""
    payload = {"error": {"type": "runguard_tripped", "limit": trip.limit, "scope": trip.scope, "reason": trip.reason}}
    body = json.dumps(payload, default=str).encode("ascii")  # ensure_ascii: any path in the scope is safe
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    seconds = retry_after(trip)
    if seconds is not None:
        headers.append(("Retry-After", str(seconds)))
    return 429, headers, body


def check_options(limits: dict[str, Any], name: object) -> None:
    """Validate the middleware's keywords now, as ``runguard.session()`` would on every request."""
    shared = limits.get("shared_budget")
    session(None, **{**limits, "shared_budget": "checked" if callable(shared) else shared})  # raises on a bad one
    if name is not None and not callable(name):
        raise RunGuardConfigError(f"runguard: name must be a callable returning the session name, not {name!r}")


class RequestLimits:
    """The session keywords for one request: the middleware's, with the shared budget named from
    the request when ``shared_budget`` is a callable (``"tenant:" + header``, say; ``None``: this
    request charges no shared budget of its own)."""

    __slots__ = ("limits", "shared", "unshared")

    def __init__(self, limits: dict[str, Any], name: object) -> None:
        check_options(limits, name)
        shared = limits.get("shared_budget")
        self.limits = limits
        self.shared: Callable[[Any], str | None] | None = shared if callable(shared) else None
        self.unshared = {key: value for key, value in limits.items() if not key.startswith("shared_")}

    def __call__(self, request: Any) -> dict[str, Any]:
        if self.shared is None:
            return self.limits
        budget = self.shared(request)
        if budget is None:
            return self.unshared
        return {**self.limits, "shared_budget": budget_name(budget)}


def budget_name(value: object) -> str:
    """A budget name taken from a request, as a valid one: a name that is not one (a tenant header
    with a space, a brace, 300 characters) becomes ``sha256:<its hash>``, the same budget every
    time it comes, never an error page and never a way around the tenant's ceiling."""
    text = value if isinstance(value, str) else str(value)
    try:
        name = parse_budget_name(text)
    except RunGuardConfigError:
        name = None
    if name is not None:
        return name
    log_once(
        ("budget-name-hashed",),
        "runguard: a shared budget name from a request is not a valid name; it is charged as "
        "'sha256:<hash of the name>'. Logged once.",
    )
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:40]
