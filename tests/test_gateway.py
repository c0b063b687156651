"""Retry amplification on a shared route: every HTTP attempt counts, consecutive 429s trip,
refusals that retrying cannot fix trip at once, sessions stay isolated, and the latency
budget counts only time inside LLM requests.

The MLflow AI Gateway here is the real YAML-configured one (``mlflow gateway start``) on
127.0.0.1, its routes backed by a loopback fake OpenAI server, their 429s coming from the
gateway's own per-route limiter. A counting proxy in front of it records what the gateway
received.
"""

from __future__ import annotations

import email.utils
import math
import threading
import time

import mlflow
import openai
import pytest
import requests
from mlflow.deployments import get_deploy_client
from mlflow.tracking import MlflowClient

import runguard_autolog as runguard
from runguard_autolog import _recording
from runguard_autolog._attempts import parse_retry_after
from runguard_autolog.testing import FakeOpenAIServer, Reply

from ._servers import CountingProxy, start_gateway, start_tracking_server
from .conftest import MESSAGES, MODEL, chat

LIMIT = 3  # calls per minute on the limited routes

GATEWAY_CONFIG = """
endpoints:
{routes}
"""
ROUTE = """
  - name: {name}
    endpoint_type: llm/v1/chat
    model:
      provider: openai
      name: gpt-4o-mini
      config:
        openai_api_key: test
        openai_api_base: {base}
{limit}
"""


def _route(name: str, base: str, calls: int | None) -> str:
    limit = f"    limit:\n      renewal_period: minute\n      calls: {calls}" if calls else ""
    return ROUTE.format(name=name, base=base, limit=limit)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """(proxy in front of the gateway, the fake upstream)."""
    workdir = tmp_path_factory.mktemp("gateway")
    with FakeOpenAIServer() as upstream:
        routes = "".join([
            _route("control", upstream.base_url, LIMIT),  # the unguarded naive loop
            _route("guarded", upstream.base_url, LIMIT),  # the same loop, guarded
            _route("shared", upstream.base_url, 12),  # two sessions on one route
            _route("open", upstream.base_url, None),
        ])
        process, port = start_gateway(GATEWAY_CONFIG.format(routes=routes), workdir)
        try:
            with CountingProxy(port) as proxy:
                yield proxy, upstream
        finally:
            process.stop()


@pytest.fixture
def mlflow_retries(monkeypatch):
    """MLflow's own urllib3 retries on (3 per request), without backoff sleeps."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")


def predict(client, route: str, text: str = "hello"):
    return client.predict(endpoint=route, inputs={"messages": [{"role": "user", "content": text}], "max_tokens": 5})


def naive_loop(client, route: str, iterations: int) -> None:
    """The seed agent: predict; on a 429 sleep a little and go again."""
    for _ in range(iterations):
        try:
            predict(client, route)
        except requests.HTTPError as error:
            if error.response is not None and error.response.status_code == 429:
                time.sleep(0.01)
                continue
            raise


# -- the MLflow AI Gateway ----------------------------------------------------------------
def test_unguarded_naive_loop_amplifies_with_mlflows_internal_retries(gateway, mlflow_retries):
    proxy, _ = gateway
    client = get_deploy_client(proxy.url)
    naive_loop(client, "control", 8)
    statuses = proxy.statuses("/control/")
    # 3 successes, then every further predict is 1 attempt + 3 urllib3 retries, all 429
    assert statuses.count(200) == LIMIT
    assert statuses.count(429) == (8 - LIMIT) * 4
    assert len(statuses) == LIMIT + (8 - LIMIT) * 4


def test_guarded_loop_trips_on_consecutive_429s_and_sends_nothing_after(gateway, mlflow_retries, tracking):
    proxy, _ = gateway
    client = get_deploy_client(proxy.url)
    runguard.autolog()  # max_consecutive_429s defaults to 5
    with mlflow.start_run() as run:
        with pytest.raises(runguard.RunGuardTripped) as caught:
            naive_loop(client, "guarded", 8)
        received = proxy.count("/guarded/")
        # 3 successes; predict 4: 1 attempt + 3 retries, all 429 (4 in a row); predict 5's first
        # attempt is the 5th 429 in a row: the trip stops urllib3's retries right there
        assert received == LIMIT + 4 + 1
        assert proxy.statuses("/guarded/").count(429) == 5
        for _ in range(3):  # the agent's own retries: refused before anything is sent
            with pytest.raises(runguard.RunGuardTripped):
                predict(client, "guarded")
        assert proxy.count("/guarded/") == received
        snapshot = runguard.current()
        assert snapshot.requests == received  # every HTTP attempt, MLflow's internal retries included
        assert snapshot.calls == LIMIT  # only the answered calls were billed
        assert snapshot.consecutive_429s == 5
    error = caught.value
    assert error.limit == "max_consecutive_429s" and error.threshold == 5 and error.observed == 5
    assert error.scope == f"run:{run.info.run_id}"
    _recording.flush(10)
    data = MlflowClient().get_run(run.info.run_id).data
    assert data.tags["runguard.trip_limit"] == "max_consecutive_429s"
    assert "5 consecutive 429" in data.tags["runguard.tripped"]
    assert data.metrics["runguard.gateway_requests"] == received
    assert data.metrics["runguard.consecutive_429s"] == 5


def test_gateway_predict_is_counted_and_priced_by_the_model_the_route_serves(gateway):
    proxy, upstream = gateway
    client = get_deploy_client(proxy.url)
    runguard.autolog(max_calls=2)
    first = predict(client, "open")
    predict(client, "open")
    with pytest.raises(runguard.RunGuardTripped):
        predict(client, "open")
    snapshot = runguard.current()
    assert snapshot.calls == 2 and snapshot.requests == 2
    assert snapshot.input_tokens == 2 * first["usage"]["prompt_tokens"]
    assert snapshot.cost_usd > 0  # the second call was priced as the route's model (gpt-4o-mini)


def test_two_sessions_on_one_route_the_looping_one_trips_the_other_completes(gateway):
    proxy, _ = gateway
    client = get_deploy_client(proxy.url)
    runguard.autolog()
    outcome: dict = {}
    started = threading.Barrier(2)

    def looper():
        with runguard.session("looper", max_requests=6):
            started.wait()
            try:
                while True:
                    predict(client, "shared", "loop")
            except runguard.RunGuardTripped as error:
                outcome["looper"] = error

    def worker():
        with runguard.session("worker") as session:
            started.wait()
            outcome["answers"] = [predict(client, "shared", "work") for _ in range(5) if not time.sleep(0.02)]
            outcome["worker"] = session.snapshot()

    threads = [threading.Thread(target=looper), threading.Thread(target=worker)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert outcome["looper"].limit == "max_requests" and outcome["looper"].scope == "session:looper"
    assert len(outcome["answers"]) == 5 and outcome["worker"].tripped is None
    assert proxy.count("/shared/", b"loop") == 6  # it stopped sending before the route saturated
    assert proxy.count("/shared/", b"work") == 5
    assert set(proxy.statuses("/shared/")) == {200}


def test_budget_429_from_the_gateway_trips_on_the_first_attempt(mlflow_retries):
    """MLflow's gateway budget policies answer 429 with the budget in the message."""
    budget = ("Budget limit exceeded. Limit: $5.00 USD per 1 day. "
              "Budget resets at 2026-11-29T00:00:00Z. Request rejected.")
    with FakeOpenAIServer(Reply(status=429, body={"detail": budget})) as server:
        client = get_deploy_client(server.base_url.removesuffix("/v1"))
        runguard.autolog()
        with pytest.raises(runguard.RunGuardTripped) as caught:
            predict(client, "chat")
        assert server.count() == 1  # not 1 + MLflow's 3 retries
        assert "budget" in caught.value.reason.lower()
        with pytest.raises(runguard.RunGuardTripped):
            predict(client, "chat")
        assert server.count() == 1


def test_retried_429_body_still_reaches_the_caller_intact(mlflow_retries):
    """Reading a 429's body (to tell a budget refusal) must not take it from ``requests``."""
    with FakeOpenAIServer(Reply(status=429, content="slow down")) as server:
        client = get_deploy_client(server.base_url.removesuffix("/v1"))
        runguard.autolog()
        with pytest.raises(requests.HTTPError) as caught:
            predict(client, "chat")
        assert server.count() == 4
        assert "slow down" in caught.value.response.text


# -- the openai SDK's own retry loop ------------------------------------------------------
def test_openai_max_retries_stop_at_max_consecutive_429s(server):
    server.default = Reply(status=429, headers={"retry-after-ms": "1", "retry-after": "2"})
    client = openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=5)
    runguard.autolog(max_consecutive_429s=3)
    with pytest.raises(runguard.RunGuardTripped) as caught:
        chat(client)
    assert server.count() == 3  # not 1 + 5 retries
    assert caught.value.limit == "max_consecutive_429s"
    assert "Retry-After: 2 s" in caught.value.reason
    with pytest.raises(runguard.RunGuardTripped):
        chat(client)
    assert server.count() == 3


async def test_async_openai_retries_stop_at_the_default_five(server):
    server.default = Reply(status=429, headers={"retry-after-ms": "1"})
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="test", max_retries=8)
    runguard.autolog()
    with pytest.raises(runguard.RunGuardTripped):
        await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert server.count() == 5
    assert runguard.current().requests == 5


def test_a_success_resets_the_run_of_429s(server):
    throttle = Reply(status=429, headers={"retry-after-ms": "1"})
    server.script(throttle, throttle, Reply(content="fine"), throttle, throttle, Reply(content="fine"))
    client = openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=5)
    runguard.autolog(max_consecutive_429s=3)
    assert chat(client).choices[0].message.content == "fine"
    assert chat(client).choices[0].message.content == "fine"
    snapshot = runguard.current()
    assert snapshot.consecutive_429s == 0 and snapshot.tripped is None
    assert snapshot.calls == 2 and snapshot.requests == 6


def test_max_requests_counts_the_sdks_retries(server):
    server.default = Reply(status=500)
    client = openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=2)
    runguard.autolog(max_requests=5)
    with pytest.raises(openai.InternalServerError):
        chat(client)  # 3 attempts
    with pytest.raises(runguard.RunGuardTripped) as caught:
        chat(client)  # 2 more attempts fit; the third is refused before it is sent
    assert server.count() == 5
    assert caught.value.limit == "max_requests"
    with pytest.raises(runguard.RunGuardTripped):
        chat(client)
    assert server.count() == 5


def test_budget_style_429_from_openai_trips_on_the_first_attempt(server):
    server.default = Reply(status=429, body={"error": {
        "message": "You exceeded your current quota, please check your plan and billing details.",
        "type": "insufficient_quota", "code": "insufficient_quota"}})
    client = openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=5)
    runguard.autolog()
    with pytest.raises(runguard.RunGuardTripped) as caught:
        chat(client)
    assert server.count() == 1
    assert caught.value.threshold is None and "retrying cannot fix" in caught.value.reason


def test_a_bad_key_opens_the_circuit_but_the_sdks_error_reaches_the_caller(server):
    server.default = Reply(status=401, content="Incorrect API key provided")
    client = openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=3)
    runguard.autolog()
    with pytest.raises(openai.AuthenticationError):
        chat(client)
    with pytest.raises(runguard.RunGuardTripped) as caught:
        chat(client)  # the agent's retry: refused
    assert server.count() == 1
    assert caught.value.limit == "request_refused"


def test_retry_after_is_parsed_as_seconds_or_http_date_and_malformed_is_ignored(server):
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 1.5 ") == 1.5
    soon = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= parse_retry_after(soon) <= 31
    for malformed in ("soon", "", None, "nan", "inf", "Mon, 99 Foo 2026"):
        assert parse_retry_after(malformed) is None
    server.default = Reply(status=429, headers={"retry-after-ms": "1", "retry-after": "whenever"})
    client = openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=3)
    runguard.autolog(max_consecutive_429s=2)
    with pytest.raises(runguard.RunGuardTripped) as caught:
        chat(client)
    assert "Retry-After" not in caught.value.reason
    assert server.count() == 2


def test_shadow_mode_lets_the_retries_through_and_records(server):
    server.default = Reply(status=429, headers={"retry-after-ms": "1"})
    client = openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=4)
    runguard.autolog(max_consecutive_429s=2, on_trip="warn")
    with pytest.raises(openai.RateLimitError):
        chat(client)
    assert server.count() == 5  # nothing stopped
    assert runguard.current().tripped.limit == "max_consecutive_429s"


# -- the latency budget ---------------------------------------------------------------------
def test_request_latency_budget_counts_time_inside_requests(server):
    server.default = Reply(delay=0.3)
    client = openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=0)
    runguard.autolog(max_request_latency_s=1.0)
    for _ in range(4):
        chat(client)  # 4 x 0.3 s: the 4th crosses 1 s
    with pytest.raises(runguard.RunGuardTripped) as caught:
        chat(client)
    assert server.count() == 4
    assert caught.value.limit == "max_request_latency_s"
    assert 1.2 <= runguard.current().request_seconds < 1.6


def test_request_latency_excludes_a_slow_tracking_server(server, tmp_path, monkeypatch):
    """MLflow's autolog inside runguard's wrapper, exporting traces synchronously to a tracking
    server that takes 0.5 s per request: none of that is request latency."""
    monkeypatch.setenv("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", "false")
    process, port = start_tracking_server(tmp_path)
    try:
        with CountingProxy(port, delay=0.5) as slow:
            mlflow.set_tracking_uri(slow.url)
            mlflow.set_experiment("slow-tracking")
            mlflow.openai.autolog()  # first, so runguard's wrapper is outside MLflow's
            runguard.autolog(max_request_latency_s=0.5)
            client = openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=0)
            started = time.perf_counter()
            with mlflow.start_run():
                for _ in range(3):
                    chat(client)
            elapsed = time.perf_counter() - started
            mlflow.flush_trace_async_logging()
            assert slow.count() > 0 and elapsed > 1.5  # the tracking server was slow, and used
            assert server.count() == 3
            assert runguard.current().tripped is None
            assert runguard.current().request_seconds < 0.5
    finally:
        mlflow.openai.autolog(disable=True)
        mlflow.set_tracking_uri(None)
        process.stop()


# -- other deployments clients --------------------------------------------------------------
def test_databricks_client_predict_and_predict_stream_are_guarded(server, monkeypatch):
    monkeypatch.setenv("DATABRICKS_HOST", server.base_url.removesuffix("/v1"))
    monkeypatch.setenv("DATABRICKS_TOKEN", "test")
    client = get_deploy_client("databricks")
    runguard.autolog(max_calls=2, max_output_tokens=math.inf)
    inputs = {"messages": [{"role": "user", "content": "hi"}]}
    assert client.predict(endpoint="chat", inputs=inputs)["usage"]["completion_tokens"] == 1
    server.default = Reply(content="one two three four")
    chunks = list(client.predict_stream(endpoint="chat", inputs=inputs))
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]).strip()
    assert runguard.current().calls == 2
    with pytest.raises(runguard.RunGuardTripped):
        client.predict(endpoint="chat", inputs=inputs)
    assert server.count("/serving-endpoints/chat/invocations") == 2


def test_databricks_stream_is_cut_at_the_output_ceiling(server, monkeypatch):
    monkeypatch.setenv("DATABRICKS_HOST", server.base_url.removesuffix("/v1"))
    monkeypatch.setenv("DATABRICKS_TOKEN", "test")
    client = get_deploy_client("databricks")
    server.default = Reply(content=" ".join(["word"] * 50))
    runguard.autolog(max_output_tokens=5)
    received = []
    with pytest.raises(runguard.RunGuardTripped) as caught:
        for chunk in client.predict_stream(endpoint="chat", inputs={"messages": [{"role": "user", "content": "hi"}]}):
            received.append(chunk)
    assert caught.value.limit == "max_output_tokens"
    assert 0 < len(received) < 50
    assert server.count() == 1
