"""Fixed time windows: a long-running service is not stopped for good by its 51st call. The
process, run and session scopes start afresh (counters and circuit) at each window boundary,
and a refusal says when the window opens again."""

from __future__ import annotations

import time

import mlflow
from runguard_autolog.testing import Reply
import pytest

import runguard_autolog as runguard

from .conftest import chat


def _refused(client) -> runguard.RunGuardTripped:
    with pytest.raises(runguard.RunGuardTripped) as refused:
        chat(client)
    return refused.value


def test_a_windowed_process_scope_starts_afresh_at_the_boundary(client, server):
    runguard.autolog(max_calls=3, window=2)
    for _ in range(3):
        chat(client)
    trip = _refused(client)
    assert trip.limit == "max_calls" and trip.scope == "process"
    wait = trip.details["retry_after"]
    assert 0 <= wait <= 2
    time.sleep(wait + 0.05)
    chat(client)  # a new window: the circuit is closed and the counters are fresh
    assert runguard.current().calls == 1 and runguard.current().tripped is None
    assert server.count() == 4


def test_a_service_of_independent_requests_is_not_stopped_for_good(client, server):
    runguard.autolog(max_calls=5, window=1)
    outcomes = []
    deadline = time.time() + 2.2
    while time.time() < deadline:
        try:
            chat(client)
            outcomes.append("ok")
        except runguard.RunGuardTripped:
            outcomes.append("refused")
        time.sleep(0.02)
    # each window admits at most 5; later windows admit again after refusals
    assert "refused" in outcomes
    first_refusal = outcomes.index("refused")
    assert "ok" in outcomes[first_refusal:]
    assert server.count() <= 5 * 4  # at most 5 per window, over at most 4 windows (alignment)


def test_a_session_window_and_no_window_for_other_sessions(client, server):
    runguard.autolog(max_calls="none")
    with runguard.session("tenant", max_calls=1, window="minute"):
        chat(client)
        trip = _refused(client)
        assert trip.scope == "session:tenant" and 0 < trip.details["retry_after"] <= 60
    with runguard.session("plain", max_calls=1):
        chat(client)
        assert "retry_after" not in _refused(client).details


def test_a_run_scope_takes_autologs_window(client, server, tracking):
    runguard.autolog(max_calls=1, window=1)
    with mlflow.start_run():
        chat(client)
        trip = _refused(client)
        assert trip.scope.startswith("run:")
        time.sleep(trip.details["retry_after"] + 0.05)
        chat(client)
    assert server.count() == 2


def test_window_from_the_environment_and_bad_values(monkeypatch):
    monkeypatch.setenv("RUNGUARD_WINDOW", "hour")
    runguard.autolog()
    assert "window" in runguard.config() and "3600" in runguard.config()
    monkeypatch.setenv("RUNGUARD_WINDOW", "fortnight")
    with pytest.raises(runguard.RunGuardConfigError, match="RUNGUARD_WINDOW='fortnight'"):
        runguard.autolog()
    monkeypatch.delenv("RUNGUARD_WINDOW")
    with pytest.raises(runguard.RunGuardConfigError, match="window='fortnight'"):
        runguard.autolog(window="fortnight")
    with pytest.raises(runguard.RunGuardConfigError, match="window='fortnight'"):
        runguard.session("s", window="fortnight")


def test_calls_in_flight_at_a_boundary_belong_to_the_window_they_started_in(server):
    import threading

    import openai

    client = openai.OpenAI(base_url=server.base_url, api_key="t", max_retries=0)
    runguard.autolog(max_calls=2, window=2)
    chat(client)  # opens the window
    end = time.time() + _until_boundary()
    server.default = Reply(delay=1.2)
    time.sleep(max(0.0, end - time.time() - 0.6))  # late in the window
    slow = [threading.Thread(target=chat, args=(client,)) for _ in range(1)]
    for thread in slow:
        thread.start()
    time.sleep(0.9)  # the boundary passes while the call is in flight
    server.default = Reply()
    chat(client)
    chat(client)  # the new window's own two calls
    for thread in slow:
        thread.join()
    assert runguard.current().calls == 2
    assert runguard.current().tripped is not None and runguard.current().tripped.observed == 2


def _until_boundary() -> float:
    from runguard_autolog import _scopes

    return _scopes.PROCESS.window_end - time.time()


def test_a_huge_window_is_a_config_error(monkeypatch):
    monkeypatch.setenv("RUNGUARD_WINDOW", "1" + "0" * 400)
    with pytest.raises(runguard.RunGuardConfigError, match="RUNGUARD_WINDOW"):
        runguard.autolog()
    monkeypatch.delenv("RUNGUARD_WINDOW")
    with pytest.raises(runguard.RunGuardConfigError, match="window="):
        runguard.autolog(window=10**400)
    with pytest.raises(runguard.RunGuardConfigError, match="window="):
        runguard.session("s", window=10**12)


def test_many_threads_at_a_boundary_never_exceed_the_ceiling_per_window(server):
    import sys
    import threading

    import openai

    client = openai.OpenAI(base_url=server.base_url, api_key="t", max_retries=0)
    runguard.autolog(max_calls=10, window=1)
    admitted: list[float] = []
    lock = threading.Lock()
    started = time.time()
    deadline = started + 2.5

    def worker():
        while time.time() < deadline:
            try:
                chat(client)
                with lock:
                    admitted.append(time.time())
            except runguard.RunGuardTripped:
                time.sleep(0.005)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        threads = [threading.Thread(target=worker) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    windows = {int(moment) for moment in admitted} | {int(started)}
    assert len(admitted) <= 10 * (max(windows) - min(windows) + 1)  # never more than 10 per window
    assert server.count() == len(admitted)
