"""MLflow run lifecycle and tracing config: where run scopes begin and end.

``mlflow.start_run``/``end_run`` are re-exports of ``mlflow.tracking.fluent``'s
functions, so both bindings are patched (``with mlflow.start_run()`` ends through
the fluent one, ``mlflow.end_run()`` through the top-level one); each call path
passes exactly one wrapper. MLflow's ``apply_span_processors`` (the step that runs the
user's ``span_processors`` as a span ends) is patched to run runguard's processor first, so
it is never in the user's list and survives any reset of MLflow's tracing configuration.
"""

from __future__ import annotations

from .. import _artifacts, _recording
from .._patching import PatchSpec
from .._runtime import RUNTIME, internal_error
from .._scopes import drop_run, note_run_started, note_runs_seen

NAME = "mlflow"
TARGET_MODULE = "mlflow"


def _start_run(wrapped, instance, args, kwargs):
    note_runs_seen()  # before the run exists: from now on calls look for the active run
    run = wrapped(*args, **kwargs)
    try:
        if RUNTIME.enabled:
            note_run_started(run.info.run_id)
    except Exception as error:
        internal_error("start_run", error)
    return run


def _end_run(wrapped, instance, args, kwargs):
    if RUNTIME.enabled:
        try:
            from mlflow.tracking.fluent import active_run

            run = active_run()
            if run is not None:
                run_id = run.info.run_id
                _artifacts.flush_run(run_id)  # the outputs spooled past the artifact budget
                _recording.flush(timeout=5.0)
                scope = drop_run(run_id)
                try:
                    _recording.write_run_summary(run_id, scope)
                except Exception as error:
                    _recording.log_once(
                        ("summary", type(error).__name__), "runguard: could not write run summary metrics (%s)", error
                    )
        except Exception as error:
            internal_error("end_run", error)
    return wrapped(*args, **kwargs)


PATCHES = (
    PatchSpec("mlflow", "start_run", wrapper=_start_run),
    PatchSpec("mlflow.tracking.fluent", "start_run", wrapper=_start_run),
    PatchSpec("mlflow", "end_run", wrapper=_end_run),
    PatchSpec("mlflow.tracking.fluent", "end_run", wrapper=_end_run),
    # runguard's span processor runs inside MLflow's own step, never in the user's list
    PatchSpec("mlflow.entities.span", "apply_span_processors", wrapper=_recording.apply_span_processors),
)


def on_install() -> None:
    import mlflow

    if mlflow.active_run() is not None:  # a run started before runguard.autolog()
        note_runs_seen()
