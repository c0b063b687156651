"""Evaluation fan-out, with real MLflow evaluation: ``mlflow.genai.evaluate`` with built-in
judges and ``make_judge`` (model ``openai:/gpt-4o-mini``) and legacy ``mlflow.evaluate``
with ``make_genai_metric``, their judge requests answered by the loopback fake server
(``OPENAI_BASE_URL``). Assertions are on the requests the server received."""

from __future__ import annotations

import json
import math
import re

import mlflow
import openai
import pandas as pd
import pytest
from mlflow.genai.judges import make_judge
from mlflow.genai.scorers import Correctness, Guidelines, RegexMatch, scorer
from mlflow.metrics.genai import make_genai_metric
from mlflow.tracking import MlflowClient

import runguard_autolog as runguard
from runguard_autolog import _recording
from runguard_autolog._evaluation import SAMPLE_SEED
from runguard_autolog.testing import Reply

JUDGE = "openai:/gpt-4o-mini"
# one reply both judge parsers accept (genai: result/rationale; legacy: score/justification)
VERDICT = json.dumps({"result": "yes", "rationale": "ok", "score": 5, "justification": "ok"})


@pytest.fixture(autouse=True)
def judges_answered_by_the_fake_server(server, tracking, monkeypatch):
    server.default = Reply(content=VERDICT)
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.delenv("OPENAI_API_BASE", raising=False)
    monkeypatch.setenv("MLFLOW_GENAI_EVAL_MAX_WORKERS", "2")  # sqlite copes badly with 10 writers
    mlflow.set_experiment("runguard-eval")


def genai_rows(n: int) -> list[dict]:
    return [{"inputs": {"question": f"question {i}"}, "outputs": f"answer {i}",
             "expectations": {"expected_response": f"answer {i}"}} for i in range(n)]


def genai_judges() -> list:
    polite = make_judge(name="polite", instructions="Is {{ outputs }} a polite answer to {{ inputs }}?", model=JUDGE)
    return [Correctness(model=JUDGE), polite, Guidelines(name="short", guidelines="Be short.", model=JUDGE)]


@scorer
def has_text(outputs) -> bool:  # a code scorer: no LLM call
    return bool(outputs)


def legacy_frame(n: int) -> pd.DataFrame:
    return pd.DataFrame({"inputs": [f"question {i}" for i in range(n)], "answer": [f"answer {i}" for i in range(n)]})


def legacy_metrics(k: int) -> list:
    return [make_genai_metric(name=f"quality{i}", definition="Answer quality.", grading_prompt="5 great, 1 bad.",
                              model=JUDGE, examples=[], greater_is_better=True) for i in range(k)]


def tags_of(run_id: str) -> dict:
    _recording.flush(10)
    return MlflowClient().get_run(run_id).data.tags


def questions_seen(server) -> set[str]:
    return {number for request in server.requests for number in re.findall(r"question (\d+)", json.dumps(request["body"]))}


# -- the estimate, sampling and refusal ---------------------------------------------------------
def test_genai_200_rows_3_judges_is_sampled_to_the_formula_and_stays_under_budget(server):
    result = runguard.guarded_evaluate(None, genai_rows(200), [*genai_judges(), has_text, RegexMatch(pattern="answer")],
                                       max_eval_llm_calls=60)
    keep = math.floor(60 / (3 * (1 + 1)))  # rows x judges x (1 + retries); no model: 0 agent calls
    assert keep == 10
    assert len(result.result_df) == keep
    assert server.count("/chat/completions") == 3 * keep <= 60
    tags = tags_of(result.run_id)
    assert tags["runguard.eval_rows"] == "200" and tags["runguard.eval_metrics"] == "3"
    assert tags["runguard.eval_llm_estimate"] == "1200" and tags["runguard.eval_sampled_rows"] == "10"
    first = questions_seen(server)
    assert len(first) == keep
    server.reset()
    server.default = Reply(content=VERDICT)
    runguard.guarded_evaluate(None, genai_rows(200), genai_judges(), max_eval_llm_calls=60)
    assert questions_seen(server) == first  # a fixed seed: the same rows again


def test_legacy_200_rows_3_metrics_is_sampled_and_never_exceeds_the_budget(server, caplog):
    with caplog.at_level("WARNING", logger="runguard_autolog"):
        result = runguard.guarded_evaluate(None, legacy_frame(200), legacy_metrics(3), predictions="answer",
                                           evaluators="default")
    keep = math.floor(500 / (3 * 2))
    # each sampled row once per metric, plus MLflow's test of every metric on the first row
    assert server.count("/chat/completions") == 3 * keep + 3 <= 500
    assert result.metrics["quality0/v1/mean"] == 5.0
    assert any(f"evaluating {keep} of 200 rows" in r.message and str(SAMPLE_SEED) in r.message for r in caplog.records)
    tags = tags_of(result.run_id)
    assert tags["runguard.eval_sampled_rows"] == str(keep) and tags["runguard.eval_llm_estimate"] == "1200"


def test_over_budget_without_sampling_raises_before_any_request(server):
    with pytest.raises(runguard.RunGuardTripped) as caught:
        runguard.guarded_evaluate(None, genai_rows(200), genai_judges(), max_eval_llm_calls=60,
                                  sample_if_over_budget=False)
    assert caught.value.limit == "max_eval_llm_calls" and caught.value.observed == 1200
    assert server.count() == 0


def test_refused_when_fewer_than_min_rows_would_remain(server):
    with pytest.raises(runguard.RunGuardTripped) as caught:
        runguard.guarded_evaluate(None, legacy_frame(200), legacy_metrics(3), max_eval_llm_calls=50,
                                  predictions="answer", evaluators="default")
    assert "leave 8 rows" in caught.value.reason and "min_rows=10" in caught.value.reason
    assert server.count() == 0


def test_within_budget_runs_everything_and_tags_the_estimate(server):
    result = runguard.guarded_evaluate(None, genai_rows(12), genai_judges()[:1])
    assert len(result.result_df) == 12 and server.count() == 12
    tags = tags_of(result.run_id)
    assert tags["runguard.eval_llm_estimate"] == "24" and "runguard.eval_sampled_rows" not in tags


# -- agents and run-time counting ----------------------------------------------------------------
def make_agent(server, calls_per_row: int):
    client = openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=0)

    def predict_fn(question: str) -> str:
        for step in range(calls_per_row):
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"{question} {step}"}])
        return "an answer"

    return predict_fn


def test_agentic_predict_fn_counts_its_calls_per_row(server):
    rows = [{"inputs": {"question": f"question {i}"}} for i in range(40)]
    polite = make_judge(name="polite", instructions="Is {{ outputs }} a polite answer to {{ inputs }}?", model=JUDGE)
    result = runguard.guarded_evaluate(make_agent(server, 5), rows, [polite], max_eval_llm_calls=84,
                                       agent_calls_per_row_estimate=5)
    keep = math.floor(84 / (1 * 2 + 5))
    assert keep == 12 and len(result.result_df) == keep
    # agent and judge calls per sampled row, plus MLflow's trial prediction on the first row
    assert server.count("/chat/completions") == keep * (5 + 1) + 5 <= 84
    assert runguard.current().calls == keep * 6 + 5  # counted, from MLflow's worker threads too
    assert tags_of(result.run_id)["runguard.eval_llm_estimate"] == str(40 * 7)


def test_a_mid_run_trip_returns_what_was_scored_and_says_what_was_not(server, caplog):
    rows = [{"inputs": {"question": f"question {i}"}} for i in range(10)]
    polite = make_judge(name="polite", instructions="Is {{ outputs }} a polite answer to {{ inputs }}?", model=JUDGE)
    # the estimate (1 agent call a row) fits the budget; the agent really makes 5
    with caplog.at_level("WARNING", logger="runguard_autolog"):
        result = runguard.guarded_evaluate(make_agent(server, 5), rows, [polite], max_eval_llm_calls=30,
                                           agent_calls_per_row_estimate=1)
    assert server.count("/chat/completions") == 30  # the evaluation's call ceiling, exactly
    assert len(result.result_df) == 10
    unscored = int(tags_of(result.run_id)["runguard.eval_rows_unscored"])
    assert 0 < unscored <= 10
    assert any("were not fully scored" in r.message for r in caplog.records)


# -- autolog: direct calls get the same pre-check -------------------------------------------------
def test_autolog_prechecks_a_direct_genai_evaluate(server):
    runguard.autolog(max_eval_llm_calls=60)
    result = mlflow.genai.evaluate(data=genai_rows(200), scorers=genai_judges())
    assert len(result.result_df) == 10
    assert server.count("/chat/completions") == 30
    assert tags_of(result.run_id)["runguard.eval_sampled_rows"] == "10"


@pytest.mark.parametrize("lifted", [math.inf, "none"])
def test_a_lifted_eval_budget_runs_everything_with_every_evaluate(server, lifted):
    runguard.autolog(max_eval_llm_calls=lifted)
    result = mlflow.genai.evaluate(data=genai_rows(12), scorers=genai_judges()[:1])
    assert len(result.result_df) == 12 and server.count("/chat/completions") == 12
    mlflow.evaluate(data=legacy_frame(12), predictions="answer", extra_metrics=legacy_metrics(1), evaluators="default")
    result = runguard.guarded_evaluate(None, genai_rows(12), genai_judges()[:1], max_eval_llm_calls=lifted)
    assert len(result.result_df) == 12
    assert tags_of(result.run_id)["runguard.eval_llm_estimate"] == "24"


def test_autolog_prechecks_a_direct_legacy_evaluate(server):
    runguard.autolog(max_eval_llm_calls=60)
    mlflow.evaluate(data=legacy_frame(200), predictions="answer", extra_metrics=legacy_metrics(3), evaluators="default")
    assert server.count("/chat/completions") == 3 * 10 + 3


def test_judge_429s_trip_and_stop_mlflows_retry_loops(server, caplog):
    """A judge that always gets 429s: MLflow's adapter would try 11 times per call, and its
    harness would retry the scorer 3 more times (44 requests, minutes of backoff)."""
    runguard.autolog(max_consecutive_429s=3)
    server.default = Reply(status=429, headers={"retry-after": "0"})
    with caplog.at_level("INFO", logger="mlflow.genai.evaluation.rate_limiter"):
        result = runguard.guarded_evaluate(None, genai_rows(1), genai_judges()[:1])
    assert server.count() == 3  # the run of 429s tripped; the adapter's retry loop stopped there
    assert len(result.result_df) == 1
    assert not [r for r in caplog.records if "Rate-limited" in r.getMessage()]  # no harness retries


# -- datasets --------------------------------------------------------------------------------------
def test_mlflow_pandas_dataset_is_sampled_as_a_dataset(server):
    dataset = mlflow.data.from_pandas(legacy_frame(200), predictions="answer", name="qa")
    runguard.guarded_evaluate(None, dataset, legacy_metrics(3), max_eval_llm_calls=60, evaluators="default")
    assert server.count("/chat/completions") == 3 * 10 + 3


def test_data_without_a_length_is_a_clear_error(server):
    with pytest.raises(runguard.RunGuardConfigError, match="cannot count the rows"):
        runguard.guarded_evaluate(None, (row for row in genai_rows(3)), genai_judges())
    assert server.count() == 0


def test_genai_evaluation_dataset_is_counted_and_sampled(server):
    from mlflow.genai.datasets import create_dataset

    experiment = mlflow.get_experiment_by_name("runguard-eval")
    dataset = create_dataset(name="qa", experiment_id=[experiment.experiment_id])
    dataset.merge_records(genai_rows(30))
    result = runguard.guarded_evaluate(None, dataset, genai_judges(), max_eval_llm_calls=60)
    assert len(result.result_df) == 10
    assert server.count("/chat/completions") == 30
    assert tags_of(result.run_id)["runguard.eval_rows"] == "30"


def test_traces_as_data_count_only_llm_judges(server):
    """Traces of an earlier run are evaluated as data (a DataFrame from mlflow.search_traces)."""

    @mlflow.trace
    def agent(question: str) -> str:
        return f"answer to {question}"

    for i in range(12):
        agent(f"question {i}")
    mlflow.flush_trace_async_logging()
    traces = mlflow.search_traces()
    assert len(traces) == 12
    result = runguard.guarded_evaluate(None, traces, [genai_judges()[1], has_text])
    assert len(result.result_df) == 12
    assert server.count("/chat/completions") == 12  # one LLM judge per trace; the code scorer costs nothing
