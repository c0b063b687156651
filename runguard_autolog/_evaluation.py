"""Evaluation fan-out: estimate the LLM calls of an evaluation, then sample or refuse before
the first judge call; count judge and agent calls while it runs.

An evaluation with LLM judges makes rows x judges x (1 + retries) judge calls, plus the
agent's own calls per row when it runs a model: one line can cost thousands of calls.
Before anything is sent, :func:`plan` estimates::

    estimate = rows x judges x (1 + judge_max_retries) + rows x agent_calls_per_row

(agent calls are 0 when there is no model to run: the data holds the outputs). Over the
budget it samples ``floor(budget / (judges x (1 + retries) + agent_calls_per_row))`` rows
with a fixed seed, or refuses (``sample_if_over_budget=False``, or fewer than ``min_rows``
left). While it runs, the evaluation is a unit of work of its own (a session whose call
ceiling is the budget): MLflow's judge requests (patched in ``integrations.mlflow_evaluation``)
and the model's calls count there, and are refused past it. An evaluation that trips
mid-way still returns what was scored and says how many rows were not.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import random
import sys
from dataclasses import dataclass
from typing import Any

from . import _recording
from ._counters import fmt as _fmt
from ._errors import RunGuardConfigError, RunGuardTripped
from ._runtime import RUNTIME, log_once, logger
from ._scopes import _SESSIONS, session, set_evaluating

SAMPLE_SEED = 20240917  # fixed: the same data and budget always give the same rows
TAG_ROWS = "runguard.eval_rows"
TAG_METRICS = "runguard.eval_metrics"
TAG_ESTIMATE = "runguard.eval_llm_estimate"
TAG_SAMPLED = "runguard.eval_sampled_rows"
TAG_UNSCORED = "runguard.eval_rows_unscored"
LIMIT = "max_eval_llm_calls"


@dataclass
class Plan:
    rows: int
    judges: int
    per_row: int  # LLM calls one row is estimated to cost
    estimate: int
    budget: float
    keep: int  # rows to evaluate (== rows when within budget)

    @property
    def sampled(self) -> bool:
        return self.keep < self.rows


def _table(data: Any) -> Any:
    """The rows of an MLflow dataset object (``mlflow.genai`` EvaluationDataset: ``to_df()``;
    ``mlflow.data`` PandasDataset: ``.df``); other data as it is."""
    if hasattr(data, "__len__"):
        return data
    if callable(getattr(data, "to_df", None)):
        return data.to_df()
    frame = getattr(data, "df", None)
    return frame if frame is not None else data


def count_rows(data: Any) -> int:
    """Rows of a pandas DataFrame, a list of dicts or traces, or an MLflow dataset."""
    if data is None:
        raise RunGuardConfigError("runguard: the evaluation has no data")
    data = _table(data)
    try:
        return len(data)
    except TypeError:
        raise RunGuardConfigError(
            f"runguard: cannot count the rows of evaluation data of type {type(data).__name__} "
            "(pass a pandas DataFrame, a list, or an MLflow EvaluationDataset)"
        ) from None


def is_llm_judge(metric: Any) -> bool:
    """An LLM judge (a call per row), as opposed to a code metric or scorer."""
    if getattr(metric, "genai_metric_args", None) is not None:  # make_genai_metric and its built-ins
        return True
    judge_class = _judge_class()
    if judge_class is None or not isinstance(metric, judge_class):
        return False
    # LLM judges name a model (a field of built-in judges, a property of make_judge's);
    # rule-based built-ins (RegexMatch, PIIDetection, ...) have none
    return "model" in (getattr(type(metric), "model_fields", None) or ()) or hasattr(type(metric), "model")


def _judge_class():
    module = sys.modules.get("mlflow.genai.judges.base")
    if module is None:
        try:
            from mlflow.genai.judges.base import Judge
        except Exception:
            return None
        return Judge
    return getattr(module, "Judge", None)


def plan(
    rows: int,
    metrics: list,
    *,
    has_model: bool,
    budget: float,
    agent_calls_per_row_estimate: int,
    judge_max_retries: int,
    sample_if_over_budget: bool,
    min_rows: int,
) -> Plan:
    """The pre-run estimate; raises ``RunGuardTripped`` to refuse before any request."""
    judges = sum(1 for metric in metrics or () if is_llm_judge(metric))
    per_row = judges * (1 + judge_max_retries) + (agent_calls_per_row_estimate if has_model else 0)
    estimate = rows * per_row
    keep = rows
    if estimate > budget:
        fitting = math.floor(budget / per_row)
        if not sample_if_over_budget:
            raise _refusal(
                f"the evaluation would make about {estimate} LLM calls ({rows} rows x {per_row} per row), "
                f"over max_eval_llm_calls={_fmt(budget)}; nothing was sent",
                budget,
                estimate,
            )
        if fitting < min_rows:
            raise _refusal(
                f"the evaluation would make about {estimate} LLM calls ({rows} rows x {per_row} per row), "
                f"over max_eval_llm_calls={_fmt(budget)}; sampling to fit would leave {fitting} rows, "
                f"fewer than min_rows={min_rows}; nothing was sent",
                budget,
                estimate,
            )
        keep = fitting
    return Plan(rows, judges, per_row, estimate, budget, keep)


def _refusal(reason: str, budget: float, estimate: int) -> RunGuardTripped:
    return RunGuardTripped(reason, limit=LIMIT, threshold=budget, observed=estimate, scope="evaluation")


def sample(data: Any, keep: int) -> Any:
    """``keep`` rows drawn with a fixed seed, in their original order (a PandasDataset stays one,
    with its targets and predictions columns)."""
    table = _table(data)
    positions = sorted(random.Random(SAMPLE_SEED).sample(range(len(table)), keep))
    rows = table.iloc[positions] if hasattr(table, "iloc") else [table[position] for position in positions]
    if table is not data and getattr(data, "df", None) is table:  # mlflow.data PandasDataset
        import mlflow.data

        return mlflow.data.from_pandas(  # type: ignore[attr-defined]
            rows, source=data.source, targets=data.targets, name=data.name, predictions=data.predictions
        )
    return rows


@contextlib.contextmanager
def evaluation_run():
    """The run the evaluation logs to: the active one, else a new one (so its tags land there)."""
    import mlflow

    if mlflow.active_run() is not None:
        yield mlflow.active_run()
        return
    with mlflow.start_run() as run:
        yield run


@contextlib.contextmanager
def evaluation_scope(budget: float):
    """A unit of work whose call ceiling is the budget, also for MLflow's worker threads."""
    with session("evaluation", max_calls=budget) as scope:
        previous = set_evaluating(_SESSIONS.get())
        try:
            yield scope
        finally:
            set_evaluating(previous)


def _tag(run_id: str, tags: dict) -> None:
    """Before or after the evaluation, in the caller's thread (not a decision path). NB: not in
    runguard's background writer: MLflow's evaluate registers import hooks under its own lock
    while that thread may be importing, and the two locks can deadlock."""
    import mlflow

    try:
        _recording.write_run(run_id, mlflow.get_tracking_uri(), {}, tags)
    except Exception as error:
        log_once(("eval-tags", type(error).__name__), "runguard: could not tag the evaluation run (%s)", error)


def run_guarded(
    evaluate_rows,
    *,
    data: Any,
    metrics: list,
    has_model: bool,
    budget: float,
    agent_calls_per_row_estimate: int = 5,
    judge_max_retries: int = 1,
    sample_if_over_budget: bool = True,
    min_rows: int = 10,
) -> Any:
    """Plan, sample or refuse, then ``evaluate_rows(data)`` inside the evaluation's scope."""
    rows = count_rows(data)
    the_plan = plan(
        rows,
        metrics,
        has_model=has_model,
        budget=budget,
        agent_calls_per_row_estimate=agent_calls_per_row_estimate,
        judge_max_retries=judge_max_retries,
        sample_if_over_budget=sample_if_over_budget,
        min_rows=min_rows,
    )
    tags = {TAG_ROWS: rows, TAG_METRICS: the_plan.judges, TAG_ESTIMATE: the_plan.estimate}
    if the_plan.sampled:
        data = sample(data, the_plan.keep)
        tags[TAG_SAMPLED] = the_plan.keep
        logger.warning(
            "runguard: evaluation estimated at %d LLM calls (%d rows x %d judges x %d tries + %d agent calls "
            "per row), over max_eval_llm_calls=%s: evaluating %d of %d rows, sampled with seed %d",
            the_plan.estimate,
            rows,
            the_plan.judges,
            1 + judge_max_retries,
            agent_calls_per_row_estimate if has_model else 0,
            _fmt(budget),
            the_plan.keep,
            rows,
            SAMPLE_SEED,
        )
    else:
        logger.info(
            "runguard: evaluation estimated at %d LLM calls for %d rows (max_eval_llm_calls=%s)",
            the_plan.estimate,
            rows,
            _fmt(budget),
        )
    with evaluation_run() as run:
        _tag(run.info.run_id, tags)
        with evaluation_scope(budget) as scope:
            result = evaluate_rows(data)
            tripped = scope.snapshot().tripped
        if tripped is not None:
            unscored = unscored_rows(result)
            _tag(run.info.run_id, {TAG_UNSCORED: unscored})
            logger.warning(
                "runguard: the evaluation tripped (%s); %s of %d rows were not fully scored",
                tripped.reason,
                unscored,
                the_plan.keep,
            )
    return result


def unscored_rows(result: Any) -> int | str:
    """Rows of an evaluation result with an LLM judge score missing ("unknown" if unreadable)."""
    try:
        table = getattr(result, "result_df", None)  # mlflow.genai.evaluate
        suffix = "/value"
        if table is None:  # mlflow.evaluate
            table = (getattr(result, "tables", None) or {}).get("eval_results_table")
            suffix = "/score"
        if table is None:
            return "unknown"
        columns = [c for c in table.columns if str(c).endswith(suffix)]
        return int(table[columns].isna().any(axis=1).sum()) if columns else len(table)
    except Exception:
        return "unknown"


def guarded_evaluate(
    model,
    data,
    extra_metrics,
    *,
    max_eval_llm_calls: float = 500,
    agent_calls_per_row_estimate: int = 5,
    judge_max_retries: int = 1,
    sample_if_over_budget: bool = True,
    min_rows: int = 10,
    **evaluate_kwargs,
) -> Any:
    """``mlflow.genai.evaluate`` (when ``extra_metrics`` are scorers) or ``mlflow.evaluate``
    (legacy metrics), refused or sampled to fit ``max_eval_llm_calls`` before the first
    judge call, and counted while it runs. ``model`` is the ``predict_fn`` (genai) or the
    ``model`` (legacy); ``None`` when the data already holds the outputs."""
    budget = _budget(max_eval_llm_calls)
    metrics = list(extra_metrics or ())
    if _uses_scorers(metrics, evaluate_kwargs):
        from mlflow.genai.evaluation import base as genai_base

        metrics += list(evaluate_kwargs.pop("scorers", None) or ())
        model = evaluate_kwargs.pop("predict_fn", model)

        def evaluate_rows(rows):
            return genai_base.evaluate(data=rows, scorers=metrics, predict_fn=model, **evaluate_kwargs)
    else:
        from mlflow.models.evaluation import base

        def evaluate_rows(rows):
            return base.evaluate(model=model, data=rows, extra_metrics=metrics, **evaluate_kwargs)

    with _evaluating(), _breaker_on():
        return run_guarded(
            evaluate_rows,
            data=data,
            metrics=metrics,
            has_model=model is not None,
            budget=budget,
            agent_calls_per_row_estimate=agent_calls_per_row_estimate,
            judge_max_retries=judge_max_retries,
            sample_if_over_budget=sample_if_over_budget,
            min_rows=min_rows,
        )


def _budget(value: Any) -> float:
    from ._config import parse_keyword

    return parse_keyword(LIMIT, value)


def _uses_scorers(metrics: list, evaluate_kwargs: dict) -> bool:
    if "scorers" in evaluate_kwargs or "predict_fn" in evaluate_kwargs:
        return True
    scorer_module = sys.modules.get("mlflow.genai.scorers.base")
    if scorer_module is None:
        return False
    return any(isinstance(metric, scorer_module.Scorer) for metric in metrics)


# -- autolog: a direct mlflow.evaluate / mlflow.genai.evaluate gets the same pre-check -----
_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("runguard_evaluating", default=False)


@contextlib.contextmanager
def _evaluating():
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def _breaker_on():
    """Judge and agent calls are counted by the autolog patches: switch them on for this
    evaluation if ``runguard.autolog()`` has not been called (and off again after)."""
    if RUNTIME.enabled:
        yield
        return
    RUNTIME.switch(True)
    try:
        yield
    finally:
        if RUNTIME.enabled:
            RUNTIME.switch(False)


def _autolog_budget() -> float:
    return RUNTIME.settings[LIMIT].value


def _precheck(positional: tuple[str, ...], metrics_key: str, model_key: str):
    """A wrapper giving a direct evaluate call the pre-check, with ``autolog()``'s budget."""

    def guard(wrapped, instance, args, kwargs):
        if not RUNTIME.enabled or _ACTIVE.get():
            return wrapped(*args, **kwargs)
        named = dict(zip(positional, args))
        named.update(kwargs)
        data = named.pop("data", None)
        with _evaluating():
            return run_guarded(
                lambda rows: wrapped(data=rows, **named),
                data=data,
                metrics=list(named.get(metrics_key) or ()),
                has_model=named.get(model_key) is not None,
                budget=_autolog_budget(),
            )

    return guard


# mlflow.genai.evaluate(data, scorers, predict_fn=None, ...)
guard_genai_evaluate = _precheck(("data", "scorers", "predict_fn"), "scorers", "predict_fn")
# mlflow.evaluate(model=None, data=None, *, extra_metrics=None, ...)
guard_legacy_evaluate = _precheck(("model", "data"), "extra_metrics", "model")
