"""The trip report: how often runs trip, at how many calls, on which ceilings, for which agents.

``runguard report`` reads runs from an MLflow tracking store (sqlite, a file store or an
``mlflow server`` over HTTP) with ``search_runs``, page by page, and folds each page into
running totals, so memory holds the totals and one page, not every run (an experiment may hold
100,000 runs). The totals grow with the agents: runs without an agent tag are grouped by run
name, and MLflow's generated names are unique, so name the agent (``autolog(agent=…)``). Run
artifacts are never read. A run counts when runguard recorded it: it made a guarded call (the
run-end metric ``runguard.tripped``, 0 or 1) or it tripped (the tag ``runguard.tripped``). Per
run it reads the tags ``runguard.trip_limit`` and ``runguard.agent`` and the metrics
``runguard.calls_at_trip``, ``runguard.calls`` and ``runguard.cost_usd``.

Percentiles of calls at trip are nearest-rank (p50 of 1, 2, 3, 10 is 2): always a value some
run had. Days are UTC days of the run's start time.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ._config import redact
from ._recording import METRIC_CALLS_AT_TRIP, METRIC_TRIPPED, TAG_AGENT, TAG_TRIP_LIMIT, TAG_TRIPPED

PAGE_SIZE = 1000  # runs per search_runs page
DEFAULT_SINCE = "30d"
METRIC_CALLS = "runguard.calls"
METRIC_COST = "runguard.cost_usd"
METRIC_COST_AT_TRIP = "runguard.cost_usd_at_trip"
_RELATIVE = re.compile(r"(\d{1,5})([hdw])")
_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^@\s/]*@")  # a password in a URL in a message


class ReportError(Exception):
    """A one-line reason the report cannot be made, and the exit status it means."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def parse_since(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """``7d``, ``24h``, ``2w`` (before now) or a date / date-time in ISO 8601 (UTC unless it says)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    value = text.strip().lower()
    match = _RELATIVE.fullmatch(value)
    if match:
        amount, unit = int(match.group(1)), match.group(2)
        return now - dt.timedelta(hours=amount * {"h": 1, "d": 24, "w": 168}[unit])
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ReportError(
            f"runguard: --since={text!r} is not valid: use a number of hours, days or weeks (24h, 7d, 2w) "
            "or a date (2026-11-01)",
            2,
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)


@dataclass
class _Tally:
    runs: int = 0
    tripped_runs: int = 0
    by_limit: Counter = field(default_factory=Counter)

    def add(self, limit: str | None) -> None:
        self.runs += 1
        if limit is not None:
            self.tripped_runs += 1
            self.by_limit[limit] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "tripped_runs": self.tripped_runs,
            "trip_rate": _rate(self.tripped_runs, self.runs),
            "by_limit": dict(self.by_limit.most_common()),
        }


def _rate(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _percentile(ordered: list[float], fraction: float) -> float:
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


class _Totals:
    """The report's running totals, one run at a time."""

    def __init__(self) -> None:
        self.all = _Tally()
        self.by_day: dict[str, _Tally] = {}
        self.by_experiment: dict[str, _Tally] = {}
        self.by_agent: dict[str, _Tally] = {}
        self.calls_at_trip: list[float] = []
        self.cost_total = 0.0
        self.cost_tripped = 0.0

    def add(self, run: Any) -> None:
        metrics, tags = run.data.metrics, run.data.tags
        if METRIC_TRIPPED not in metrics and TAG_TRIPPED not in tags:
            return  # runguard never saw a guarded call in this run
        tripped = TAG_TRIPPED in tags or metrics.get(METRIC_TRIPPED) == 1
        limit = (tags.get(TAG_TRIP_LIMIT) or "unknown") if tripped else None
        cost = metrics.get(METRIC_COST, metrics.get(METRIC_COST_AT_TRIP, 0.0))
        self.all.add(limit)
        day = dt.datetime.fromtimestamp((run.info.start_time or 0) / 1000, dt.timezone.utc).date().isoformat()
        self.by_day.setdefault(day, _Tally()).add(limit)
        self.by_experiment.setdefault(run.info.experiment_id, _Tally()).add(limit)
        agent = tags.get(TAG_AGENT) or run.info.run_name or tags.get("mlflow.runName") or run.info.run_id
        self.by_agent.setdefault(agent, _Tally()).add(limit)
        self.cost_total += cost
        if tripped:
            self.cost_tripped += cost
            calls = metrics.get(METRIC_CALLS_AT_TRIP, metrics.get(METRIC_CALLS))
            if calls is not None:
                self.calls_at_trip.append(calls)

    def report(self, names: dict[str, str], since: dt.datetime, uri: str) -> dict[str, Any]:
        ordered = sorted(self.calls_at_trip)
        calls_at_trip: dict[str, Any] = {"min": None, "p50": None, "p90": None, "max": None, "runs": len(ordered)}
        if ordered:
            calls_at_trip.update(
                min=_number(ordered[0]),
                p50=_number(_percentile(ordered, 0.5)),
                p90=_number(_percentile(ordered, 0.9)),
                max=_number(ordered[-1]),
            )
        calls_at_trip["histogram"] = [{"calls": _number(v), "runs": n} for v, n in sorted(Counter(ordered).items())]
        by_rank = sorted(self.by_agent.items(), key=lambda item: (-item[1].tripped_runs, -item[1].runs, item[0]))
        return {
            "tracking_uri": redact(uri),
            "since": since.isoformat(),
            "experiments": sorted(names.values()),
            **self.all.as_dict(),
            "calls_at_trip": calls_at_trip,
            "cost_usd": {"total": self.cost_total, "tripped_runs": self.cost_tripped},
            "by_day": [
                {
                    "date": day,
                    "runs": t.runs,
                    "tripped_runs": t.tripped_runs,
                    "trip_rate": _rate(t.tripped_runs, t.runs),
                }
                for day, t in sorted(self.by_day.items())
            ],
            "by_experiment": [
                {"experiment": names.get(eid, eid), "experiment_id": eid, **t.as_dict()}
                for eid, t in sorted(self.by_experiment.items(), key=lambda item: names.get(item[0], item[0]))
            ],
            "by_agent": [{"agent": agent, **t.as_dict()} for agent, t in by_rank],
        }


def _experiments(client: Any, wanted: list[str]) -> dict[str, str]:
    """{id: name} of the named experiments (by name or id), else of every active one."""
    from mlflow.exceptions import MlflowException

    if not wanted:
        found: dict[str, str] = {}
        token = None
        while True:
            page = client.search_experiments(max_results=1000, page_token=token)
            found.update((e.experiment_id, e.name) for e in page)
            token = page.token
            if not token:
                return found
    chosen: dict[str, str] = {}
    for key in wanted:
        experiment = client.get_experiment_by_name(key)
        if experiment is None and key.isdigit():
            try:
                experiment = client.get_experiment(key)
            except MlflowException as error:
                if getattr(error, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                    raise
                experiment = None
        if experiment is None:
            raise ReportError(f"runguard: no experiment named {key!r} (nor with that id) in the tracking store", 2)
        chosen[experiment.experiment_id] = experiment.name
    return chosen


def build(
    experiments: list[str] | None = None, since: str = DEFAULT_SINCE, tracking_uri: str | None = None
) -> dict[str, Any]:
    """The trip report as a JSON-ready dict (see the module docstring). Raises ``ReportError``."""
    import mlflow
    from mlflow.tracking import MlflowClient

    start = parse_since(since)
    uri = tracking_uri or mlflow.get_tracking_uri()
    try:
        client = MlflowClient(tracking_uri=uri)
        names = _experiments(client, list(experiments or []))
        totals = _Totals()
        ids = sorted(names)
        for first in range(0, len(ids), 100):  # search_runs takes a bounded list of experiments
            token = None
            while True:
                page = client.search_runs(
                    ids[first : first + 100],
                    filter_string=f"attributes.start_time >= {int(start.timestamp() * 1000)}",
                    max_results=PAGE_SIZE,
                    page_token=token,
                )
                for run in page:
                    totals.add(run)
                token = page.token
                if not token:
                    break
    except ReportError:
        raise
    except Exception as error:
        message = _CREDENTIALS.sub(r"\1***@", " ".join(str(error).split()))[:300]
        raise ReportError(
            f"runguard: could not read runs from {redact(uri)}: {type(error).__name__}: {message}", 1
        ) from None
    return totals.report(names, start, uri)


# -- for people ---------------------------------------------------------------------------------
def table(report: dict[str, Any]) -> str:
    """The report as text: totals, ceilings hit, agents, days."""
    calls = report["calls_at_trip"]
    lines = [
        (
            f"runguard trip report: {report['tracking_uri']}, runs since {report['since'][:10]}, "
            f"{len(report['experiments'])} experiment(s)"
        ),
        "",
        (
            f"runs {report['runs']}   tripped {report['tripped_runs']}   trip rate {report['trip_rate']:.1%}   "
            f"cost {report['cost_usd']['total']:.4g} USD ({report['cost_usd']['tripped_runs']:.4g} in tripped runs)"
        ),
    ]
    if calls["runs"]:
        lines.append(f"calls at trip: min {calls['min']}  p50 {calls['p50']}  p90 {calls['p90']}  max {calls['max']}")
    if not report["runs"]:
        lines += ["", "no run with a guarded call in this period"]
        return "\n".join(lines)
    if report["by_limit"]:
        lines += ["", _columns(["ceiling", "tripped runs"], list(report["by_limit"].items()))]
    lines += [
        "",
        _columns(
            ["agent", "runs", "tripped", "rate", "ceilings"],
            [
                (row["agent"], row["runs"], row["tripped_runs"], f"{row['trip_rate']:.0%}", _limits(row["by_limit"]))
                for row in report["by_agent"][:20]
            ],
        ),
        "",
        _columns(
            ["day", "runs", "tripped", "rate"],
            [(d["date"], d["runs"], d["tripped_runs"], f"{d['trip_rate']:.0%}") for d in report["by_day"]],
        ),
    ]
    return "\n".join(lines)


def _limits(by_limit: dict[str, int]) -> str:
    return ", ".join(f"{limit} {count}" for limit, count in by_limit.items()) or "-"


def _columns(header: list[str], rows: list[tuple]) -> str:
    cells = [header, *[[str(cell) for cell in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells)


# -- pictures -----------------------------------------------------------------------------------
def png(report: dict[str, Any]) -> bytes:
    """Four panels: trip rate per day, calls at trip, runs per ceiling, agents (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(12, 8), dpi=100, layout="constrained")
    rate, calls, limits, agents = figure.subplots(2, 2).flatten()
    days = report["by_day"]
    figure.suptitle(f"runguard trips: {report['tripped_runs']} of {report['runs']} runs since {report['since'][:10]}")
    if days:
        labels = [d["date"][5:] for d in days]
        rate.bar(labels, [100 * d["trip_rate"] for d in days], color="#d62728")
        rate.tick_params(axis="x", labelrotation=45)
    rate.set(title="trip rate per day (%)", ylabel="% of runs tripped")
    values = report["calls_at_trip"]
    if values["runs"]:
        histogram = values["histogram"]
        if len(histogram) <= 40:  # one bar per number of calls
            calls.bar([row["calls"] for row in histogram], [row["runs"] for row in histogram], color="#1f77b4")
        else:
            calls.hist(
                [row["calls"] for row in histogram],
                weights=[row["runs"] for row in histogram],
                bins=20,
                color="#1f77b4",
            )
    calls.set(title="calls at trip", xlabel="guarded calls when the run tripped", ylabel="runs")
    by_limit = report["by_limit"]
    if by_limit:
        limits.barh(list(by_limit)[::-1], list(by_limit.values())[::-1], color="#ff7f0e")
    limits.set(title="ceilings hit", xlabel="tripped runs")
    top = report["by_agent"][:12][::-1]
    if top:
        names = [row["agent"][:28] for row in top]
        tripped = [row["tripped_runs"] for row in top]
        agents.barh(names, [row["runs"] - t for row, t in zip(top, tripped)], color="#2ca02c", label="not tripped")
        agents.barh(
            names, tripped, left=[row["runs"] - t for row, t in zip(top, tripped)], color="#d62728", label="tripped"
        )
        agents.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=2, frameon=False)
    agents.set(title="runs by agent", xlabel="runs")
    for panel in (rate, calls, limits, agents):
        axis = panel.xaxis if panel in (limits, agents) else panel.yaxis
        axis.set_major_locator(MaxNLocator(integer=panel is not rate))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def html_page(report: dict[str, Any]) -> str:
    """One self-contained page: the pictures embedded, and the table."""
    picture = base64.b64encode(png(report)).decode("ascii")
    text = html.escape(table(report))
    title = f"runguard trip report ({html.escape(report['since'][:10])} onwards)"
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{title}</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1250px}"
        "pre{background:#f6f8fa;padding:1em;overflow:auto}img{max-width:100%}</style></head>\n<body>"
        f'<h1>{title}</h1>\n<img alt="trip rate per day, calls at trip, ceilings hit, runs by agent" '
        f'src="data:image/png;base64,{picture}">\n<pre>{text}</pre>\n</body></html>\n'
    )
