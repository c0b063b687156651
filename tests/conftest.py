"""Shared fixtures: strict mode on, a loopback fake OpenAI server, a temp sqlite MLflow store,
and a clean breaker after every test."""

from __future__ import annotations

import os

# Air-gapped MLflow: no catalog download, no telemetry, dead servers fail in seconds.
os.environ.setdefault("MLFLOW_MODEL_CATALOG_URI", "")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
os.environ["_RUNGUARD_STRICT"] = "1"

import httpx
import openai
import pytest

import runguard_autolog as runguard
from runguard_autolog import _recording, _runtime
from runguard_autolog.testing import FakeOpenAIServer

MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello"}]


@pytest.fixture(scope="session")
def _server():
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture
def server(_server):
    _server.reset()
    yield _server
    _server.reset()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=0)


@pytest.fixture
def async_client(server):
    return openai.AsyncOpenAI(base_url=server.base_url, api_key="test", max_retries=0)


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    """A real MLflow sqlite tracking store in a temp dir."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("runguard-tests")
    yield uri
    _recording.flush(10)  # runguard's pending writes (e.g. a refused-call span) go to this store
    mlflow.flush_trace_async_logging()
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def _clean():
    runguard.autolog(disable=True)
    _recording.flush(10)
    _runtime.RUNTIME.reset()
    _runtime.set_strict(True)


# litellm, once imported, points TIKTOKEN_CACHE_DIR at the encodings it ships and loads one:
# each test starts from what the machine itself offers (token counts are exact only with an
# encoding available offline, else the documented estimate)
_TIKTOKEN_CACHE_DIR = os.environ.get("TIKTOKEN_CACHE_DIR")


def _offline_tiktoken_as_at_start(monkeypatch) -> None:
    import tiktoken.registry

    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    if _TIKTOKEN_CACHE_DIR is None:
        monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    else:
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", _TIKTOKEN_CACHE_DIR)


@pytest.fixture(autouse=True)
def clean_breaker(monkeypatch):
    for name in list(os.environ):
        if name.startswith("RUNGUARD_"):
            monkeypatch.delenv(name)
    _offline_tiktoken_as_at_start(monkeypatch)
    _clean()
    yield
    try:
        import mlflow

        mlflow.openai.autolog(disable=True)
    except Exception:
        pass
    _clean()


@pytest.fixture
def private_redis(tmp_path):
    """A redis-server of this test's own (Debian's package), which it may stop, freeze, pause or
    put to sleep (DEBUG SLEEP is enabled from 127.0.0.1)."""
    import shutil

    from ._servers import RedisServer

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian package redis-server; .ci/run installs it)")
    redis_server = RedisServer(tmp_path, None, "--enable-debug-command", "local").start()
    yield redis_server
    redis_server.stop()


def wait_for(predicate, timeout: float = 3.0) -> bool:
    """Whether ``predicate()`` comes true within ``timeout`` s (the fake server counts a stream
    cut or finished once its write fails or ends, which a client can see first)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def chat(client, **kwargs):
    return client.chat.completions.create(model=kwargs.pop("model", MODEL), messages=kwargs.pop("messages", MESSAGES), **kwargs)


def mock_client(handler) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://mock/v1", api_key="test", max_retries=0,
                         http_client=httpx.Client(transport=httpx.MockTransport(handler)))
