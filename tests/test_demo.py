"""``runguard demo``: the main job on an embedded default, end to end in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from mlflow.tracking import MlflowClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_demo(tmp_path, *args: str) -> str:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("RUNGUARD_", "MLFLOW_TRACKING"))}
    environ["PYTHONPATH"] = REPO
    result = subprocess.run(
        [sys.executable, "-m", "runguard_autolog", "demo", "--dir", str(tmp_path), *args],
        env=environ, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def run_data(tmp_path, out: str):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert f"mlflow ui --backend-store-uri {uri}" in out
    run_id = re.search(r"MLflow run:\s+(\w+)", out).group(1)
    return MlflowClient(tracking_uri=uri).get_run(run_id).data


def test_demo_trips_the_looping_agent_on_its_loop_and_records_the_run(tmp_path):
    out = run_demo(tmp_path)
    assert "tripped:        tool-call loop: search" in out and "[loop_repeats" in out
    assert "3 reached the provider; call 4 was refused before sending" in out
    assert re.search(r"3,000 calls would have cost about \$[\d,]+\.\d\d", out)
    data = run_data(tmp_path, out)
    assert data.tags["runguard.trip_limit"] == "loop_repeats"
    assert data.metrics["runguard.calls"] == 3


def test_demo_with_a_lower_call_ceiling_trips_on_the_budget(tmp_path):
    out = run_demo(tmp_path, "--max-calls", "2")
    assert "tripped:        call ceiling hit (2/2) [max_calls" in out
    assert "2 reached the provider; call 3 was refused before sending" in out
    data = run_data(tmp_path, out)
    assert data.tags["runguard.tripped"] == "call ceiling hit (2/2)"
    assert data.metrics["runguard.calls"] == 2
