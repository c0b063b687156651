"""The public API as users write it, type-checked by ``.ci/run`` (``mypy tests/typed_usage.py``):
a change that makes ``runguard.current().calls`` or a trip's fields untyped fails CI."""

from __future__ import annotations

import runguard_autolog as runguard


def spend_so_far() -> float:
    runguard.autolog(max_calls=5, max_cost_usd=2.0, on_trip="raise")
    snapshot = runguard.current()
    calls: float = snapshot.calls
    cost: float = snapshot.cost_usd
    scope: str = snapshot.scope
    trip: runguard.RunGuardTripped | None = snapshot.tripped
    if trip is not None:
        limit: str = trip.limit
        reason: str = trip.reason
        print(limit, reason, scope)
    with runguard.session("agent-7", max_calls=3):
        inner = runguard.current()
    return calls + cost + inner.requests
