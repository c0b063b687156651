"""Real deployments priced: an Azure deployment or a fine-tune, registered prices and aliases,
a prices file, refusing unpriced calls under a cost limit, and genai-prices' snapshot
updates picked up without re-pricing every call."""

from __future__ import annotations

import dataclasses
import json
from decimal import Decimal

import openai
import pytest
from genai_prices import Usage, calc_price, data_snapshot
from genai_prices.types import ModelPrice

import runguard_autolog as runguard
from runguard_autolog.testing import Reply

from .conftest import MESSAGES, chat
from .test_shared import name, redis_url  # noqa: F401 (fixtures)


def _price(model: str, prompt: int, output: int) -> float:
    return float(calc_price(Usage(input_tokens=prompt, output_tokens=output), model, provider_id="openai").total_price)


def test_an_azure_deployment_is_priced_by_the_model_its_reply_names(server):
    server.default = Reply(model="gpt-4o-2024-08-06", prompt_tokens=1000, content="word " * 50)
    azure = openai.AzureOpenAI(azure_endpoint=server.base_url.removesuffix("/v1"), api_key="t",
                               api_version="2024-10-21", max_retries=0)
    runguard.autolog(max_cost_usd=0.02, max_calls="none")
    azure.chat.completions.create(model="prod-gpt4o-deployment", messages=MESSAGES)
    spent = runguard.current()
    assert spent.output_tokens > 0
    assert spent.cost_usd == pytest.approx(_price("gpt-4o-2024-08-06", 1000, spent.output_tokens))
    # later forecasts for the deployment use that price: a cap that would cross the ceiling is refused
    with pytest.raises(runguard.RunGuardTripped) as refused:
        azure.chat.completions.create(model="prod-gpt4o-deployment", messages=MESSAGES, max_tokens=4000)
    assert refused.value.limit == "max_cost_usd"
    assert server.count() == 1


def test_a_registered_fine_tune_price_is_used_exactly(client, server):
    runguard.register_price("my-finetune-v3", input_usd_per_mtok=3.0, output_usd_per_mtok=12.0)
    server.default = Reply(prompt_tokens=1000, content="word " * 100)
    runguard.autolog(max_calls=5)
    chat(client, model="my-finetune-v3")
    spent = runguard.current()
    assert spent.input_tokens == 1000 and spent.output_tokens > 0
    assert spent.cost_usd == pytest.approx(1000 * 3e-6 + spent.output_tokens * 12e-6)


def test_registered_prices_win_and_aliases_share_a_models_price(client, server):
    runguard.register_price("gpt-4o-mini", input_usd_per_mtok=100.0, output_usd_per_mtok=0.0)
    runguard.register_price("eu-prod-mini", same_as="gpt-4o-mini")
    server.default = Reply(prompt_tokens=1000, content="x")
    runguard.autolog(max_calls=5)
    chat(client, model="eu-prod-mini")
    assert runguard.current().cost_usd == pytest.approx(0.1)


@pytest.mark.parametrize("kwargs,message", [
    ({"input_usd_per_mtok": -1.0, "output_usd_per_mtok": 1.0}, "must be a finite number >= 0"),
    ({"input_usd_per_mtok": 1.0}, "pass input_usd_per_mtok= and output_usd_per_mtok="),
    ({}, "pass input_usd_per_mtok= and output_usd_per_mtok="),
    ({"same_as": "no-such-model-anywhere"}, "names a model with no known price"),
    ({"same_as": "gpt-4o", "input_usd_per_mtok": 1.0}, "not both"),
    ({"input_usd_per_mtok": "1e999", "output_usd_per_mtok": 1.0}, "must be a finite number >= 0"),
    ({"input_usd_per_mtok": 1.0, "output_usd_per_mtok": 10**400}, "must be a finite number >= 0"),
])
def test_bad_prices_are_clear_errors(kwargs, message):
    with pytest.raises(runguard.RunGuardConfigError, match=message):
        runguard.register_price("acme", **kwargs)


def test_unpriced_refuse_refuses_before_sending_only_under_a_cost_limit(client, server):
    runguard.autolog(max_cost_usd=1.0, unpriced="refuse")
    with pytest.raises(runguard.RunGuardTripped) as refused:
        chat(client, model="mystery-model-7")
    assert refused.value.limit == "unpriced" and refused.value.scope == "process"
    assert server.count() == 0
    assert runguard.current().tripped is None  # nothing was spent: the scope stays open
    chat(client)  # a priced model goes through
    runguard.autolog(unpriced="refuse")  # no cost limit: nothing to protect, the call goes
    chat(client, model="mystery-model-7")
    assert server.count() == 2


def test_unpriced_from_the_environment_and_a_bad_value(monkeypatch, client, server):
    monkeypatch.setenv("RUNGUARD_UNPRICED", "refuse")
    monkeypatch.setenv("RUNGUARD_MAX_COST_USD", "1")
    runguard.autolog()
    with pytest.raises(runguard.RunGuardTripped, match="no price is known"):
        chat(client, model="mystery-model-7")
    monkeypatch.setenv("RUNGUARD_UNPRICED", "maybe")
    with pytest.raises(runguard.RunGuardConfigError, match="RUNGUARD_UNPRICED='maybe'"):
        runguard.autolog()
    monkeypatch.delenv("RUNGUARD_UNPRICED")
    with pytest.raises(runguard.RunGuardConfigError, match="unpriced='maybe'"):
        runguard.autolog(unpriced="maybe")


def test_unpriced_refuse_under_a_shared_cost_limit_only(client, server, redis_url, name):
    runguard.autolog(store=redis_url, shared_budget=name, shared_max_cost_usd=1.0, unpriced="refuse",
                     max_calls="none")
    with pytest.raises(runguard.RunGuardTripped) as refused:
        chat(client, model="mystery-model-7")
    assert refused.value.limit == "unpriced"
    chat(client)  # priced: sent
    assert server.count() == 1
    runguard.reset_shared(name)


def test_a_registered_cached_input_price_is_charged_for_cache_reads(client, server):
    runguard.register_price("acme-cache", input_usd_per_mtok=2.0, output_usd_per_mtok=8.0,
                            cached_input_usd_per_mtok=0.5)
    server.default = Reply(prompt_tokens=1000, cache_read_input_tokens=400, content="x")
    runguard.autolog(max_calls=5)
    chat(client, model="acme-cache")
    spent = runguard.current()
    assert spent.input_tokens == 1000
    assert spent.cost_usd == pytest.approx(600 * 2e-6 + 400 * 0.5e-6 + spent.output_tokens * 8e-6)


def test_a_prices_file(tmp_path, monkeypatch, client, server):
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({
        "eu-acme": {"same_as": "acme-ft"},  # an alias of a model the same file prices
        "acme-ft": {"input_usd_per_mtok": 2.0, "output_usd_per_mtok": 8.0, "cached_input_usd_per_mtok": 1.0},
    }))
    monkeypatch.setenv("RUNGUARD_PRICES", str(prices))
    server.default = Reply(prompt_tokens=1000, content="x")
    runguard.autolog(max_calls=5)
    chat(client, model="eu-acme")
    spent = runguard.current()
    assert spent.cost_usd == pytest.approx(1000 * 2e-6 + spent.output_tokens * 8e-6)


@pytest.mark.parametrize("content,message", [
    ("{not json", "is not a JSON file"),
    (json.dumps({"x": {"same_as": "no-such-model-anywhere"}}), "names a model with no known price"),
    (json.dumps({"x": {"input_usd_per_mtok": 1, "output": 2}}), "unknown field"),
    (json.dumps(["x"]), "must hold"),
])
def test_a_bad_prices_file_is_an_error_naming_the_variable(tmp_path, monkeypatch, content, message):
    prices = tmp_path / "prices.json"
    prices.write_text(content)
    monkeypatch.setenv("RUNGUARD_PRICES", str(prices))
    with pytest.raises(runguard.RunGuardConfigError, match="RUNGUARD_PRICES") as error:
        runguard.autolog()
    assert message in str(error.value)


def test_a_new_genai_prices_snapshot_is_picked_up(client, server, monkeypatch):
    server.default = Reply(prompt_tokens=1_000_000, content="x")
    runguard.autolog(max_calls=5, max_input_tokens="none")
    chat(client)
    before = runguard.current().cost_usd
    snapshot = data_snapshot.get_snapshot()
    providers = []
    for provider in snapshot.providers:
        if provider.id == "openai":
            models = [dataclasses.replace(m, prices=ModelPrice(**{**vars(m.prices), "input_mtok": Decimal("10")}))
                      if m.id == "gpt-4o-mini" else m for m in provider.models]
            provider = dataclasses.replace(provider, models=models)
        providers.append(provider)
    data_snapshot.set_custom_snapshot(data_snapshot.DataSnapshot(providers=providers, from_auto_update=True))
    looked_up = []
    monkeypatch.setattr(data_snapshot, "get_snapshot", lambda real=data_snapshot.get_snapshot: looked_up.append(1) or real())
    try:
        for _ in range(3):
            chat(client)
    finally:
        data_snapshot.set_custom_snapshot(None)
    assert runguard.current().cost_usd - before == pytest.approx(30.0, rel=1e-3)
    assert len(looked_up) == 1  # looked up again once after the change, not on every call


def test_an_alias_cycle_is_refused():
    runguard.register_price("b-model", input_usd_per_mtok=1.0, output_usd_per_mtok=2.0)
    runguard.register_price("a-model", same_as="b-model")
    with pytest.raises(runguard.RunGuardConfigError, match="alias cycle"):
        runguard.register_price("b-model", same_as="a-model")
    from runguard_autolog.pricing import rates_for

    assert rates_for("a-model") is not None and rates_for("b-model") is not None


def test_a_prices_file_may_alias_an_alias_in_any_order(tmp_path, monkeypatch, client, server):
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"eu-prod": {"same_as": "my-ft"}, "my-ft": {"same_as": "gpt-4o"}}))
    monkeypatch.setenv("RUNGUARD_PRICES", str(prices))
    runguard.autolog(max_calls=5)
    from runguard_autolog.pricing import rates_for

    assert rates_for("eu-prod").flat == rates_for("gpt-4o").flat


def test_a_learned_deployment_price_survives_a_cache_refresh(server):
    server.default = Reply(model="gpt-4o-2024-08-06", prompt_tokens=1000, content="x")
    azure = openai.AzureOpenAI(azure_endpoint=server.base_url.removesuffix("/v1"), api_key="t",
                               api_version="2024-10-21", max_retries=0)
    runguard.autolog(max_cost_usd=1.0, max_calls="none")  # allow: the first call of other-dep is learned
    azure.chat.completions.create(model="other-dep", messages=MESSAGES)
    runguard.register_price("unrelated-model", input_usd_per_mtok=1.0, output_usd_per_mtok=1.0)  # drops the cache
    runguard.autolog(max_cost_usd=1.0, max_calls="none", unpriced="refuse")
    azure.chat.completions.create(model="other-dep", messages=MESSAGES)  # still priced: not refused
    assert server.count() == 2
