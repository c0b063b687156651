"""What MLflow shows: trip tags/metrics on the run, span attributes, the refused call in
the trace, and per-run summary metrics at run end.

Nothing here may delay or replace a trip. Writes to the tracking server go through one
background worker thread; the decision path only enqueues. A tracking error is logged
once, never raised. ``flush()`` waits (bounded) for pending writes.
"""

from __future__ import annotations

import atexit
import os
import queue
import sys
import threading
import time
from collections.abc import Callable

from ._counters import CALLS, COST, INPUT, OUTPUT, REQUESTS, TOTAL, ZERO
from ._runtime import RUNTIME, Events, log_once, log_trip
from ._scopes import innermost

TAG_TRIPPED = "runguard.tripped"
TAG_TRIP_LIMIT = "runguard.trip_limit"
TAG_TRIP_SCOPE = "runguard.trip_scope"
TAG_SHARED_BUDGET = "runguard.shared_budget"
TAG_AGENT = "runguard.agent"  # autolog(agent=...): what the trip report groups by
METRIC_TRIPPED = "runguard.tripped"  # 0 or 1 at run end (the tag of the same name holds the reason)
METRIC_CALLS_AT_TRIP = "runguard.calls_at_trip"
METRIC_TOKENS_AT_TRIP = "runguard.tokens_at_trip"
METRIC_COST_AT_TRIP = "runguard.cost_usd_at_trip"
METRIC_GATEWAY_REQUESTS = "runguard.gateway_requests"
METRIC_CONSECUTIVE_429S = "runguard.consecutive_429s"
# trips about HTTP attempts (a retry storm on a gateway route) also record those two
GATEWAY_LIMITS = ("max_requests", "max_consecutive_429s", "max_request_latency_s", "request_refused")
ATTR_CALLS = "runguard.calls"
ATTR_INPUT_TOKENS = "runguard.input_tokens"
ATTR_OUTPUT_TOKENS = "runguard.output_tokens"
ATTR_COST_USD = "runguard.cost_usd"
ATTR_SCOPE = "runguard.scope"
SUMMARY_METRICS = (
    ("runguard.calls", CALLS),
    ("runguard.input_tokens", INPUT),
    ("runguard.output_tokens", OUTPUT),
    ("runguard.cost_usd", COST),
)
LLM_SPAN_TYPES = ("CHAT_MODEL", "LLM", "EMBEDDING")


# -- background worker -------------------------------------------------------------------
class _Worker:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()
        RUNTIME.fork_safe(self, "_lock", threading.Lock)

    def submit(self, job: Callable[[], None]) -> None:
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._queue = queue.SimpleQueue()
                    threading.Thread(
                        target=self._run, args=(self._queue,), name="runguard-recorder", daemon=True
                    ).start()
                    self._pid = os.getpid()
        assert self._queue is not None
        self._queue.put(job)

    @staticmethod
    def _run(jobs: queue.SimpleQueue) -> None:
        while True:
            job = jobs.get()
            try:
                job()
            except Exception as error:
                log_once(
                    ("recording", type(error).__name__),
                    "runguard: could not write to MLflow (%s: %s); the trip itself is unaffected. Logged once.",
                    type(error).__name__,
                    error,
                )

    def flush(self, timeout: float = 10.0) -> bool:
        if self._queue is None or self._pid != os.getpid():
            return True
        done = threading.Event()
        self._queue.put(done.set)
        return done.wait(timeout)


_WORKER = _Worker()


def flush(timeout: float = 10.0) -> bool:
    """Wait up to ``timeout`` seconds for runguard's pending MLflow writes; True when done."""
    return _WORKER.flush(timeout)


atexit.register(lambda: _WORKER.flush(5.0))


# -- helpers ------------------------------------------------------------------------------
def _mlflow():
    return sys.modules.get("mlflow")


def active_run_info():
    """(run id, experiment id, tracking URI) of this thread's active run, or None."""
    fluent = sys.modules.get("mlflow.tracking.fluent")
    if fluent is None:
        return None
    run = fluent.active_run()
    if run is None:
        return None
    import mlflow

    return run.info.run_id, run.info.experiment_id, mlflow.get_tracking_uri()


def write_run(run_id: str, uri: str, metrics: dict[str, float], tags: dict[str, object]) -> None:
    """Metrics and tags in one batch, in the calling thread (trips hand it to the worker)."""
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    stamp = int(time.time() * 1000)
    MlflowClient(tracking_uri=uri).log_batch(
        run_id,
        metrics=[Metric(key, float(value), stamp, 0) for key, value in metrics.items()],
        tags=[RunTag(key, str(value)[:5000]) for key, value in tags.items()],
    )


# -- trips ----------------------------------------------------------------------------------
_HERE = object()


def tripped(trip, scope=None, where=_HERE) -> None:
    """A scope's circuit just opened: one log line and the run's tags/metrics (in the background),
    on this thread's active run (or the run ``where`` names, for trips found off the call's thread)."""
    try:
        log_trip(trip)
        if where is _HERE:
            where = active_run_info()
        if where:  # (False: the trip belongs to no run)
            _on_run(trip, where, True)
    except Exception as error:
        log_once(("record-trip", type(error).__name__), "runguard: could not record a trip (%s)", error)


def _on_run(trip, where, at_trip: bool) -> None:
    """The trip's tags and ``runguard.tripped`` = 1 on the run ``where`` names (in the background);
    ``at_trip``: the scope's counters when it tripped too (not for a later run that a circuit
    already open refused: those counters are another run's)."""
    run_id, _, uri = where
    metrics: dict[str, float] = {METRIC_TRIPPED: 1}
    if at_trip:
        used = trip.used or ZERO
        metrics[METRIC_CALLS_AT_TRIP] = used[CALLS]
        metrics[METRIC_TOKENS_AT_TRIP] = used[TOTAL]
        metrics[METRIC_COST_AT_TRIP] = used[COST]
        if trip.limit in GATEWAY_LIMITS:
            metrics[METRIC_GATEWAY_REQUESTS] = used[REQUESTS]
            metrics[METRIC_CONSECUTIVE_429S] = trip.consecutive_429s
    tags = {TAG_TRIPPED: trip.reason, TAG_TRIP_LIMIT: trip.limit, TAG_TRIP_SCOPE: trip.scope}
    if trip.scope.startswith("shared:"):
        tags[TAG_SHARED_BUDGET] = trip.scope[len("shared:") :]
    tags.update(_agent_tag())
    _note_tripped_run(run_id)
    _WORKER.submit(lambda: write_run(run_id, uri, metrics, tags))


_spanned_trips: set = set()
RUNTIME.on_reset(_spanned_trips.clear)


def _traced_span(mlflow, request):
    """The MLflow span of this call, if MLflow traces it: the active span, or the span that
    ``mlflow.openai.autolog()`` (patched above runguard) started out of context and named in
    the request's ``traceparent`` header."""
    span = mlflow.get_current_active_span()
    if span is not None or not isinstance(request, dict):
        return span
    headers = request.get("extra_headers")
    parent = headers.get("traceparent") if isinstance(headers, dict) else None
    if not isinstance(parent, str) or parent.count("-") != 3:
        return None
    from mlflow.tracing.trace_manager import InMemoryTraceManager

    _, trace_hex, span_hex, _ = parent.split("-")
    manager = InMemoryTraceManager.get_instance()
    trace_id = manager.get_mlflow_trace_id_from_otel_id(int(trace_hex, 16))
    return None if trace_id is None else manager.get_span_from_id(trace_id, span_hex)


def refused(error, trip, newly: bool, target: str, request=None, sticky: bool = True) -> None:
    """A call was refused (or, in shadow mode, would have been): make it visible once, as an
    event on the call's MLflow span, or, with no span for it, as one error span."""
    try:
        if newly:
            tripped(trip)
        elif sticky and RUNTIME.runs_seen:  # a circuit already open refused a call of a run not yet marked
            where = active_run_info()
            if where is not None and where[0] not in _tripped_runs:
                _on_run(trip, where, False)
        mlflow = _mlflow()
        if mlflow is None:
            return
        attributes = {
            "runguard.reason": trip.reason,
            "runguard.limit": trip.limit,
            "runguard.scope": trip.scope,
            "runguard.threshold": str(trip.threshold),
            "runguard.observed": str(trip.observed),
            "runguard.target": target,
        }
        span = _traced_span(mlflow, request)
        if span is not None:
            from mlflow.entities import SpanEvent

            span.add_event(SpanEvent("runguard.tripped", attributes=attributes))  # type: ignore[abstract]
            return
        key = (trip.scope, trip.limit, trip.reason)
        if key in _spanned_trips:
            return
        where = active_run_info()
        if where is None and not _llm_autolog_on():
            return  # no run and no LLM tracing: there is no trace for the refusal to appear in
        _spanned_trips.add(key)
        if where is None:  # no run: the trace goes to this thread's experiment
            where = (None, mlflow.tracking.fluent._get_experiment_id(), None)
        _WORKER.submit(lambda: _refused_span(error, attributes, target, where))
    except Exception as failure:
        log_once(("record-refusal", type(failure).__name__), "runguard: could not record a refusal (%s)", failure)


def _llm_autolog_on() -> bool:
    try:
        from mlflow.utils.autologging_utils import autologging_is_disabled

        return not autologging_is_disabled("openai") or not autologging_is_disabled("langchain")
    except Exception:
        return False


def _refused_span(error, attributes: dict, target: str, where) -> None:
    import mlflow
    from mlflow.entities import SpanEvent, SpanStatusCode

    metadata = {"mlflow.sourceRun": where[0]} if where and where[0] else None
    experiment_id = where[1] if where else None
    span = mlflow.start_span_no_context(
        name=f"runguard refused {target}",
        span_type="LLM",
        inputs={"limit": attributes["runguard.limit"], "scope": attributes["runguard.scope"]},
        attributes=attributes,
        metadata=metadata,
        experiment_id=experiment_id,
    )
    span.add_event(SpanEvent("runguard.tripped", attributes=attributes))  # type: ignore[abstract]
    span.add_event(SpanEvent.from_exception(error))
    span.set_status(SpanStatusCode.ERROR)
    span.end()


# -- span processor ------------------------------------------------------------------------
def span_processor(span) -> None:
    """Add the innermost scope's running totals to every LLM span (composes with the user's)."""
    if not RUNTIME.enabled or str(getattr(span, "span_type", "")) not in LLM_SPAN_TYPES:
        return
    try:
        call = RUNTIME.in_flight()
        scope = call.charges[-1][0] if call is not None else innermost()
        used = list(scope.used)
        if call is not None and not call.settled:
            # our wrapper sits outside MLflow's: this span's call has not settled yet
            usage = span.get_attribute("mlflow.chat.tokenUsage") or {}
            prompt = usage.get("input_tokens", call.prompt) if isinstance(usage, dict) else call.prompt
            output = usage.get("output_tokens", 0) if isinstance(usage, dict) else 0
            pending = call.amounts(prompt, output)
            used = [a + b for a, b in zip(used, pending)]
        span.set_attribute(ATTR_CALLS, int(used[CALLS]))
        span.set_attribute(ATTR_INPUT_TOKENS, int(used[INPUT]))
        span.set_attribute(ATTR_OUTPUT_TOKENS, int(used[OUTPUT]))
        span.set_attribute(ATTR_COST_USD, float(used[COST]))
        span.set_attribute(ATTR_SCOPE, scope.name)
    except Exception as error:
        log_once(("span-processor", type(error).__name__), "runguard: span processor failed (%s)", error)


span_processor.__name__ = "runguard_span_processor"


def apply_span_processors(wrapped, instance, args, kwargs):
    """A wrapt wrapper of MLflow's ``apply_span_processors`` (run as each span ends): runguard's
    processor first, then the user's. It never shows in ``mlflow.tracing.configure``'s list, and
    no reset of MLflow's tracing configuration (``mlflow.set_tracking_uri()``) drops it."""
    if RUNTIME.enabled and args:
        span_processor(args[0])
    return wrapped(*args, **kwargs)


# -- run end -----------------------------------------------------------------------------
# runs that carry a trip's tags, whichever scope tripped (a session or a shared budget inside
# the run, not only the run's own): their runguard.tripped metric is 1, as their tags say
_tripped_runs: dict[str, None] = {}
_MAX_TRIPPED_RUNS = 4096  # runs that never end (the process exits first) are forgotten past this
RUNTIME.on_reset(_tripped_runs.clear)


def _note_tripped_run(run_id: str) -> None:
    if len(_tripped_runs) >= _MAX_TRIPPED_RUNS:
        _tripped_runs.pop(next(iter(_tripped_runs)), None)
    _tripped_runs[run_id] = None


def write_run_summary(run_id: str, scope) -> None:
    """Spend per run and whether it tripped (0 or 1), so spend and trip rate can be charted
    across experiments; only for a run that made a guarded call (others get no metric)."""
    import mlflow

    noted = run_id in _tripped_runs
    _tripped_runs.pop(run_id, None)
    tripped_here = noted or (scope is not None and scope.tripped is not None)
    if not tripped_here and (scope is None or not (scope.used[CALLS] or scope.used[REQUESTS])):
        return
    used = scope.used if scope is not None else ZERO
    metrics = {name: used[index] for name, index in SUMMARY_METRICS}
    metrics[METRIC_TRIPPED] = 1 if tripped_here else 0
    write_run(run_id, mlflow.get_tracking_uri(), metrics, _agent_tag())


def _agent_tag() -> dict[str, object]:
    agent = RUNTIME.settings["agent"].value
    return {} if agent is None else {TAG_AGENT: agent}


class Recorder(Events):
    """The runtime's events, written to MLflow (see the module docstring)."""

    def tripped(self, trip, scope=None, where=_HERE) -> None:
        tripped(trip, scope, _HERE if where is None else where)

    def refused(self, error, trip, newly, target, request=None, sticky=True) -> None:
        refused(error, trip, newly, target, request, sticky)

    def run_info(self):
        return active_run_info() if RUNTIME.runs_seen else None


RUNTIME.events = Recorder()

__all__ = ["Recorder", "flush", "refused", "span_processor", "tripped"]
