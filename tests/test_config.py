"""Every keyword, RUNGUARD_* variable, default and error rule."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

import runguard_autolog as runguard
from runguard_autolog._config import LIMITS, env_name

from .conftest import chat

DEFAULTS = {
    "max_calls": 50, "max_input_tokens": 500_000, "max_output_tokens": 100_000,
    "max_total_tokens": math.inf, "max_cost_usd": math.inf, "max_requests": math.inf,
    "max_consecutive_429s": 5, "max_request_latency_s": math.inf, "max_artifact_writes": 20,
    "max_artifact_bytes": 10 * 1024 * 1024, "max_eval_llm_calls": 500, "loop_repeats": 3,
    "loop_identical_requests": math.inf, "max_context_fraction": 0.95,
}
VALID = {  # a valid environment value per keyword and what it parses to
    "max_calls": ("7", 7), "max_input_tokens": ("1000", 1000), "max_output_tokens": ("200", 200),
    "max_total_tokens": ("5000", 5000), "max_cost_usd": ("2.5", 2.5), "max_requests": ("40", 40),
    "max_consecutive_429s": ("3", 3), "max_request_latency_s": ("12.5", 12.5),
    "max_artifact_writes": ("9", 9), "max_artifact_bytes": ("4096", 4096),
    "max_eval_llm_calls": ("100", 100), "loop_repeats": ("4", 4),
    "loop_identical_requests": ("2", 2), "max_context_fraction": ("0.5", 0.5),
}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = """
import json, math, runguard_autolog as r
try:
    r.autolog()
except r.RunGuardConfigError as e:
    print("ERROR", e); raise SystemExit(3)
limits = r.current().limits
print(json.dumps({k: (None if v == math.inf else v) for k, v in limits.items() if k != "on_trip"} | {"on_trip": str(limits["on_trip"])}))
"""


def _probe(env: dict) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RUNGUARD_")}
    environ.update(env)
    environ["PYTHONPATH"] = REPO + os.pathsep + environ.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", PROBE], env=environ, capture_output=True, text=True, timeout=60)


def test_defaults_are_the_product_numbers():
    runguard.autolog()
    limits = runguard.current().limits
    assert {k: limits[k] for k in DEFAULTS} == DEFAULTS
    assert limits["on_trip"] == "raise"
    assert set(LIMITS) == set(DEFAULTS)


@pytest.mark.parametrize("keyword", sorted(VALID))
def test_each_environment_variable_sets_its_limit_in_a_fresh_process(keyword):
    raw, expected = VALID[keyword]
    result = _probe({env_name(keyword): raw})
    assert result.returncode == 0, result.stdout + result.stderr
    limits = json.loads(result.stdout.strip().splitlines()[-1])
    assert limits[keyword] == expected
    others = {k: v for k, v in limits.items() if k not in (keyword, "on_trip")}
    assert others == {k: (None if v == math.inf else v) for k, v in DEFAULTS.items() if k != keyword}


@pytest.mark.parametrize("keyword", sorted(VALID))
def test_each_malformed_environment_value_is_an_error_naming_variable_and_value(keyword):
    for bad in ("abc", "-3", "1e999"):
        result = _probe({env_name(keyword): bad})
        assert result.returncode == 3, (keyword, bad, result.stdout, result.stderr)
        assert env_name(keyword) in result.stdout and repr(bad) in result.stdout


def test_none_and_off_lift_a_limit_from_the_environment():
    result = _probe({"RUNGUARD_MAX_CALLS": "none", "RUNGUARD_MAX_INPUT_TOKENS": "OFF"})
    limits = json.loads(result.stdout.strip().splitlines()[-1])
    assert limits["max_calls"] is None and limits["max_input_tokens"] is None


def test_on_trip_from_the_environment_and_its_errors():
    result = _probe({"RUNGUARD_ON_TRIP": "warn"})
    assert json.loads(result.stdout.strip().splitlines()[-1])["on_trip"] == "warn"
    result = _probe({"RUNGUARD_ON_TRIP": "explode"})
    assert result.returncode == 3 and "RUNGUARD_ON_TRIP" in result.stdout and "'explode'" in result.stdout


def test_keyword_beats_environment_beats_default(monkeypatch):
    monkeypatch.setenv("RUNGUARD_MAX_CALLS", "9")
    monkeypatch.setenv("RUNGUARD_MAX_COST_USD", "3")
    runguard.autolog(max_calls=4)
    limits = runguard.current().limits
    assert limits["max_calls"] == 4 and limits["max_cost_usd"] == 3.0 and limits["max_output_tokens"] == 100_000


@pytest.mark.parametrize("value", [math.inf, "none", "off"])
def test_inf_or_none_lifts_a_limit_in_code(value):
    runguard.autolog(max_calls=value)
    assert runguard.current().limits["max_calls"] == math.inf


@pytest.mark.parametrize(
    "keyword,value",
    [("max_calls", -1), ("max_calls", 2.5), ("max_calls", "abc"), ("max_calls", True), ("max_cost_usd", -0.1),
     ("max_cost_usd", float("nan")), ("loop_repeats", 1), ("max_consecutive_429s", 0),
     ("max_context_fraction", 1.5), ("max_context_fraction", 0), ("max_artifact_bytes", -math.inf)],
)
def test_bad_keyword_values_are_clear_errors(keyword, value):
    with pytest.raises(runguard.RunGuardConfigError) as info:
        runguard.autolog(**{keyword: value})
    assert keyword in str(info.value) and repr(value) in str(info.value)


def test_bad_on_trip_keyword():
    with pytest.raises(runguard.RunGuardConfigError, match="on_trip"):
        runguard.autolog(on_trip="explode")


def test_a_bad_value_leaves_the_previous_configuration_in_place(client, server):
    runguard.autolog(max_calls=1)
    with pytest.raises(runguard.RunGuardConfigError):
        runguard.autolog(max_calls="lots")
    chat(client)
    with pytest.raises(runguard.RunGuardTripped):
        chat(client)


def test_environment_limit_is_enforced_end_to_end_in_a_subprocess(server):
    code = (
        "import openai, runguard_autolog as r\n"
        "r.autolog()\n"
        f"c = openai.OpenAI(base_url={server.base_url!r}, api_key='x', max_retries=0)\n"
        "n = 0\n"
        "try:\n"
        "    while True:\n"
        "        c.chat.completions.create(model='gpt-4o-mini', messages=[{'role': 'user', 'content': 'hi'}]); n += 1\n"
        "except r.RunGuardTripped as e:\n"
        "    print(n, e.limit)\n"
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RUNGUARD_")}
    environ.update(RUNGUARD_MAX_CALLS="4", PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["4", "max_calls"], result.stderr
    assert server.count() == 4


def test_kill_switch_leaves_sdks_unpatched(client, server, monkeypatch):
    monkeypatch.setenv("RUNGUARD_DISABLE", "1")
    runguard.autolog(max_calls=1)
    for _ in range(3):
        chat(client)
    assert server.count() == 3


def test_malformed_kill_switch_is_an_error(monkeypatch):
    monkeypatch.setenv("RUNGUARD_DISABLE", "maybe")
    with pytest.raises(runguard.RunGuardConfigError, match="RUNGUARD_DISABLE"):
        runguard.autolog()
