"""``runguard demo``: the main job on an embedded default, end to end in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from mlflow.tracking import MlflowClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_trips_the_looping_agent_and_records_the_run(tmp_path):
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("RUNGUARD_", "MLFLOW_TRACKING"))}
    environ["PYTHONPATH"] = REPO
    result = subprocess.run(
        [sys.executable, "-m", "runguard_autolog", "demo", "--dir", str(tmp_path), "--max-calls", "6"],
        env=environ, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "tripped:        call ceiling hit (6/6) [max_calls" in out
    assert "6 reached the provider; call 7 was refused before sending" in out
    assert re.search(r"3,000 calls would have cost about \$[\d,]+\.\d\d", out)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert f"mlflow ui --backend-store-uri {uri}" in out
    run_id = re.search(r"MLflow run:\s+(\w+)", out).group(1)
    data = MlflowClient(tracking_uri=uri).get_run(run_id).data
    assert data.tags["runguard.tripped"] == "call ceiling hit (6/6)"
    assert data.metrics["runguard.calls"] == 6
