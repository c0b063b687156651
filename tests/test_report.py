"""``runguard report`` and ``runguard status``: runs made by tripping real agents (the openai SDK
against the loopback fake server, runguard recording into a real MLflow store: sqlite in a temp
dir, a file store, a real ``mlflow server`` on 127.0.0.1), read back by the command as a user
runs it. JSON numbers are checked exactly against what the agents were built to do.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import re
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import mlflow
import openai
import pytest
from mlflow.tracking import MlflowClient

import runguard_autolog as runguard
from runguard_autolog import _recording, _report
from runguard_autolog.testing import Reply

from ._servers import free_port, start_tracking_server
from .conftest import MESSAGES, MODEL
from .test_shared import name, redis_url  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parent.parent
# gpt-4o-mini: 0.15 / 0.60 USD per million input / output tokens
PLAIN_CALL_USD = (10 * 0.15 + 1 * 0.60) / 1e6  # the fake server's default reply: 10 in, "ok" = 1 out
WORDY_CALL_USD = (10 * 0.15 + 10 * 0.60) / 1e6  # Reply(usage=(10, 10))
DAY_MS = 86_400_000


def cli(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("RUNGUARD_", "MLFLOW_TRACKING_URI"))}
    environ.update(PYTHONPATH=str(ROOT), MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true", **env)
    return subprocess.run(
        [sys.executable, "-m", "runguard_autolog", *args], capture_output=True, text=True, env=environ, timeout=timeout
    )


def agent_run(client: openai.OpenAI, run_name: str, calls: int, start_time: int | None = None) -> None:
    """One MLflow run of an agent that makes up to ``calls`` calls and stops at a trip."""
    run_id = None
    if start_time is not None:  # a run that began days ago (MLflow lets a client back-date it)
        experiment_id = mlflow.tracking.fluent._get_experiment_id()
        run_id = MlflowClient().create_run(experiment_id, start_time=start_time, run_name=run_name).info.run_id
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name):
        for _ in range(calls):
            try:
                client.chat.completions.create(model=MODEL, messages=MESSAGES)
            except runguard.RunGuardTripped:
                break


@pytest.fixture
def fleet(tmp_path, server, client) -> str:
    """Runs of three agents in two experiments, tripped as the limits say, in a sqlite store."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    now = int(time.time() * 1000)
    mlflow.set_experiment("agents")
    runguard.autolog(agent="planner", max_calls=3)
    agent_run(client, "p1", 5)  # trips at 3 calls
    agent_run(client, "p2", 2)
    agent_run(client, "p3", 9)  # trips at 3 calls
    server.default = Reply(usage=(10, 10))
    runguard.autolog(agent="researcher", max_calls="none", max_output_tokens=25)
    agent_run(client, "r1", 5)  # 10 output tokens a call: trips after the 3rd
    agent_run(client, "r2", 1)
    server.default = Reply()
    mlflow.set_experiment("nightly")
    runguard.autolog(max_calls=2)  # no agent name: grouped by run name
    agent_run(client, "nightly-1", 4)  # trips at 2
    agent_run(client, "nightly-2", 1)
    agent_run(client, "nightly-old", 3, start_time=now - 3 * DAY_MS)  # trips at 2, three days ago
    agent_run(client, "nightly-ancient", 3, start_time=now - 40 * DAY_MS)  # outside the default 30 days
    with mlflow.start_run(run_name="no-llm"):  # no guarded call: not in the report
        mlflow.log_metric("loss", 0.1)
    runguard.flush()
    runguard.autolog(disable=True)
    mlflow.set_tracking_uri(None)
    return uri


def today(offset_days: int = 0) -> str:
    return (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=offset_days)).date().isoformat()


def test_report_json_numbers_are_exact(fleet, server):
    assert server.count() == 3 + 2 + 3 + 3 + 1 + 2 + 1 + 2 + 2
    result = cli("report", "--json", "--tracking-uri", fleet)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["experiments"] == ["Default", "agents", "nightly"]
    assert (report["runs"], report["tripped_runs"], report["trip_rate"]) == (8, 5, 5 / 8)
    assert report["by_limit"] == {"max_calls": 4, "max_output_tokens": 1}
    calls = report["calls_at_trip"]
    assert (calls["min"], calls["p50"], calls["p90"], calls["max"], calls["runs"]) == (2, 3, 3, 3, 5)
    assert calls["histogram"] == [{"calls": 2, "runs": 2}, {"calls": 3, "runs": 3}]
    plain, wordy = PLAIN_CALL_USD, WORDY_CALL_USD
    # exact up to float summation order
    assert report["cost_usd"]["total"] == pytest.approx((3 + 2 + 3 + 2 + 1 + 2) * plain + (3 + 1) * wordy, rel=1e-12)
    assert report["cost_usd"]["tripped_runs"] == pytest.approx((3 + 3 + 2 + 2) * plain + 3 * wordy, rel=1e-12)
    assert report["by_day"] == [
        {"date": today(3), "runs": 1, "tripped_runs": 1, "trip_rate": 1.0},
        {"date": today(), "runs": 7, "tripped_runs": 4, "trip_rate": 4 / 7},
    ]
    assert [(e["experiment"], e["runs"], e["tripped_runs"], e["by_limit"]) for e in report["by_experiment"]] == [
        ("agents", 5, 3, {"max_calls": 2, "max_output_tokens": 1}),
        ("nightly", 3, 2, {"max_calls": 2}),
    ]
    assert [(a["agent"], a["runs"], a["tripped_runs"], a["by_limit"]) for a in report["by_agent"]] == [
        ("planner", 3, 2, {"max_calls": 2}),
        ("researcher", 2, 1, {"max_output_tokens": 1}),
        ("nightly-1", 1, 1, {"max_calls": 1}),
        ("nightly-old", 1, 1, {"max_calls": 1}),
        ("nightly-2", 1, 0, {}),
    ]


def test_report_filters_by_experiment_and_since(fleet):
    only = json.loads(cli("report", "--json", "--tracking-uri", fleet, "--experiment", "agents").stdout)
    assert (only["experiments"], only["runs"], only["tripped_runs"]) == (["agents"], 5, 3)
    experiment_id = MlflowClient(fleet).get_experiment_by_name("nightly").experiment_id
    by_id = json.loads(cli("report", "--json", "--tracking-uri", fleet, "--experiment", experiment_id).stdout)
    assert (by_id["experiments"], by_id["runs"]) == (["nightly"], 3)
    longer = json.loads(cli("report", "--json", "--tracking-uri", fleet, "--since", "60d").stdout)
    assert (longer["runs"], longer["tripped_runs"]) == (9, 6)
    recent = json.loads(cli("report", "--json", "--tracking-uri", fleet, "--since", "2d").stdout)
    assert (recent["runs"], recent["by_day"][0]["date"]) == (7, today())
    dated = json.loads(cli("report", "--json", "--tracking-uri", fleet, "--since", today(35)).stdout)
    assert dated["runs"] == 8


def test_paging_reads_every_run_once_and_no_artifact(fleet, monkeypatch):
    whole = _report.build(tracking_uri=fleet)
    pages: list[tuple[int, bool]] = []
    search_runs = MlflowClient.search_runs

    def counted(self, *args, **kwargs):
        page = search_runs(self, *args, **kwargs)
        pages.append((len(page), kwargs.get("page_token") is not None))
        return page

    def no_artifacts(*args, **kwargs):
        raise AssertionError("the report read a run's artifacts")

    monkeypatch.setattr(MlflowClient, "search_runs", counted)
    for reader in ("list_artifacts", "download_artifacts"):
        monkeypatch.setattr(MlflowClient, reader, no_artifacts)
    monkeypatch.setattr(_report, "PAGE_SIZE", 2)  # 8 runs, 3 experiments: several pages
    paged = _report.build(tracking_uri=fleet)
    assert {k: v for k, v in paged.items() if k != "since"} == {k: v for k, v in whole.items() if k != "since"}
    assert paged["runs"] == 8
    assert len(pages) >= 5 and all(size <= 2 for size, _ in pages)  # 10 runs in range (2 without a call)
    assert [followed for _, followed in pages].count(True) == len(pages) - 1  # each later page by its token


def test_calls_at_trip_percentiles_are_nearest_rank():
    assert _report._percentile([1, 2, 3, 10], 0.5) == 2
    assert _report._percentile(list(range(1, 11)), 0.9) == 9
    assert _report._percentile([4], 0.9) == 4


def test_report_table_for_people(fleet):
    result = cli("report", "--tracking-uri", fleet)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "runs 8   tripped 5   trip rate 62.5%" in text
    assert "calls at trip: min 2  p50 3  p90 3  max 3" in text
    assert re.search(r"^planner\s+3\s+2\s+67%\s+max_calls 2$", text, re.MULTILINE)
    assert re.search(r"^max_output_tokens\s+1$", text, re.MULTILINE)


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _check_png(data: bytes) -> None:
    import matplotlib.image

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(io.BytesIO(data), format="png")
    assert pixels.shape[:2] == (800, 1200)
    assert pixels[..., :3].std() > 0.05  # not a blank canvas
    reds = ((pixels[..., 0] > 0.7) & (pixels[..., 1] < 0.3) & (pixels[..., 2] < 0.3)).sum()
    assert reds > 1000  # the tripped bars are drawn


def test_plot_and_html_are_valid_and_carry_the_report(fleet, tmp_path):
    picture, page = tmp_path / "trips.png", tmp_path / "trips.html"
    result = cli("report", "--tracking-uri", fleet, "--plot", str(picture), "--html", str(page))
    assert result.returncode == 0, result.stderr
    _check_png(picture.read_bytes())
    parser = _Page()
    parser.feed(page.read_text(encoding="utf-8"))
    assert len(parser.images) == 1 and parser.images[0].startswith("data:image/png;base64,")
    import base64

    _check_png(base64.b64decode(parser.images[0].split(",", 1)[1]))
    text = "".join(parser.text)
    assert "runs 8   tripped 5" in text and "planner" in text
    assert "http" not in page.read_text().split("<body>", 1)[1].replace("http-equiv", "")  # self-contained


def test_a_real_mlflow_server_and_a_file_store(tmp_path, server, client, monkeypatch):
    process, port = start_tracking_server(tmp_path)
    try:
        uri = f"http://127.0.0.1:{port}"
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("served")
        runguard.autolog(agent="server-agent", max_calls=2)
        agent_run(client, "a", 5)
        agent_run(client, "b", 1)
        runguard.flush()
        mlflow.set_tracking_uri(None)
        result = cli("report", "--json", "--tracking-uri", uri, "--experiment", "served")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert (report["runs"], report["tripped_runs"], report["by_limit"]) == (2, 1, {"max_calls": 1})
        assert report["by_agent"][0]["agent"] == "server-agent"
        assert report["calls_at_trip"]["max"] == 2
    finally:
        process.stop()
    store = f"file://{tmp_path}/mlruns"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    mlflow.set_tracking_uri(store)
    mlflow.set_experiment("files")
    agent_run(client, "c", 4)
    runguard.flush()
    mlflow.set_tracking_uri(None)
    report = json.loads(cli("report", "--json", "--tracking-uri", store).stdout)
    assert (report["runs"], report["tripped_runs"], report["by_agent"][0]["agent"]) == (1, 1, "server-agent")


def test_bad_input_is_one_line_and_a_documented_exit_status(fleet, tmp_path):
    unknown = cli("report", "--tracking-uri", fleet, "--experiment", "no-such-experiment")
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == (
        "runguard: no experiment named 'no-such-experiment' (nor with that id) in the tracking store"
    )
    since = cli("report", "--tracking-uri", fleet, "--since", "last tuesday")
    assert since.returncode == 2 and len(since.stderr.strip().splitlines()) == 1
    assert "--since='last tuesday' is not valid" in since.stderr
    started = time.monotonic()
    down = cli("report", "--tracking-uri", f"http://user:hunter2@127.0.0.1:{free_port()}", timeout=60)
    assert time.monotonic() - started < 30  # bounded retries: seconds, not minutes
    assert down.returncode == 1
    assert len(down.stderr.strip().splitlines()) == 1 and "Traceback" not in down.stderr
    assert down.stderr.startswith("runguard: could not read runs from http://user:***@127.0.0.1:")
    assert "hunter2" not in down.stderr
    empty_store = f"sqlite:///{tmp_path}/empty.db"
    empty = cli("report", "--json", "--tracking-uri", empty_store)
    assert empty.returncode == 0, empty.stderr
    report = json.loads(empty.stdout)
    assert (report["runs"], report["trip_rate"], report["by_agent"], report["calls_at_trip"]["p50"]) == (0, 0.0, [], None)
    assert "no run with a guarded call" in cli("report", "--tracking-uri", empty_store).stdout
    unwritable = cli("report", "--tracking-uri", fleet, "--plot", str(tmp_path / "missing" / "x.png"))
    assert unwritable.returncode == 2 and unwritable.stderr.startswith("runguard: could not write")
    assert cli("report", "--bogus").returncode == 64


def test_every_guarded_run_carries_the_tripped_metric_and_the_agent_tag(fleet):
    runs = MlflowClient(fleet).search_runs(
        [e.experiment_id for e in MlflowClient(fleet).search_experiments()], max_results=100
    )
    guarded = {run.info.run_name: run for run in runs if "runguard.tripped" in run.data.metrics}
    assert set(guarded) == {"p1", "p2", "p3", "r1", "r2", "nightly-1", "nightly-2", "nightly-old", "nightly-ancient"}
    assert {name: run.data.metrics["runguard.tripped"] for name, run in guarded.items() if name[0] == "p"} == {
        "p1": 1.0, "p2": 0.0, "p3": 1.0
    }
    assert guarded["p2"].data.tags["runguard.agent"] == "planner"
    assert "runguard.agent" not in guarded["nightly-1"].data.tags
    assert not [run for run in runs if run.info.run_name == "no-llm" and "runguard.calls" in run.data.metrics]


def test_a_trip_inside_a_run_makes_its_metric_1_whichever_scope_tripped(tracking, client, monkeypatch):
    """A session's trip inside a run tags the run: its runguard.tripped metric says 1 too, so a
    chart of the metric and the report agree. RUNGUARD_AGENT names the agent like agent=."""
    monkeypatch.setenv("RUNGUARD_AGENT", "envbot")
    runguard.autolog(max_calls="none")
    with mlflow.start_run(run_name="session-trip") as run:
        with pytest.raises(runguard.RunGuardTripped), runguard.session("step", max_calls=2):
            for _ in range(3):
                client.chat.completions.create(model=MODEL, messages=MESSAGES)
    with mlflow.start_run(run_name="fine") as fine:
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    runguard.flush()
    data = mlflow.get_run(run.info.run_id).data
    assert data.tags["runguard.trip_scope"] == "session:step" and data.metrics["runguard.tripped"] == 1
    assert data.metrics["runguard.calls"] == 2 and data.tags["runguard.agent"] == "envbot"
    assert mlflow.get_run(fine.info.run_id).data.metrics["runguard.tripped"] == 0
    report = json.loads(cli("report", "--json", "--tracking-uri", mlflow.get_tracking_uri()).stdout)
    assert (report["runs"], report["tripped_runs"]) == (2, 1)
    assert [(a["agent"], a["runs"], a["tripped_runs"]) for a in report["by_agent"]] == [("envbot", 2, 1)]


@pytest.mark.parametrize("settled_by", ["writer", "next reserve"])
def test_shared_budget_trips_mark_the_run_even_when_found_late_or_already_open(tracking, client, server, redis_url,
                                                                              name, settled_by):
    """A shared trip found when the run's last call settles (by the store's writer after the run
    ended, or carried by the next call's reserve), and a later run whose every call the open
    circuit refused: both runs say tripped, in their tags and in runguard.tripped."""
    server.default = Reply(content=" ".join(["w"] * 50))
    runguard.autolog(store=redis_url, shared_budget=name, shared_max_output_tokens=5, max_calls="none")
    with mlflow.start_run(run_name="late") as late:
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    if settled_by == "writer":
        assert runguard.flush()  # the settle that trips the budget lands now, not with the next reserve
    with mlflow.start_run(run_name="refused") as refused:
        for _ in range(2):
            with pytest.raises(runguard.RunGuardTripped):
                client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert runguard.flush()
    runguard.reset_shared(name)
    _recording.flush(10)
    for run, calls in ((late, 1), (refused, 0)):
        data = mlflow.get_run(run.info.run_id).data
        assert data.tags.get("runguard.trip_scope") == f"shared:{name}", (run.info.run_name, data)
        assert data.metrics["runguard.tripped"] == 1 and data.metrics["runguard.calls"] == calls
    assert mlflow.get_run(late.info.run_id).data.metrics["runguard.calls_at_trip"] == 1  # the run that crossed it
    assert server.count() == 1


def _shared_writer_stopped() -> None:
    import threading

    from runguard_autolog import _runtime

    _runtime.RUNTIME.store.client.close()
    for thread in threading.enumerate():
        if thread.name == "runguard-shared-budget":
            thread.join(5)
            assert not thread.is_alive()


def test_the_run_whose_usage_tripped_a_shared_budget_carries_the_trip(tracking, client, server, redis_url, name,
                                                                       monkeypatch):
    """Settles carried by a later call's reserve: the trip goes to the run of the call whose usage
    crossed the ceiling, not to the run of the last settle carried, nor to the refused call's."""
    from runguard_autolog import _shared

    monkeypatch.setattr(_shared, "SETTLE_DELAY_S", 1.0)  # the next reserve carries what is queued
    server.default = Reply(content=" ".join(["w"] * 50))
    runguard.autolog(store=redis_url, shared_budget=name, shared_max_output_tokens=5, max_calls="none")
    with mlflow.start_run(run_name="crossed") as crossed:
        stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, max_tokens=2)
        client.chat.completions.create(model=MODEL, messages=MESSAGES)  # 50 output tokens: over 5
    with mlflow.start_run(run_name="other") as other:
        assert len(list(stream)) > 1  # 2 more output tokens, settled after the crossing ones
        with pytest.raises(runguard.RunGuardTripped):  # its reserve carries both settles: refused
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
    assert runguard.flush()
    _recording.flush(10)
    runguard.reset_shared(name)
    _shared_writer_stopped()  # its 1 s sleep would outlive the test
    tags = {run.info.run_name: mlflow.get_run(run.info.run_id).data for run in (crossed, other)}
    assert tags["crossed"].tags["runguard.trip_scope"] == f"shared:{name}"
    assert tags["crossed"].metrics["runguard.calls_at_trip"] == 1  # its own call, the one that crossed
    assert tags["other"].tags["runguard.trip_scope"] == f"shared:{name}"  # refused by the open circuit
    assert "runguard.calls_at_trip" not in tags["other"].metrics
    assert server.count() == 2


def test_a_call_refused_for_its_own_forecast_leaves_the_run_untripped(tracking, client):
    runguard.autolog(max_output_tokens=1000, max_calls="none")
    with mlflow.start_run() as run:
        with pytest.raises(runguard.RunGuardTripped):
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5000)
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    _recording.flush(10)
    data = mlflow.get_run(run.info.run_id).data
    assert data.metrics["runguard.tripped"] == 0 and "runguard.tripped" not in data.tags


def test_several_experiments_and_the_tracking_uri_from_the_environment(fleet):
    result = cli("report", "--json", "--experiment", "agents", "--experiment", "nightly", MLFLOW_TRACKING_URI=fleet)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["experiments"] == ["agents", "nightly"]
    assert (report["runs"], report["tripped_runs"]) == (8, 5)


def test_bad_agent_names_are_refused(monkeypatch):
    with pytest.raises(runguard.RunGuardConfigError, match="agent='' is not valid"):
        runguard.autolog(agent="")
    monkeypatch.setenv("RUNGUARD_AGENT", "bad\nname")
    with pytest.raises(runguard.RunGuardConfigError, match="RUNGUARD_AGENT="):
        runguard.autolog()
    monkeypatch.delenv("RUNGUARD_AGENT")
    assert json.loads(cli("config", "--json", RUNGUARD_AGENT="triage-bot").stdout)["settings"]["agent"] == {
        "value": "triage-bot",
        "source": "environment",
    }


def test_since_parsing():
    now = dt.datetime(2026, 12, 6, 12, tzinfo=dt.timezone.utc)
    assert _report.parse_since("7d", now) == now - dt.timedelta(days=7)
    assert _report.parse_since("24h", now) == now - dt.timedelta(hours=24)
    assert _report.parse_since("2w", now) == now - dt.timedelta(days=14)
    assert _report.parse_since("2026-11-01", now) == dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    for bad in ("", "7", "d7", "-3d", "yesterday", "2026-13-01"):
        with pytest.raises(_report.ReportError):
            _report.parse_since(bad, now)


# -- runguard status --shared ---------------------------------------------------------------------
def test_status_shows_a_shared_budgets_counters_limits_window_and_trip(client, server, redis_url, name):
    runguard.autolog(store=redis_url, shared_budget=name, shared_max_calls=2, shared_window="hour",
                     max_calls="none")
    results = []
    for _ in range(3):
        try:
            client.chat.completions.create(model=MODEL, messages=MESSAGES)
            results.append("ok")
        except runguard.RunGuardTripped as error:
            results.append(error.limit)
    assert results == ["ok", "ok", "shared_max_calls"]
    runguard.flush()
    result = cli("status", "--shared", name, "--store", redis_url, "--json")
    assert result.returncode == 0, result.stderr
    state = json.loads(result.stdout)
    now = int(time.time())
    assert state["budget"] == name and state["scope"] == f"shared:{name}"
    assert (state["calls"], state["requests"], state["in_flight"]) == (2, 2, 0)
    assert state["limits"] == {"shared_max_calls": 2}
    assert (state["window_s"], state["window_start"]) == (3600, now - now % 3600)
    assert state["tripped"]["limit"] == "shared_max_calls" and state["tripped"]["threshold"] == 2
    text = cli("status", "--shared", name, "--store", redis_url).stdout
    assert "limits: shared_max_calls=2" in text and "tripped: shared_max_calls" in text
    unknown = json.loads(cli("status", "--shared", f"{name}-never-used", "--json", RUNGUARD_STORE=redis_url).stdout)
    assert (unknown["calls"], unknown["limits"], unknown["tripped"]) == (0, {}, None)
    no_store = cli("status", "--shared", name)
    assert no_store.returncode == 2 and "RUNGUARD_STORE" in no_store.stderr
    down = cli("status", "--shared", name, "--store", f"redis://:secret@127.0.0.1:{free_port()}/0")
    assert down.returncode == 1 and "secret" not in down.stderr and "Traceback" not in down.stderr
