#!/usr/bin/env python
"""What ``runguard report --json`` costs over 10,000 runs, beside MLflow's ``search_runs`` alone.

    python benchmarks/report_scale.py           # about 3 minutes; writes benchmarks/results-report.md
    python benchmarks/report_scale.py --quick   # 2,000 runs, about 1 minute; prints only

A sqlite tracking store in a temp dir is filled with N runs in three experiments, written with
the metrics and tags runguard records on a run (``runguard.calls``, ``runguard.cost_usd``,
``runguard.tripped`` 0/1, and for the 12% that tripped the trip tags and
``runguard.calls_at_trip``), five agents, start times spread over the last 25 days, plus a
few unrelated params and metrics per run as real runs carry. (The runs are written directly, not
by tripping agents: what is measured is reading them back.) Then, in fresh processes, one
after the other and repeated three times in alternating order:

- ``search_runs``: MLflowClient.search_runs over the same experiments and period, paged the same
  way (1,000 runs a page), touching nothing but the page;
- ``report``: ``runguard report --json`` (its ``main()``, output to /dev/null).

Both read the sqlite store directly, and then a real ``mlflow server`` on 127.0.0.1 serving that
store over HTTP. Reported per arm: the median wall time (inside the process, imports excluded)
and the peak RSS of the process (``ru_maxrss``). The report should cost little beyond reading.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith(("RUNGUARD_", "MLFLOW_"))},
    "PYTHONPATH": str(ROOT),
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_MODEL_CATALOG_URI": "",
}
AGENTS = ["planner", "researcher", "coder", "triage", "summarizer"]
LIMITS = ["max_calls", "max_cost_usd", "loop_repeats", "max_output_tokens"]

CHILD = r"""
import json, resource, sys, time, io, contextlib
arm, uri, since = sys.argv[1], sys.argv[2], sys.argv[3]
import mlflow
from mlflow.tracking import MlflowClient  # imported before the clock starts, in both arms
if arm == "report":
    from runguard_autolog.cli import main
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) as out:
        status = main(["report", "--json", "--tracking-uri", uri, "--since", since])
    assert status == 0, status
    runs = json.loads(out.getvalue())["runs"]
else:
    import datetime as dt
    from mlflow.tracking import MlflowClient
    started = time.perf_counter()
    client = MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    start = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=int(since[:-1]))
    runs, token = 0, None
    while True:
        page = client.search_runs(ids, filter_string=f"attributes.start_time >= {int(start.timestamp() * 1000)}",
                                  max_results=1000, page_token=token)
        runs += sum(1 for run in page if "runguard.tripped" in run.data.metrics)
        token = page.token
        if not token:
            break
print(json.dumps({"seconds": time.perf_counter() - started, "runs": runs,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def fill(uri: str, runs: int) -> int:
    """Write ``runs`` runs shaped as runguard records them; returns how many tripped."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = [client.create_experiment(name) for name in ("agents", "nightly-eval", "support-bot")]
    rng = random.Random(7)
    now = int(time.time() * 1000)
    tripped = 0
    for i in range(runs):
        start = now - rng.randrange(25 * 86_400_000)
        agent = AGENTS[i % len(AGENTS)]
        run = client.create_run(experiments[i % 3], start_time=start, run_name=f"{agent}-{i}")
        calls = rng.randrange(1, 60)
        metrics = {"runguard.calls": calls, "runguard.cost_usd": calls * 0.0021, "loss": rng.random(), "steps": calls}
        tags = {"runguard.agent": agent, "team": "ml-platform"}
        is_tripped = rng.random() < 0.12
        metrics["runguard.tripped"] = 1 if is_tripped else 0
        if is_tripped:
            tripped += 1
            limit = LIMITS[rng.randrange(len(LIMITS))]
            metrics["runguard.calls_at_trip"] = calls
            tags.update({"runguard.tripped": f"{limit} hit", "runguard.trip_limit": limit,
                         "runguard.trip_scope": f"run:{run.info.run_id}"})
        client.log_batch(
            run.info.run_id,
            metrics=[Metric(key, float(value), start, 0) for key, value in metrics.items()],
            params=[Param("model", "gpt-4o-mini"), Param("temperature", "0.2")],
            tags=[RunTag(key, value) for key, value in tags.items()],
        )
        client.set_terminated(run.info.run_id, end_time=start + 60_000)
    return tripped


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(arm: str, uri: str) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, arm, uri, "30d"], capture_output=True, text=True,
                            env=ENV, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"{arm} failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def rounds(uri: str, expected: int) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {"search_runs": [], "report": []}
    for round_ in range(3):
        order = ["search_runs", "report"] if round_ % 2 == 0 else ["report", "search_runs"]
        for arm in order:
            sample = measure(arm, uri)
            assert sample["runs"] == expected, (arm, sample)
            results[arm].append(sample)
            print(f"  {arm}: {sample['seconds']:.2f} s, {sample['peak_mib']:.0f} MiB", file=sys.stderr)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    runs = 2_000 if args.quick else 10_000
    os.environ.update({k: v for k, v in ENV.items() if k.startswith(("MLFLOW_", "DO_NOT"))})
    begun = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        uri = f"sqlite:///{directory}/mlflow.db"
        print(f"writing {runs:,} runs ...", file=sys.stderr)
        fill_started = time.perf_counter()
        tripped = fill(uri, runs)
        fill_seconds = time.perf_counter() - fill_started
        print("sqlite:", file=sys.stderr)
        sqlite = rounds(uri, runs)
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", uri, "--default-artifact-root", f"{directory}/artifacts", "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
        )
        try:
            import urllib.request

            for _ in range(600):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                    break
                except OSError:
                    time.sleep(0.1)
            print("mlflow server:", file=sys.stderr)
            served = rounds(f"http://127.0.0.1:{port}", runs)
        finally:
            server.terminate()
            server.wait(30)
    import mlflow

    seconds = time.perf_counter() - begun
    command = "python benchmarks/report_scale.py" + (" --quick" if args.quick else "")
    lines = [
        "# `runguard report` over many runs", "",
        f"{datetime.date.today().isoformat()}; Python {platform.python_version()}, MLflow {mlflow.__version__}; "
        f"{os.cpu_count()} CPUs. `{command}` took {seconds:.0f} s ({fill_seconds:.0f} s of it writing the runs). "
        f"{runs:,} runs in three experiments ({tripped:,} tripped), all inside the report's default 30 days. "
        "Medians of three fresh processes per arm; time measured inside the process (imports excluded); "
        "peak RSS is the whole process's.", "",
        "| store | arm | wall time (s) | peak RSS (MiB) |", "|---|---|---|---|",
    ]
    for label, results in (("sqlite", sqlite), ("mlflow server (HTTP)", served)):
        for arm in ("search_runs", "report"):
            samples = results[arm]
            lines.append(
                f"| {label} | {'`search_runs` alone' if arm == 'search_runs' else '`runguard report --json`'} | "
                f"{statistics.median(s['seconds'] for s in samples):.2f} | "
                f"{statistics.median(s['peak_mib'] for s in samples):.0f} |"
            )
        ratio = statistics.median(s["seconds"] for s in results["report"]) / statistics.median(
            s["seconds"] for s in results["search_runs"]
        )
        lines.append(f"| {label} | report / search_runs | {ratio:.2f}x | |")
    lines.append("")
    report = "\n".join(lines)
    print(report)
    if not args.quick:
        (HERE / "results-report.md").write_text(report)



if __name__ == "__main__":
    main()
