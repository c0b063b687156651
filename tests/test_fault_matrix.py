"""A fault matrix: every guarded LLM entry (each row of the integrations' ``PATCHES`` tables with
an endpoint) x every fault, one test per fault. :data:`SCENARIOS` calls each entry for real (its SDK
against the loopback fake server); an entry without one fails every cell, and each call sent is
checked to have gone through that very entry (``entry_spy``), not a neighbour."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import Any
from unittest import mock

import anthropic
import httpx
import openai
import pytest
import requests
import wrapt
from langchain_core.language_models.llms import BaseLLM
from langchain_core.outputs import GenerationChunk
from langchain_openai import ChatOpenAI
from langchain_openai import OpenAI as CompletionLLM
from mlflow.deployments import get_deploy_client
from mlflow.deployments import openai as openai_deployments
from mlflow.exceptions import MlflowException
from mlflow.genai.judges.adapters import gateway_adapter
from mlflow.genai.judges.adapters.utils import ChatCompletionError
from mlflow.metrics.genai import model_utils

import runguard_autolog as runguard
from runguard_autolog import _runtime
from runguard_autolog._patching import PatchSpec
from runguard_autolog.integrations import anthropic as anthropic_integration
from runguard_autolog.integrations import litellm as litellm_integration
from runguard_autolog.integrations import langchain, mlflow_deployments, mlflow_evaluation
from runguard_autolog.integrations import openai as openai_integration
from runguard_autolog.testing import Reply

from ._servers import free_port

MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "hello"}]
CONTENT = "alpha beta gamma"  # the fake server's reply; each scenario returns the text it read
TABLES = (openai_integration, anthropic_integration, litellm_integration, langchain, mlflow_deployments, mlflow_evaluation)
REDIS_URL = os.environ.get("RG_TEST_REDIS_URL")  # read at collection: conftest clears RUNGUARD_*
RETRY_WINDOW = 0.6  # s after a timeout: longer than the openai SDK's first backoff (0.375-0.5 s)


@dataclass(frozen=True)
class Scenario:
    id: str
    call: Callable[..., Any]  # async call(server, **client_kwargs) -> what the caller read
    on_500: type[BaseException]  # the SDK's own error for a 500 ...
    on_timeout: type[BaseException]  # ... and for a client-side timeout
    stream: bool = False
    expect: Any = CONTENT
    timeout: float = 0.2  # the client timeout to use (MLflow's settings take whole seconds)
    attempts: int = 1  # HTTP attempts a failing call makes (litellm's embedding keeps the SDK's 2 retries)


# -- openai ---------------------------------------------------------------------------------
def _openai(id: str, path: str, read: Callable[[Any], Any], expect: Any = CONTENT, **request: Any):
    """Two scenarios, ``client.<path>(**request)`` on openai.OpenAI and on AsyncOpenAI."""
    stream = request.get("stream") is True

    def scenario(id: str, sdk: type) -> Scenario:
        async def call(server, **client):
            result = attrgetter(path)(sdk(base_url=server.base_url, api_key="t", max_retries=0, **client))(**request)
            if sdk is openai.AsyncOpenAI:
                result = await result
                result = [chunk async for chunk in result] if stream else result
            return read(list(result) if stream else result)

        return Scenario(id, call, openai.InternalServerError, openai.APITimeoutError, stream, expect)

    return scenario(id, openai.OpenAI), scenario(f"async-{id}", openai.AsyncOpenAI)


def _message(reply):
    return reply.choices[0].message.content


def _deltas(chunks):
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


CHAT, RESPONSE = {"model": MODEL, "messages": MESSAGES}, {"model": MODEL, "input": "hello"}
chat, achat = _openai("chat", "chat.completions.create", _message, **CHAT)
chat_stream, achat_stream = _openai("chat-stream", "chat.completions.create", _deltas, stream=True, **CHAT)
chat_parse, achat_parse = _openai("chat-parse", "chat.completions.parse", _message, **CHAT)
completion, acompletion = _openai("completion", "completions.create", lambda r: r.choices[0].text,
                                  model="gpt-3.5-turbo-instruct", prompt="hello")
embedding, aembedding = _openai("embedding", "embeddings.create", lambda r: r.data[0].embedding, [0.1, 0.2, 0.3],
                                model="text-embedding-3-small", input="hello")
responses, aresponses = _openai("responses", "responses.create", lambda r: r.output_text, **RESPONSE)
responses_stream, aresponses_stream = _openai(
    "responses-stream", "responses.create", lambda events: "".join(
        event.delta for event in events if event.type == "response.output_text.delta"), stream=True, **RESPONSE)
responses_parse, aresponses_parse = _openai("responses-parse", "responses.parse", lambda r: r.output_text, **RESPONSE)


# -- anthropic ------------------------------------------------------------------------------
CLAUDE = {"model": "claude-3-5-haiku-latest", "max_tokens": 100, "messages": MESSAGES}


def _anthropic(id: str, how: str, is_async: bool) -> Scenario:
    """``messages.create`` (``how="create"``), ``create(stream=True)`` (``"events"``) or
    ``messages.stream`` (``"stream"``) on anthropic.Anthropic or AsyncAnthropic, read as text."""
    sdk = anthropic.AsyncAnthropic if is_async else anthropic.Anthropic

    async def call(server, **client):
        messages = sdk(base_url=server.base_url.removesuffix("/v1"), api_key="t", max_retries=0, **client).messages
        if how == "stream":
            if is_async:
                async with messages.stream(**CLAUDE) as stream:
                    return "".join([text async for text in stream.text_stream])
            with messages.stream(**CLAUDE) as stream:
                return "".join(stream.text_stream)
        result = messages.create(**CLAUDE, stream=how == "events")
        if is_async:
            result = await result
        if how == "create":
            return result.content[0].text
        events = [event async for event in result] if is_async else list(result)
        return "".join(e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta")

    return Scenario(id, call, anthropic.InternalServerError, anthropic.APITimeoutError, how != "create")


# -- litellm ----------------------------------------------------------------------------------
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch its price map
import litellm  # noqa: E402


def _litellm(id: str, function: str, model: str, read: Callable[[Any], Any], expect: Any = CONTENT,
             attempts: int = 1, **request: Any) -> Scenario:
    """``litellm.<function>(model=..., **request)`` against the fake server (``anthropic/`` models
    through litellm's own HTTP client, the rest through the openai SDK), read as text."""
    stream = request.get("stream") is True

    async def call(server, **client):
        base = server.base_url.removesuffix("/v1") if model.startswith("anthropic/") else server.base_url
        result = getattr(litellm, function)(model=model, api_base=base, api_key="t", max_retries=0, **client,
                                            **request)
        if function.startswith("a"):
            result = await result
            result = [chunk async for chunk in result] if stream else result
        return read(list(result) if stream else result)

    errors = (openai.InternalServerError, openai.APITimeoutError)
    if model.startswith("anthropic/"):
        errors = (litellm.InternalServerError, litellm.Timeout)
    return Scenario(id, call, *errors, stream, expect, attempts=attempts)


def _litellm_text(chunks):
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


_GPT, _HAIKU = "openai/gpt-4o-mini", "anthropic/claude-3-5-haiku-latest"
_LLM_EMBED = "openai/text-embedding-3-small"
lite_scenarios = {
    "completion": (
        _litellm("litellm", "completion", _GPT, _message, messages=MESSAGES),
        _litellm("litellm-stream", "completion", _GPT, _litellm_text, messages=MESSAGES, stream=True),
        _litellm("litellm-claude", "completion", _HAIKU, _message, messages=MESSAGES, max_tokens=50),
        _litellm("litellm-claude-stream", "completion", _HAIKU, _litellm_text, messages=MESSAGES, max_tokens=50,
                 stream=True),
    ),
    "acompletion": (
        _litellm("async-litellm", "acompletion", _GPT, _message, messages=MESSAGES),
        _litellm("async-litellm-stream", "acompletion", _GPT, _litellm_text, messages=MESSAGES, stream=True),
        _litellm("async-litellm-claude", "acompletion", _HAIKU, _message, messages=MESSAGES, max_tokens=50),
        _litellm("async-litellm-claude-stream", "acompletion", _HAIKU, _litellm_text, messages=MESSAGES,
                 max_tokens=50, stream=True),
    ),
    "embedding": (_litellm("litellm-embedding", "embedding", _LLM_EMBED, lambda r: r.data[0]["embedding"],
                           [0.1, 0.2, 0.3], attempts=3, input=["hello"]),),
    "aembedding": (_litellm("async-litellm-embedding", "aembedding", _LLM_EMBED, lambda r: r.data[0]["embedding"],
                            [0.1, 0.2, 0.3], attempts=3, input=["hello"]),),
}


# -- LangChain ------------------------------------------------------------------------------
def chat_model(server, **client) -> ChatOpenAI:
    # its own async HTTP client: langchain-openai's shared one is bound to the first test's loop
    return ChatOpenAI(model=MODEL, base_url=server.base_url, api_key="t", max_retries=0,
                      http_async_client=httpx.AsyncClient(), **client)


def completion_llm(server, **client) -> CompletionLLM:
    return CompletionLLM(model="gpt-3.5-turbo-instruct", base_url=server.base_url, api_key="t", max_retries=0,
                         http_async_client=httpx.AsyncClient(), **client)


class ChatStreamLLM(BaseLLM):
    """A user's own streaming LLM over an openai chat endpoint, for ``BaseLLM.stream/astream``:
    langchain_openai.OpenAI streams from /completions, which the fake server answers only as JSON."""

    base_url: str
    model_name: str = MODEL
    timeout: float | None = None

    @classmethod
    def serving(cls, server, **client) -> ChatStreamLLM:
        return cls(base_url=server.base_url, **client)

    @property
    def _llm_type(self) -> str:
        return "chat-stream"

    def _generate(self, prompts, stop=None, run_manager=None, **kwargs):
        raise NotImplementedError  # only its stream entries are driven

    def _client(self, sdk: type) -> Any:
        return sdk(base_url=self.base_url, api_key="t", max_retries=0, timeout=self.timeout).chat.completions

    def _stream(self, prompt, stop=None, run_manager=None, **kwargs):
        for chunk in self._client(openai.OpenAI).create(model=MODEL, messages=MESSAGES, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                yield GenerationChunk(text=chunk.choices[0].delta.content)

    async def _astream(self, prompt, stop=None, run_manager=None, **kwargs):
        async for chunk in await self._client(openai.AsyncOpenAI).create(model=MODEL, messages=MESSAGES, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                yield GenerationChunk(text=chunk.choices[0].delta.content)


def _langchain(id: str, make: Callable[..., Any], method: str) -> Scenario:
    """``make(server, **client).<method>("hello")``, read as text (a stream joined)."""

    async def call(server, **client):
        result = getattr(make(server, **client), method)("hello")
        if method == "ainvoke":
            result = await result
        elif method == "astream":
            result = [chunk async for chunk in result]
        text = lambda each: each if isinstance(each, str) else each.content
        return "".join(map(text, result)) if "stream" in method else text(result)

    return Scenario(id, call, openai.InternalServerError, openai.APITimeoutError, "stream" in method)


# -- MLflow deployments clients and judge transports (requests/urllib3, or openai underneath) --
def _mlflow(id: str, send: Callable[..., Any], on_500: type, on_timeout: type, variable: str = "",
            stream: bool = False, timeout: float = 1) -> Scenario:
    """``send(server, timeout)`` with the environment an MLflow user sets (``variable``: the
    timeout's setting), read as text (a stream of chunk dicts joined)."""

    async def call(server, timeout=None):
        values = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "DATABRICKS_HOST": server.base_url.removesuffix("/v1"),
                  "DATABRICKS_TOKEN": "t", "OPENAI_API_KEY": "t", "OPENAI_API_BASE": server.base_url}
        if timeout is not None and variable:
            values[variable] = str(int(timeout))
        with mock.patch.dict(os.environ, values):
            reply = send(server, timeout)
            if stream:
                return "".join(c["choices"][0]["delta"].get("content") or "" for c in reply if c["choices"])
            return reply["choices"][0]["message"]["content"]

    return Scenario(id, call, on_500, on_timeout, stream, timeout=timeout)


def openai_deployment(server, timeout):
    """OpenAIDeploymentClient's openai client has max_retries=5 and timeout=60 built in: here
    the config a user without retries (and the test's timeout) would have."""
    original = openai_deployments._get_api_config_without_openai_dep
    config = lambda: original()._replace(max_retries=0, timeout=timeout or 60.0)
    with mock.patch.object(openai_deployments, "_get_api_config_without_openai_dep", config):
        return get_deploy_client("openai").predict(endpoint=MODEL, inputs={"messages": MESSAGES})


def _judge(module: Any, name: str, **extra: Any) -> Callable[..., Any]:
    """MLflow's judge transport ``module.<name>``, looked up at call time (as MLflow does)."""
    return lambda server, timeout: getattr(module, name)(endpoint=f"{server.base_url}/chat/completions", headers={
        "Authorization": "Bearer t"}, payload={"model": MODEL, "messages": MESSAGES}, **extra)


PREDICT = {"endpoint": "chat", "inputs": {"messages": MESSAGES}}
PREDICT_TIMEOUT = "MLFLOW_DEPLOYMENT_PREDICT_TIMEOUT"
_CHAT_MOD, _COMPLETIONS, _EMBEDDINGS, _RESPONSES = (f"openai.resources.{name}" for name in (
    "chat.completions", "completions", "embeddings", "responses"))
_LC_CHAT, _LC_LLM = "langchain_core.language_models.chat_models", "langchain_core.language_models.llms"
_CLAUDE = "anthropic.resources.messages.messages"
SCENARIOS: dict[tuple[str, str], tuple[Scenario, ...]] = {
    **{("litellm", function): scenarios for function, scenarios in lite_scenarios.items()},
    (_CLAUDE, "Messages.create"): (_anthropic("claude", "create", False), _anthropic("claude-events", "events", False)),
    (_CLAUDE, "AsyncMessages.create"): (_anthropic("async-claude", "create", True),
                                        _anthropic("async-claude-events", "events", True)),
    (_CLAUDE, "Messages.stream"): (_anthropic("claude-stream", "stream", False),),
    (_CLAUDE, "AsyncMessages.stream"): (_anthropic("async-claude-stream", "stream", True),),
    (_CHAT_MOD, "Completions.create"): (chat, chat_stream),
    (_CHAT_MOD, "Completions.parse"): (chat_parse,),
    (_CHAT_MOD, "AsyncCompletions.create"): (achat, achat_stream),
    (_CHAT_MOD, "AsyncCompletions.parse"): (achat_parse,),
    (_COMPLETIONS, "Completions.create"): (completion,),
    (_COMPLETIONS, "AsyncCompletions.create"): (acompletion,),
    (_EMBEDDINGS, "Embeddings.create"): (embedding,),
    (_EMBEDDINGS, "AsyncEmbeddings.create"): (aembedding,),
    (_RESPONSES, "Responses.create"): (responses, responses_stream),
    (_RESPONSES, "Responses.parse"): (responses_parse,),
    (_RESPONSES, "AsyncResponses.create"): (aresponses, aresponses_stream),
    (_RESPONSES, "AsyncResponses.parse"): (aresponses_parse,),
    (_LC_CHAT, "BaseChatModel.generate"): (_langchain("lc-chat-invoke", chat_model, "invoke"),),
    (_LC_CHAT, "BaseChatModel.agenerate"): (_langchain("lc-chat-ainvoke", chat_model, "ainvoke"),),
    (_LC_CHAT, "BaseChatModel.stream"): (_langchain("lc-chat-stream", chat_model, "stream"),),
    (_LC_CHAT, "BaseChatModel.astream"): (_langchain("lc-chat-astream", chat_model, "astream"),),
    (_LC_LLM, "BaseLLM.generate"): (_langchain("lc-llm-invoke", completion_llm, "invoke"),),
    (_LC_LLM, "BaseLLM.agenerate"): (_langchain("lc-llm-ainvoke", completion_llm, "ainvoke"),),
    (_LC_LLM, "BaseLLM.stream"): (_langchain("lc-llm-stream", ChatStreamLLM.serving, "stream"),),
    (_LC_LLM, "BaseLLM.astream"): (_langchain("lc-llm-astream", ChatStreamLLM.serving, "astream"),),
    ("mlflow.deployments.mlflow", "MlflowDeploymentClient.predict"): (_mlflow(
        "gateway-predict", lambda server, _: get_deploy_client(server.base_url.removesuffix("/v1")).predict(**PREDICT),
        requests.HTTPError, MlflowException, PREDICT_TIMEOUT),),
    ("mlflow.deployments.databricks", "DatabricksDeploymentClient.predict"): (_mlflow(
        "databricks-predict", lambda *_: get_deploy_client("databricks").predict(**PREDICT),
        requests.HTTPError, requests.Timeout, PREDICT_TIMEOUT),),
    ("mlflow.deployments.databricks", "DatabricksDeploymentClient.predict_stream"): (_mlflow(
        "databricks-stream", lambda *_: list(get_deploy_client("databricks").predict_stream(**PREDICT)),
        requests.HTTPError, requests.Timeout, PREDICT_TIMEOUT, stream=True),),
    ("mlflow.deployments.openai", "OpenAIDeploymentClient.predict"): (_mlflow(
        "openai-deployment", openai_deployment, openai.InternalServerError, openai.APITimeoutError, timeout=0.2),),
    ("mlflow.genai.judges.adapters.gateway_adapter", "send_chat_request"): (_mlflow(
        "genai-judge", _judge(gateway_adapter, "send_chat_request", num_retries=0), ChatCompletionError,
        MlflowException, "MLFLOW_GATEWAY_ROUTE_TIMEOUT_SECONDS"),),
    ("mlflow.metrics.genai.model_utils", "_send_request"): (_mlflow(
        "legacy-judge", _judge(model_utils, "_send_request"), MlflowException, requests.Timeout,
        "MLFLOW_GENAI_EVAL_LLM_TIMEOUT"),),
}


# -- the matrix -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    spec: PatchSpec
    scenario: Scenario | None

    def need(self) -> Scenario:
        assert self.scenario is not None, (
            f"{self.spec.module}:{self.spec.attribute} is a guarded LLM entry without a scenario: add one to SCENARIOS")
        return self.scenario


def llm_specs() -> list[PatchSpec]:
    # an LLM entry reads requests with an endpoint (its wrapper the drivers', or its own around them)
    return [spec for table in TABLES for spec in table.PATCHES if spec.endpoint is not None]


ENTRIES = [
    pytest.param(Entry(spec, scenario), id=scenario.id if scenario else f"MISSING:{spec.module}:{spec.attribute}")
    for spec in llm_specs() for scenario in SCENARIOS.get((spec.module, spec.attribute), (None,))
]
_reached: list[str] = []  # calls that reached the entry's own SDK function in this test


@pytest.fixture(autouse=True)
def entry_spy(request, server):
    """Wrap the entry's SDK function beneath runguard's guard (``autolog()``, called in the
    test, wraps on top of it): a call that reaches it went through that entry's guard."""
    server.default = Reply(content=CONTENT)
    _reached.clear()
    entry = request.node.callspec.params.get("entry") if hasattr(request.node, "callspec") else None
    if entry is None:
        yield
        return

    def spy(wrapped, instance, args, kwargs):
        _reached.append(entry.spec.attribute)
        return wrapped(*args, **kwargs)

    handle = wrapt.wrap_function_wrapper(entry.spec.module, entry.spec.attribute, spy)
    try:
        yield
    finally:
        runguard.autolog(disable=True)  # runguard's wrapper, on top, comes off first
        wrapt.unwrap_object(entry.spec.module, entry.spec.attribute, handle)


@pytest.fixture
def lenient():
    """runguard's own failures degrade (as for users) instead of re-raising (tests' strict mode)."""
    _runtime.set_strict(False)
    yield
    _runtime.set_strict(True)


async def invoke(entry: Entry, server, refused: bool = False, **client_kwargs) -> Any:
    """Call the entry as its scenario does (streams consumed). Unless the call is to be refused,
    check that it went through the entry's own SDK function."""
    before = len(_reached)
    try:
        return await entry.need().call(server, **client_kwargs)
    finally:
        if not refused:
            assert len(_reached) > before, f"the scenario never called {entry.spec.attribute}"


def test_every_llm_entry_has_a_scenario_and_every_scenario_an_entry():
    keys = {(spec.module, spec.attribute) for spec in llm_specs()}
    assert sorted(keys - SCENARIOS.keys()) == []
    assert sorted(SCENARIOS.keys() - keys) == []


@pytest.mark.parametrize("entry", ENTRIES)
async def test_provider_500_reaches_the_caller_as_the_sdks_error(entry, server):
    scenario = entry.need()
    server.default = Reply(status=500)
    runguard.autolog()
    with pytest.raises(scenario.on_500):
        await invoke(entry, server)
    assert server.count() == scenario.attempts
    snapshot = runguard.current()
    assert (snapshot.calls, snapshot.requests) == (0, scenario.attempts)


@pytest.mark.parametrize("entry", ENTRIES)
async def test_client_timeout_reaches_the_caller_and_is_sent_once(entry, server):
    scenario = entry.need()
    server.default = Reply(delay=1.0 if scenario.timeout < 1 else 1.5)
    runguard.autolog()
    with pytest.raises(scenario.on_timeout):
        await invoke(entry, server, timeout=scenario.timeout)
    await asyncio.sleep(RETRY_WINDOW)  # a retry would have arrived by now
    assert server.count() == scenario.attempts
    snapshot = runguard.current()
    assert (snapshot.calls, snapshot.requests) == (0, scenario.attempts)


def _internal_errors(caplog, stage: str) -> list:
    return [r for r in caplog.records if r.name == "runguard_autolog" and f"internal error during {stage}" in
            r.getMessage()]


@pytest.mark.parametrize("entry", ENTRIES)
async def test_internal_error_before_the_call_sends_it_once_unguarded(entry, server, caplog, monkeypatch, lenient):
    scenario, broken = entry.need(), mock.Mock(side_effect=RuntimeError("a runguard bug"))
    monkeypatch.setattr(type(entry.spec.endpoint), "forecast", broken)
    runguard.autolog()
    with caplog.at_level(logging.WARNING, logger="runguard_autolog"):
        assert await invoke(entry, server) == scenario.expect
    assert broken.called
    assert server.count() == 1
    assert len(_internal_errors(caplog, "preflight")) == 1


@pytest.mark.parametrize("entry", ENTRIES)
async def test_internal_error_after_the_call_returns_the_result_and_counts_it(entry, server, caplog, monkeypatch,
                                                                               lenient):
    scenario, broken = entry.need(), mock.Mock(side_effect=RuntimeError("a runguard bug"))
    # the readers of what came back: a stream's chunks, else the reply (``reply`` reads its usage)
    for reader in ("chunk_text",) if scenario.stream else ("reply", "usage"):
        monkeypatch.setattr(type(entry.spec.endpoint), reader, broken)
    runguard.autolog()
    with caplog.at_level(logging.WARNING, logger="runguard_autolog"):
        assert await invoke(entry, server) == scenario.expect
    assert broken.called
    assert server.count() == 1
    assert runguard.current().calls == 1
    assert len(_internal_errors(caplog, "stream accounting" if scenario.stream else "settle")) == 1


@pytest.mark.parametrize("entry", ENTRIES)
async def test_a_failing_recorder_never_replaces_the_trip(entry, server, monkeypatch, lenient):
    scenario, down = entry.need(), OSError("the recorder's store is down")
    events = mock.Mock(**{"tripped.side_effect": down, "refused.side_effect": down, "run_info.return_value": None})
    runguard.autolog(max_calls=1)
    monkeypatch.setattr(_runtime.RUNTIME, "events", events)
    assert await invoke(entry, server) == scenario.expect
    with pytest.raises(runguard.RunGuardTripped) as caught:
        await invoke(entry, server, refused=True)
    assert caught.value.limit == "max_calls"
    assert events.refused.called
    assert server.count() == 1


@pytest.mark.parametrize("entry", ENTRIES)
async def test_a_raising_on_trip_stops_the_call(entry, server):
    scenario, seen = entry.need(), []

    def on_trip(error):
        seen.append(error)
        raise ValueError("stop")

    runguard.autolog(max_calls=1, on_trip=on_trip)
    assert await invoke(entry, server) == scenario.expect
    with pytest.raises(ValueError, match="^stop$"):
        await invoke(entry, server, refused=True)
    assert [error.limit for error in seen] == ["max_calls"]
    assert server.count() == 1


@pytest.mark.parametrize("entry", ENTRIES)
async def test_an_unreachable_shared_store_refuses_before_sending(entry, server):
    entry.need()
    runguard.autolog(store=f"redis://127.0.0.1:{free_port()}/0", shared_budget=f"matrix-{uuid.uuid4().hex[:10]}",
                     shared_max_calls=5, max_calls="none")
    with pytest.raises(runguard.RunGuardTripped) as caught:
        await invoke(entry, server, refused=True)
    assert caught.value.limit == "store_outage"
    assert server.count() == 0


@pytest.fixture(scope="module")
def refusing_store():
    """A real Redis that answers every script with an error (NOPERM: a user without the right)."""
    import redis

    admin = redis.Redis.from_url(REDIS_URL)
    user = f"matrix-{uuid.uuid4().hex[:8]}"
    admin.acl_setuser(user, enabled=True, passwords=["+matrix-pw"], keys=["*"], commands=["-@all", "+ping"])
    host, port = admin.connection_pool.connection_kwargs["host"], admin.connection_pool.connection_kwargs["port"]
    yield f"redis://{user}:matrix-pw@{host}:{port}/0"
    admin.acl_deluser(user)


@pytest.mark.skipif(not REDIS_URL, reason="needs a redis-server (Debian package redis-server; .ci/run starts one "
                                          "and sets RG_TEST_REDIS_URL)")
@pytest.mark.parametrize("entry", ENTRIES)
async def test_a_shared_store_answering_errors_refuses_before_sending(entry, server, refusing_store):
    entry.need()
    runguard.autolog(store=refusing_store, shared_budget=f"matrix-{uuid.uuid4().hex[:10]}", shared_max_calls=5,
                     max_calls="none")
    with pytest.raises(runguard.RunGuardTripped) as caught:
        await invoke(entry, server, refused=True)
    assert caught.value.limit == "store_outage"
    assert "matrix-pw" not in str(caught.value)
    assert server.count() == 0
