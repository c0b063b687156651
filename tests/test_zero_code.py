"""Zero-code enablement, in real subprocesses against the loopback fake server:
``runguard-run``, ``python -m runguard_autolog run``, the ``RUNGUARD_AUTOLOG=1`` +
``PYTHONPATH`` form, chaining to another ``sitecustomize``, bad configuration, the kill
switch, a multiprocessing child, and ``runguard config``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from runguard_autolog._bootstrap import bootstrap_dir

AGENT = textwrap.dedent("""
    import sys
    import openai  # imported after start-up: patched by the post-import hook

    client = openai.OpenAI(base_url=sys.argv[1], api_key="test", max_retries=0)
    for step in range(10):
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"step {step}"}])
    print("all 10 calls made")
""")

SPAWNING_AGENT = textwrap.dedent("""
    import multiprocessing
    import sys


    def loop(base_url):
        import openai

        client = openai.OpenAI(base_url=base_url, api_key="test", max_retries=0)
        for step in range(10):
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"child {step}"}])


    if __name__ == "__main__":
        child = multiprocessing.get_context("spawn").Process(target=loop, args=(sys.argv[1],))
        child.start()
        child.join(60)
        print("child exit code", child.exitcode)
        sys.exit(0 if child.exitcode == 0 else 3)
""")


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNGUARD_") and k != "PYTHONPATH"}
    env.update(extra)
    return env


def _runguard_run() -> list[str]:
    script = shutil.which("runguard-run")
    assert script, "the runguard-run console script is installed with the package"
    return [script]


@pytest.fixture
def agent(tmp_path):
    path = tmp_path / "agent.py"
    path.write_text(AGENT)
    return str(path)


def _run(command: list[str], env: dict, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.mark.parametrize("launcher", ["runguard-run", "python -m runguard_autolog run"])
def test_runguard_run_guards_a_program_that_imports_openai_later(launcher, agent, server):
    prefix = _runguard_run() if launcher == "runguard-run" else [sys.executable, "-m", "runguard_autolog", "run"]
    done = _run([*prefix, sys.executable, agent, server.base_url], _env(RUNGUARD_MAX_CALLS="3"))
    assert done.returncode != 0
    assert "RunGuardTripped" in done.stderr and "call ceiling hit (3/3)" in done.stderr
    assert "all 10 calls made" not in done.stdout
    assert server.count("/chat/completions") == 3


def test_autolog_variable_with_the_bootstrap_path_does_the_same(agent, server):
    printed = _run([sys.executable, "-m", "runguard_autolog", "bootstrap-path"], _env())
    path = printed.stdout.strip()
    assert path == bootstrap_dir() and os.path.isfile(os.path.join(path, "sitecustomize.py"))
    done = _run([sys.executable, agent, server.base_url],
                _env(RUNGUARD_AUTOLOG="1", PYTHONPATH=path, RUNGUARD_MAX_CALLS="3"))
    assert done.returncode != 0 and "RunGuardTripped" in done.stderr
    assert server.count("/chat/completions") == 3


def test_bootstrap_path_without_the_variable_changes_nothing(agent, server):
    done = _run([sys.executable, agent, server.base_url], _env(PYTHONPATH=bootstrap_dir(), RUNGUARD_MAX_CALLS="3"))
    assert done.returncode == 0, done.stderr
    assert server.count("/chat/completions") == 10


def test_another_sitecustomize_still_runs(agent, server, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    marker = tmp_path / "marker.txt"
    (theirs / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    env = _env(RUNGUARD_MAX_CALLS="3", PYTHONPATH=str(theirs))
    done = _run([*_runguard_run(), sys.executable, agent, server.base_url], env)
    assert marker.read_text() == "ran"
    assert done.returncode != 0 and "RunGuardTripped" in done.stderr
    assert server.count("/chat/completions") == 3


BAD_VALUES = [
    ("RUNGUARD_MAX_CALLS", "abc"),
    ("RUNGUARD_MAX_CALLS", "-3"),
    ("RUNGUARD_MAX_COST_USD", "1e999"),
    ("RUNGUARD_MAX_CONSECUTIVE_429S", "0"),
    ("RUNGUARD_MAX_CONTEXT_FRACTION", "2"),
    ("RUNGUARD_LOOP_REPEATS", "1"),
    ("RUNGUARD_ON_TRIP", "explode"),
    ("RUNGUARD_DISABLE", "maybe"),
]


@pytest.mark.parametrize("variable,value", BAD_VALUES)
@pytest.mark.parametrize("form", ["runguard-run", "PYTHONPATH"])
def test_bad_configuration_never_starts_the_program(form, variable, value, agent, server):
    if form == "runguard-run":
        command, env = [*_runguard_run(), sys.executable, agent, server.base_url], _env(**{variable: value})
    else:
        command = [sys.executable, agent, server.base_url]
        env = _env(RUNGUARD_AUTOLOG="1", PYTHONPATH=bootstrap_dir(), **{variable: value})
    done = _run(command, env)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert variable in lines[0] and repr(value) in lines[0]
    assert server.count() == 0


def test_kill_switch(agent, server):
    done = _run([*_runguard_run(), sys.executable, agent, server.base_url],
                _env(RUNGUARD_DISABLE="1", RUNGUARD_MAX_CALLS="3"))
    assert done.returncode == 0, done.stderr
    assert server.count("/chat/completions") == 10


def test_a_multiprocessing_spawn_child_is_guarded_too(tmp_path, server):
    path = tmp_path / "spawner.py"
    path.write_text(SPAWNING_AGENT)
    done = _run([*_runguard_run(), sys.executable, str(path), server.base_url], _env(RUNGUARD_MAX_CALLS="3"))
    assert done.returncode == 3, done.stdout + done.stderr
    assert "RunGuardTripped" in done.stderr
    assert server.count("/chat/completions") == 3


def test_runguard_config_prints_each_limit_and_its_source():
    done = _run([sys.executable, "-m", "runguard_autolog", "config"],
                _env(RUNGUARD_MAX_CALLS="7", RUNGUARD_MAX_COST_USD="none", RUNGUARD_ON_TRIP="warn"))
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in done.stdout.splitlines() if line.strip()}
    assert rows["max_calls"] == ["7", "environment (RUNGUARD_MAX_CALLS=7)"]
    assert rows["max_cost_usd"] == ["none", "environment (RUNGUARD_MAX_COST_USD=none)"]
    assert rows["max_input_tokens"] == ["500000", "default"]
    assert rows["max_consecutive_429s"] == ["5", "default"]
    assert rows["on_trip"] == ["warn", "environment (RUNGUARD_ON_TRIP=warn)"]
    assert "RUNGUARD_AUTOLOG (enable at start-up): off" in done.stdout


def test_runguard_config_names_a_bad_value_and_exits_2():
    done = _run([sys.executable, "-m", "runguard_autolog", "config"], _env(RUNGUARD_MAX_CALLS="abc"))
    assert done.returncode == 2
    assert "RUNGUARD_MAX_CALLS='abc'" in done.stderr


def test_in_process_config_shows_keywords_too():
    import runguard_autolog as runguard

    runguard.autolog(max_calls=9)
    table = runguard.config()
    assert any(line.split()[:3] == ["max_calls", "9", "keyword"] for line in table.splitlines())


SERVICE = textwrap.dedent("""
    import sys
    import time

    import openai
    import runguard_autolog as runguard

    client = openai.OpenAI(base_url=sys.argv[1], api_key="test", max_retries=0)
    for _ in range(2):  # two windows of a long-running service
        time.sleep(3 - time.time() % 3 + 0.05)
        outcomes = []
        for step in range(5):
            try:
                client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
                outcomes.append("ok")
            except runguard.RunGuardTripped as trip:
                outcomes.append(f"refused {0 < trip.details['retry_after'] <= 3}")
        print(" ".join(outcomes))
""")


def test_a_service_under_runguard_run_with_a_window_is_not_stopped_for_good(tmp_path, server):
    """The zero-code default for a service: RUNGUARD_WINDOW gives the process scope fresh windows."""
    path = tmp_path / "service.py"
    path.write_text(SERVICE)
    done = _run([*_runguard_run(), sys.executable, str(path), server.base_url],
                _env(RUNGUARD_MAX_CALLS="3", RUNGUARD_WINDOW="3"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["ok ok ok refused True refused True"] * 2
    assert server.count("/chat/completions") == 6
