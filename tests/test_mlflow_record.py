"""What MLflow shows: trip tags/metrics, run summaries, span attributes, refused calls in traces,
and coexistence with mlflow.openai.autolog() in either order."""

from __future__ import annotations

import socket
import time

import mlflow
import openai
import pytest
from mlflow.tracking import MlflowClient

import runguard_autolog as runguard

from .conftest import chat


def _loop_until_trip(client, limit=20):
    for _ in range(limit):
        try:
            chat(client)
        except runguard.RunGuardTripped as trip:
            return trip
    raise AssertionError("never tripped")


def test_trip_tags_metrics_and_run_summary_are_written(client, server, tracking):
    mlflow.openai.autolog()
    runguard.autolog(max_calls=3)
    with mlflow.start_run() as run:
        trip = _loop_until_trip(client)
    assert trip.scope == f"run:{run.info.run_id}"
    data = MlflowClient().get_run(run.info.run_id).data
    assert data.tags["runguard.tripped"] == "call ceiling hit (3/3)"
    assert data.tags["runguard.trip_limit"] == "max_calls"
    assert data.metrics["runguard.calls_at_trip"] == 3
    assert data.metrics["runguard.tokens_at_trip"] == 33
    assert data.metrics["runguard.cost_usd_at_trip"] > 0
    assert data.metrics["runguard.calls"] == 3
    assert data.metrics["runguard.input_tokens"] == 30
    assert data.metrics["runguard.output_tokens"] == 3
    assert data.metrics["runguard.cost_usd"] == pytest.approx(data.metrics["runguard.cost_usd_at_trip"])
    assert server.count() == 3


def test_summary_metrics_are_written_for_an_untripped_run_and_on_mlflow_end_run(client, server, tracking):
    runguard.autolog()
    mlflow.start_run()
    run_id = mlflow.active_run().info.run_id
    chat(client)
    chat(client)
    mlflow.end_run()
    data = MlflowClient().get_run(run_id).data
    assert data.metrics["runguard.calls"] == 2
    assert "runguard.tripped" not in data.tags


def test_llm_spans_carry_the_scope_running_totals_and_the_refusal_is_traced(client, server, tracking):
    mlflow.openai.autolog()
    runguard.autolog(max_calls=2)
    with mlflow.start_run() as run:
        chat(client)
        chat(client)
        with pytest.raises(runguard.RunGuardTripped):
            chat(client)
    runguard.flush()
    mlflow.flush_trace_async_logging()
    traces = mlflow.search_traces(run_id=run.info.run_id, return_type="list")
    llm_spans = [s for t in traces for s in t.data.spans if s.span_type == "CHAT_MODEL"]
    calls = sorted(s.attributes["runguard.calls"] for s in llm_spans)
    assert calls == [1, 2]
    assert all(s.attributes["runguard.scope"] == f"run:{run.info.run_id}" for s in llm_spans)
    assert sorted(s.attributes["runguard.input_tokens"] for s in llm_spans) == [10, 20]
    refused = [s for t in traces for s in t.data.spans if s.name.startswith("runguard refused")]
    assert len(refused) == 1
    assert refused[0].status.status_code == "ERROR"
    assert refused[0].attributes["runguard.reason"] == "call ceiling hit (2/2)"
    assert any(e.name == "exception" for e in refused[0].events)


def test_span_attributes_when_runguard_sits_inside_mlflow_autolog(client, server, tracking):
    runguard.autolog(max_calls=5)
    mlflow.openai.autolog()  # MLflow's patch on top of ours
    with mlflow.start_run() as run:
        chat(client)
        chat(client)
    mlflow.flush_trace_async_logging()
    traces = mlflow.search_traces(run_id=run.info.run_id, return_type="list")
    calls = sorted(s.attributes["runguard.calls"] for t in traces for s in t.data.spans if s.span_type == "CHAT_MODEL")
    assert calls == [1, 2]


def test_a_refusal_inside_a_traced_function_is_an_event_on_the_active_span(client, server, tracking):
    runguard.autolog(max_calls=1)

    @mlflow.trace(name="agent")
    def agent():
        chat(client)
        try:
            chat(client)
        except runguard.RunGuardTripped:
            return "stopped"

    assert agent() == "stopped"
    mlflow.flush_trace_async_logging()
    trace = mlflow.get_trace(mlflow.get_last_active_trace_id())
    events = [e for s in trace.data.spans for e in s.events if e.name == "runguard.tripped"]
    assert events and events[0].attributes["runguard.limit"] == "max_calls"


def test_user_span_processors_compose_with_runguards(client, server, tracking):
    seen = []

    def user_processor(span):
        seen.append(span.name)
        span.set_attribute("user.mark", True)

    mlflow.openai.autolog()
    runguard.autolog()
    try:
        mlflow.tracing.configure(span_processors=[user_processor])
        assert mlflow.tracing.config.get_config().span_processors == [user_processor]  # runguard's is not shown
        with mlflow.start_run() as run:
            chat(client)
        mlflow.flush_trace_async_logging()
        span = [s for t in mlflow.search_traces(run_id=run.info.run_id, return_type="list") for s in t.data.spans][0]
        assert span.attributes["user.mark"] is True
        assert span.attributes["runguard.calls"] == 1
        assert seen
    finally:
        mlflow.tracing.configure(span_processors=[])


@pytest.mark.parametrize("order", ["mlflow-first", "runguard-first"])
def test_both_orders_with_mlflow_autolog_count_once_and_disable_restores(order, client, server, tracking):
    original = openai.resources.chat.completions.Completions.__dict__["create"]
    if order == "mlflow-first":
        mlflow.openai.autolog()
        runguard.autolog(max_calls=2)
    else:
        runguard.autolog(max_calls=2)
        mlflow.openai.autolog()
    with mlflow.start_run() as run:
        chat(client)
        chat(client)
        assert runguard.current().calls == 2  # counted once through both patches
        with pytest.raises(runguard.RunGuardTripped):
            chat(client)
    assert server.count() == 2
    mlflow.flush_trace_async_logging()
    assert len(mlflow.search_traces(run_id=run.info.run_id, return_type="list")) >= 2

    # disable in the opposite order too: the breaker is off at once either way
    runguard.autolog(disable=True)
    for _ in range(3):
        chat(client)
    assert server.count() == 5
    mlflow.openai.autolog(disable=True)
    runguard.autolog(disable=True)
    assert openai.resources.chat.completions.Completions.__dict__["create"] is original or order == "runguard-first"
    if order == "runguard-first":  # our wrapper sat under MLflow's; it is dormant, never counting
        chat(client)
        assert runguard.current().calls == 2
        runguard.autolog(max_calls=10)  # reinstall reuses it rather than stacking
        runguard.autolog(disable=True)
        assert openai.resources.chat.completions.Completions.__dict__["create"] is original


def test_mlflow_autolog_all_then_runguard(client, server, tracking):
    mlflow.autolog()
    runguard.autolog(max_calls=1)
    with mlflow.start_run():
        chat(client)
        with pytest.raises(runguard.RunGuardTripped):
            chat(client)
    mlflow.autolog(disable=True)
    assert server.count() == 1


def test_a_trip_raises_promptly_while_the_tracking_server_hangs(client, server, tracking):
    hanging = socket.socket()
    hanging.bind(("127.0.0.1", 0))
    hanging.listen(16)  # accepts connections into the backlog, never answers
    try:
        runguard.autolog(max_calls=2)
        with mlflow.start_run() as run:
            mlflow.set_tracking_uri(f"http://127.0.0.1:{hanging.getsockname()[1]}")
            chat(client)
            chat(client)  # trips at settle: the tag write goes to the hanging server
            started = time.perf_counter()
            with pytest.raises(runguard.RunGuardTripped):
                chat(client)
            elapsed = time.perf_counter() - started
            mlflow.set_tracking_uri(tracking)
        assert elapsed < 0.5, elapsed
        assert server.count() == 2
        assert MlflowClient().get_run(run.info.run_id).data.metrics["runguard.calls"] == 2
    finally:
        hanging.close()


def test_shadow_mode_records_but_lets_calls_through(client, server, tracking, caplog):
    runguard.autolog(max_calls=2, on_trip="warn")
    with mlflow.start_run() as run:
        for _ in range(5):
            chat(client)
    assert server.count() == 5
    data = MlflowClient().get_run(run.info.run_id).data
    assert data.tags["runguard.tripped"] == "call ceiling hit (2/2)"
    assert data.metrics["runguard.calls"] == 5
    assert sum("shadow mode" in r.message for r in caplog.records) == 1


def test_callable_on_trip_sees_the_trip_and_decides(client, server):
    seen = []

    def let_through_then_stop(trip):
        seen.append(trip)
        if len(seen) > 1:
            raise trip

    runguard.autolog(max_calls=1, on_trip=let_through_then_stop)
    chat(client)
    chat(client)  # the callable returned: proceeds as in warn mode
    with pytest.raises(runguard.RunGuardTripped):
        chat(client)
    assert server.count() == 2
    assert all(isinstance(t, runguard.RunGuardTripped) and t.limit == "max_calls" for t in seen)


def test_session_on_trip_overrides_autolog(client, server):
    runguard.autolog(max_calls=1)
    with runguard.session("shadow", on_trip="warn"):
        chat(client)
        chat(client)
    assert server.count() == 2


def test_a_refusal_outside_any_run_is_traced_when_llm_autolog_is_on(client, server, tracking):
    mlflow.openai.autolog()
    runguard.autolog(max_calls=1)
    chat(client)
    with pytest.raises(runguard.RunGuardTripped):
        chat(client)
    runguard.flush()
    mlflow.flush_trace_async_logging()
    spans = [s for t in mlflow.search_traces(return_type="list") for s in t.data.spans]
    refused = [s for s in spans if s.name == "runguard refused openai.chat.completions"]
    assert len(refused) == 1 and refused[0].attributes["runguard.limit"] == "max_calls"


def _traces():
    mlflow.flush_trace_async_logging()
    return mlflow.search_traces(return_type="list")


def test_span_totals_survive_set_tracking_uri_after_autolog(client, server, tmp_path):
    runguard.autolog(max_calls=10)  # the zero-code order: runguard first, then the program's own set-up
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/late.db")  # resets MLflow's tracing configuration
    mlflow.set_experiment("late")
    try:
        mlflow.openai.autolog()
        chat(client)
        chat(client)
        spans = [s for t in _traces() for s in t.data.spans if s.span_type == "CHAT_MODEL"]
        assert sorted(s.attributes.get("runguard.calls") for s in spans) == [1, 2]
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("order", ["runguard-first", "mlflow-first"])
def test_one_refusal_is_visible_in_one_trace_once(order, client, server, tracking):
    if order == "runguard-first":
        runguard.autolog(max_calls=1)
        mlflow.openai.autolog()
    else:
        mlflow.openai.autolog()
        runguard.autolog(max_calls=1)
    chat(client)
    with pytest.raises(runguard.RunGuardTripped):
        chat(client)
    runguard.flush()
    traces = _traces()
    events = [e for t in traces for s in t.data.spans for e in s.events if e.name == "runguard.tripped"]
    assert len(events) == 1
    assert events[0].attributes["runguard.limit"] == "max_calls"
    errors = [t for t in traces if t.info.state == "ERROR"]
    assert len(errors) == 1
    for span in errors[0].data.spans:  # runguard's own span names the limit and scope, never the request
        if span.name.startswith("runguard refused"):
            assert span.inputs == {"limit": "max_calls", "scope": "process"}


def test_only_runs_that_made_a_guarded_call_get_runguard_metrics(client, server, tracking):
    runguard.autolog(max_calls=10)
    with mlflow.start_run() as quiet:
        mlflow.log_metric("loss", 1.0)
    with mlflow.start_run() as busy:
        chat(client)
    runguard.flush()
    assert set(mlflow.get_run(quiet.info.run_id).data.metrics) == {"loss"}
    metrics = mlflow.get_run(busy.info.run_id).data.metrics
    assert metrics["runguard.calls"] == 1 and metrics["runguard.tripped"] == 0
