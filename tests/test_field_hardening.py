"""What a real deployment runs into, in real subprocesses where start-up is involved:
configuration that fails closed (typos, huge numbers, fractions, units, flags), the
bootstrap under an interpreter that cannot import the package, the CLI's exit statuses,
no secrets in trips, and the demo's output."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import venv

import pytest

import runguard_autolog as runguard
from runguard_autolog._bootstrap import bootstrap_dir
from runguard_autolog.testing import Reply

from .conftest import chat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGENT = textwrap.dedent("""
    import sys
    import openai

    client = openai.OpenAI(base_url=sys.argv[1], api_key="test", max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    print("ran")
""")


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNGUARD_") and k != "PYTHONPATH"}
    env.update(extra)
    return env


def _run(command: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "runguard_autolog", *args], _env(PYTHONPATH=REPO, **env))


@pytest.fixture
def agent(tmp_path):
    path = tmp_path / "agent.py"
    path.write_text(AGENT)
    return str(path)


def _start(form: str, agent: str, server, **variables: str) -> subprocess.CompletedProcess:
    if form == "runguard-run":
        return _run([shutil.which("runguard-run") or "runguard-run", sys.executable, agent, server.base_url],
                    _env(**variables))
    return _run([sys.executable, agent, server.base_url],
                _env(RUNGUARD_AUTOLOG="1", PYTHONPATH=bootstrap_dir(), **variables))


def _one_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


# -- configuration fails closed --------------------------------------------------------------------
@pytest.mark.parametrize("variable,suggested", [("RUNGUARD_MAX_CALS", "RUNGUARD_MAX_CALLS"),
                                                ("RUNGUARD_MAX_COST", "RUNGUARD_MAX_COST_USD")])
@pytest.mark.parametrize("form", ["runguard-run", "PYTHONPATH"])
def test_an_unknown_variable_never_starts_the_program(form, variable, suggested, agent, server):
    done = _start(form, agent, server, **{variable: "5"})
    assert done.returncode == 2
    line = _one_line(done)
    assert variable in line and f"did you mean {suggested}" in line
    assert server.count() == 0
    config = _cli("config", **{variable: "5"})
    assert config.returncode == 2 and variable in _one_line(config)


@pytest.mark.parametrize("form", ["runguard-run", "PYTHONPATH", "config"])
def test_a_400_digit_limit_is_a_config_error_not_a_traceback(form, agent, server):
    value = "9" * 400
    done = _cli("config", RUNGUARD_MAX_CALLS=value) if form == "config" else _start(
        form, agent, server, RUNGUARD_MAX_CALLS=value)
    assert done.returncode == 2
    line = _one_line(done)
    assert "RUNGUARD_MAX_CALLS" in line and "too large" in line and len(line) < 300
    assert server.count() == 0


def test_a_fraction_for_a_count_says_it_must_be_whole():
    with pytest.raises(runguard.RunGuardConfigError, match=r"RUNGUARD_MAX_CALLS='10\.5' is not valid: must be a whole"):
        os.environ["RUNGUARD_MAX_CALLS"] = "10.5"
        try:
            runguard.autolog()
        finally:
            del os.environ["RUNGUARD_MAX_CALLS"]


def test_bytes_and_seconds_take_units():
    done = _cli("config", "--json", RUNGUARD_MAX_ARTIFACT_BYTES="10MiB", RUNGUARD_MAX_REQUEST_LATENCY_S="2h",
                RUNGUARD_SHARED_LEASE_S="45s")
    assert done.returncode == 0, done.stderr
    settings = json.loads(done.stdout)["settings"]
    assert settings["max_artifact_bytes"] == {"value": 10 * 1024 * 1024, "source": "environment"}
    assert settings["max_request_latency_s"]["value"] == 7200
    assert settings["shared_lease_s"]["value"] == 45
    runguard.autolog(max_artifact_bytes="512KB", max_request_latency_s="250ms")
    assert runguard.current().limits["max_artifact_bytes"] == 512_000
    assert runguard.current().limits["max_request_latency_s"] == 0.25
    bad = _cli("config", RUNGUARD_MAX_ARTIFACT_BYTES="10XB")
    assert bad.returncode == 2 and "unknown unit 'XB'" in _one_line(bad)


def test_a_bad_flag_is_the_same_error_in_config_and_runguard_run(agent, server):
    config = _cli("config", RUNGUARD_AUTOLOG="maybe")
    run = _start("runguard-run", agent, server, RUNGUARD_DISABLE="maybe")
    assert config.returncode == run.returncode == 2
    assert "RUNGUARD_AUTOLOG='maybe' is not valid" in _one_line(config)
    assert "RUNGUARD_DISABLE='maybe' is not valid" in _one_line(run)


def test_the_bootstrap_under_an_interpreter_without_the_package_refuses_to_start(tmp_path, agent, server):
    venv.EnvBuilder(with_pip=False).create(tmp_path / "other")
    python = str(tmp_path / "other" / "bin" / "python")
    done = _run([python, "-c", "print('ran')"], _env(RUNGUARD_AUTOLOG="1", PYTHONPATH=bootstrap_dir()))
    assert done.returncode == 2
    assert "cannot import runguard_autolog" in _one_line(done) and "ran" not in done.stdout


# -- the CLI ------------------------------------------------------------------------------------------
def test_cli_version_json_and_usage_exit_statuses():
    version = _cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"runguard-autolog {runguard.__version__}"
    config = _cli("config", "--json", RUNGUARD_MAX_CALLS="7", RUNGUARD_STORE="redis://h:6379/0?password=s3cret")
    parsed = json.loads(config.stdout)
    assert parsed["settings"]["max_calls"] == {"value": 7, "source": "environment"}
    assert parsed["settings"]["max_cost_usd"]["value"] is None
    assert "s3cret" not in config.stdout and "password=***" in config.stdout
    plain = _cli("config", RUNGUARD_STORE="redis://h:6379/0?password=s3cret")
    assert "s3cret" not in plain.stdout
    usage = _run([shutil.which("runguard-run") or "runguard-run"], _env())
    assert usage.returncode == 64 and "usage: runguard-run" in usage.stderr
    assert _cli("no-such-command").returncode == 64


def test_python_dash_m_help_works():
    done = _cli("--help")
    assert done.returncode == 0 and "runguard" in done.stdout


# -- no secrets, honest words -------------------------------------------------------------------------
SECRET = "sk-proj-abcdefghijklmnopqrstuvwxyz0123"


@pytest.mark.parametrize("status,body", [
    (401, {"error": {"message": f"Incorrect API key provided: {SECRET}", "type": "invalid_request_error",
                     "code": "invalid_api_key"}}),
    (429, {"error": {"message": f"Budget exceeded for the prompt 'tell me {SECRET}'", "type": "budget_exceeded",
                     "code": None}}),
])
def test_provider_error_bodies_never_reach_the_trip(status, body, client, server, tracking, caplog):
    import mlflow

    server.default = Reply(status=status, body=body)
    runguard.autolog(max_calls=5)
    with mlflow.start_run() as run:
        with pytest.raises(Exception):
            chat(client)
        with pytest.raises(runguard.RunGuardTripped) as refused:
            chat(client)
        runguard.flush()
    assert SECRET not in str(refused.value) and SECRET not in refused.value.reason
    assert f"HTTP {status}" in refused.value.reason
    assert body["error"]["type"] in refused.value.reason  # described by type and code only
    tags = mlflow.get_run(run.info.run_id).data.tags
    assert SECRET not in json.dumps(tags)
    assert not [r for r in caplog.records if SECRET in r.getMessage()]


def test_shadow_and_cut_messages_say_what_happened(client, server):
    seen = []
    runguard.autolog(max_calls=1, on_trip=seen.append)
    chat(client)
    chat(client)
    assert server.count() == 2
    message = str(seen[0])
    assert "the call is sent unless on_trip raises" in message and "not sent" not in message
    runguard.autolog(max_output_tokens=5, max_calls="none")
    runguard.reset()
    server.default = Reply(content=" ".join(["w"] * 100))
    with pytest.raises(runguard.RunGuardTripped) as cut:
        for _ in client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}],
                                                stream=True):
            pass
    assert "crossed mid-stream" in str(cut.value) and "part of its output had arrived" in str(cut.value)
    assert "not sent" not in str(cut.value)


# -- the demo -----------------------------------------------------------------------------------------
def test_the_demo_prints_no_mlflow_chatter_and_a_stable_estimate(tmp_path):
    estimates = []
    for index, ceiling in enumerate(("25", "0", "2")):
        done = _cli("demo", "--dir", str(tmp_path / str(index)), "--max-calls", ceiling)
        assert done.returncode == 0, done.stderr
        assert " INFO " not in done.stdout + done.stderr
        estimates.append(re.search(r"would have cost about \$([\d,.]+)", done.stdout).group(1))
    assert len(set(estimates)) == 1, estimates
