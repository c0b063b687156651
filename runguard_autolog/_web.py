"""What the ASGI and WSGI middlewares share: the 429 a trip becomes, and checking their options."""

from __future__ import annotations

import json
import math
from typing import Any

from ._errors import RunGuardConfigError, RunGuardTripped
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
    session(None, **limits)  # builds, never enters: raises RunGuardConfigError on a bad limit
    if name is not None and not callable(name):
        raise RunGuardConfigError(f"runguard: name must be a callable returning the session name, not {name!r}")
