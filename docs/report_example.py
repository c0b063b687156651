#!/usr/bin/env python
"""Draw ``docs/trip-report.png``, the picture in the README, from runs of real tripping agents.

    python docs/report_example.py      # about a minute, offline

Four agents call the package's loopback fake OpenAI server through the openai SDK under
``runguard.autolog(agent=...)`` with their own ceilings, one MLflow run per task, in a sqlite
store in a temp dir; runs are back-dated over two weeks (MLflow lets a client set a run's start
time) so the picture has days. Then ``runguard report --plot docs/trip-report.png`` draws it.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
os.environ.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true", MLFLOW_MODEL_CATALOG_URI="")

import mlflow
import openai
from mlflow.tracking import MlflowClient

import runguard_autolog as runguard
from runguard_autolog.cli import main as runguard_cli
from runguard_autolog.testing import FakeOpenAIServer, Reply, ToolCall

AGENTS = {  # agent: (autolog limits, the reply its model gives, most calls a task makes)
    "planner": ({"max_calls": 12}, Reply(), 16),
    "researcher": ({"max_calls": "none", "max_output_tokens": 300}, Reply(usage=(400, 40)), 12),
    "coder": ({"max_calls": 30, "loop_repeats": 3}, Reply(tool_calls=[ToolCall("run_tests", '{"path": "."}')]), 8),
    "triage": ({"max_calls": 8, "max_cost_usd": 0.004}, Reply(usage=(2000, 200)), 10),
}


def main() -> None:
    rng = random.Random(11)
    with tempfile.TemporaryDirectory() as directory, FakeOpenAIServer() as server:
        uri = f"sqlite:///{directory}/mlflow.db"
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.set_experiment("agents").experiment_id
        client = openai.OpenAI(base_url=server.base_url, api_key="offline", max_retries=0)
        now = int(time.time() * 1000)
        for task in range(120):
            agent = list(AGENTS)[task % len(AGENTS)]
            limits, reply, most = AGENTS[agent]
            server.default = reply
            runguard.autolog(agent=agent, **limits)
            start = now - rng.randrange(14 * 86_400_000)
            run = MlflowClient().create_run(experiment, start_time=start, run_name=f"{agent}-{task}")
            with mlflow.start_run(run_id=run.info.run_id):
                for _ in range(rng.randrange(2, most + 1)):
                    try:
                        client.chat.completions.create(
                            model="gpt-4o-mini", messages=[{"role": "user", "content": f"task {task}"}]
                        )
                    except runguard.RunGuardTripped:
                        break
        runguard.flush()
        mlflow.flush_trace_async_logging()  # refused calls' spans, before the temp dir goes
        runguard.autolog(disable=True)
        status = runguard_cli(["report", "--tracking-uri", uri, "--plot", str(HERE / "trip-report.png")])
        runguard_cli(["report", "--tracking-uri", uri])
        raise SystemExit(status)


if __name__ == "__main__":
    main()
