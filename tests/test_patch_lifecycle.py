"""Install/uninstall symmetry, driven by the PATCHES tables: import orders, idempotency, reversal."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import wrapt

import runguard_autolog as runguard
from runguard_autolog import _patching
from runguard_autolog.integrations import anthropic as anthropic_integration
from runguard_autolog.integrations import litellm as litellm_integration
from runguard_autolog.integrations import openai as openai_integration

from .conftest import chat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm never fetches its price map
SPECS = (*openai_integration.PATCHES, *anthropic_integration.PATCHES, *litellm_integration.PATCHES)


def _attribute(spec):
    module = importlib.import_module(spec.module)
    if "." not in spec.attribute:  # a module-level function (litellm.completion)
        return module, spec.attribute, module.__dict__[spec.attribute]
    owner_name, name = spec.attribute.split(".")
    owner = getattr(module, owner_name)
    return owner, name, owner.__dict__[name]


@pytest.fixture(scope="module")
def originals():
    return {spec: _attribute(spec)[2] for spec in SPECS}


def test_every_target_in_the_table_is_patched_once_and_restored_on_disable(originals):
    runguard.autolog()
    runguard.autolog()  # twice: no double wrap
    for spec in SPECS:
        owner, name, current = _attribute(spec)
        assert isinstance(current, wrapt.FunctionWrapper), spec
        assert _patching.is_ours(current)
        assert current.__wrapped__ is originals[spec], f"{spec} is wrapped twice"
    runguard.autolog(disable=True)
    for spec in SPECS:
        assert _attribute(spec)[2] is originals[spec], spec
    runguard.autolog()  # install -> uninstall -> install
    for spec in SPECS:
        assert _attribute(spec)[2].__wrapped__ is originals[spec]


def test_autolog_twice_does_not_double_count(client, server):
    runguard.autolog(max_calls=3)
    runguard.autolog(max_calls=3)
    chat(client)
    assert runguard.current().calls == 1


def test_disable_lets_every_call_through(client, server):
    runguard.autolog(max_calls=1)
    chat(client)
    runguard.autolog(disable=True)
    for _ in range(3):
        chat(client)
    assert server.count() == 4


def _run(code: str, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RUNGUARD_")}
    environ.update(env, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "sdk, call",
    [
        ("anthropic", "anthropic.Anthropic(base_url={base!r}.removesuffix('/v1'), api_key='x', max_retries=0)"
                      ".messages.create(model='claude-3-5-haiku-latest', max_tokens=10, messages=m)"),
        ("litellm", "litellm.completion(model='openai/gpt-4o-mini', api_base={base!r}, api_key='x', messages=m)"),
    ],
)
def test_autolog_before_importing_another_sdk_patches_it_on_import(server, sdk, call):
    code = f"""
import sys, runguard_autolog as r
r.autolog(max_calls=1)
assert "{sdk}" not in sys.modules, "autolog must not import the SDK"
import {sdk}
m = [{{"role": "user", "content": "hi"}}]
{call.format(base=server.base_url)}
try:
    {call.format(base=server.base_url)}
except r.RunGuardTripped as e:
    print("tripped", e.limit)
"""
    result = _run(code, LITELLM_LOCAL_MODEL_COST_MAP="True")
    assert result.stdout.strip().splitlines()[-1] == "tripped max_calls", result.stderr[-2000:]
    assert server.count() == 1


def test_autolog_before_import_openai_patches_on_import(server):
    code = f"""
import sys, runguard_autolog as r
r.autolog(max_calls=2)
assert "openai" not in sys.modules, "autolog must not import the SDK"
import openai
c = openai.OpenAI(base_url={server.base_url!r}, api_key="x", max_retries=0)
m = [{{"role": "user", "content": "hi"}}]
c.chat.completions.create(model="gpt-4o-mini", messages=m)
c.chat.completions.create(model="gpt-4o-mini", messages=m)
try:
    c.chat.completions.create(model="gpt-4o-mini", messages=m)
except r.RunGuardTripped as e:
    print("tripped", e.limit)
"""
    result = _run(code)
    assert result.stdout.strip() == "tripped max_calls", result.stderr
    assert server.count() == 2


def test_a_hook_firing_after_disable_installs_nothing(server):
    code = """
import runguard_autolog as r
r.autolog(max_calls=1)
r.autolog(disable=True)
import openai
print(type(openai.resources.chat.completions.Completions.__dict__["create"]).__name__)
"""
    result = _run(code)
    assert result.stdout.strip() == "function", result.stderr


def test_importing_runguard_is_cheap_and_imports_no_sdk():
    result = _run("import sys, runguard_autolog; print(sorted(m for m in ('openai', 'anthropic', 'litellm', 'mlflow', "
                  "'langchain_core') if m in sys.modules))")
    assert result.stdout.strip() == "[]", result.stderr


def test_mlflow_run_lifecycle_patches_are_symmetric():
    import mlflow
    import mlflow.tracking.fluent as fluent

    from runguard_autolog import _recording
    from runguard_autolog.integrations import mlflow_runs

    before = {(s.module, s.attribute): getattr(importlib.import_module(s.module), s.attribute) for s in mlflow_runs.PATCHES}
    runguard.autolog()
    assert isinstance(mlflow.end_run, wrapt.FunctionWrapper) and isinstance(fluent.end_run, wrapt.FunctionWrapper)
    assert _recording.span_processor not in mlflow.tracing.config.get_config().span_processors  # never shown
    runguard.autolog(disable=True)
    after = {(s.module, s.attribute): getattr(importlib.import_module(s.module), s.attribute) for s in mlflow_runs.PATCHES}
    assert after == before


def _installed_modules() -> set[str]:
    return {module for module, _ in _patching.installed_keys()}


def test_disabled_integrations_are_left_unpatched_and_come_back_when_enabled(client, server):
    import mlflow.deployments  # noqa: F401  (the MLflow integrations patch on import)

    from runguard_autolog.integrations import mlflow_artifacts, mlflow_deployments

    artifact_modules = {spec.module for spec in mlflow_artifacts.PATCHES}
    runguard.autolog(max_calls=1, disabled_integrations=["artifacts", "evaluation"])
    assert not artifact_modules & _installed_modules()
    # the per-attempt hook the evaluation shares with the deployments client stays
    assert (mlflow_deployments.URLLIB3_ATTEMPTS.module, mlflow_deployments.URLLIB3_ATTEMPTS.attribute) in set(
        _patching.installed_keys())
    chat(client)
    with pytest.raises(runguard.RunGuardTripped):  # openai is still guarded
        chat(client)
    runguard.autolog(max_calls=5)
    assert artifact_modules <= _installed_modules()


def test_disabled_integrations_from_the_environment(monkeypatch, client, server):
    monkeypatch.setenv("RUNGUARD_DISABLED_INTEGRATIONS", "openai, langchain")
    runguard.autolog(max_calls=1)
    for _ in range(3):
        chat(client)  # not guarded
    assert server.count() == 3
    assert "langchain,openai" in runguard.config()


@pytest.mark.parametrize("value", ["openia", "artifacts,bogus"])
def test_an_unknown_integration_name_is_a_config_error(monkeypatch, value):
    monkeypatch.setenv("RUNGUARD_DISABLED_INTEGRATIONS", value)
    with pytest.raises(runguard.RunGuardConfigError, match="RUNGUARD_DISABLED_INTEGRATIONS"):
        runguard.autolog()
    with pytest.raises(runguard.RunGuardConfigError, match="not an integration"):
        runguard.autolog(disabled_integrations=[value.split(",")[-1]])


def test_disabled_integrations_none_means_none(monkeypatch):
    monkeypatch.setenv("RUNGUARD_DISABLED_INTEGRATIONS", "none")
    runguard.autolog()
    assert "openai._base_client" in _installed_modules() or "openai" not in __import__("sys").modules
