"""MLflow deployments clients (``mlflow.deployments.get_deploy_client(...)``): the AI
Gateway (``MlflowDeploymentClient``), Databricks serving and the OpenAI client.

Each concrete client overrides ``predict`` (Databricks also ``predict_stream``), so those
are patched, with the same guard as the openai SDK. Requests and replies are
OpenAI-shaped dicts. A gateway route names no model, so a route is priced by the model
its first reply names (learned once per route); until then its calls count tokens but
not cost.

Retries: MLflow's ``http_request`` retries 429/500/502/503 inside urllib3 (its
``Retry``, 7 times by default, minutes of backoff). urllib3's per-attempt
``HTTPConnectionPool._make_request`` is wrapped so each attempt of a guarded
``predict`` counts, and a trip stops the retry loop (see ``_attempts``). MLflow wraps
whatever the transport raises in ``MlflowException``; the guard re-raises the trip.
"""

from __future__ import annotations

import io
from typing import Any

from .. import pricing, tokens
from .._attempts import Reader, sync_attempt
from .._call import Endpoint, Usage
from .._patching import PatchSpec
from .._runtime import RUNTIME

NAME = "mlflow_deployments"
TARGET_MODULE = "mlflow.deployments"

_route_models: dict[str, str] = {}  # gateway route -> the model its replies name
RUNTIME.on_reset(_route_models.clear)


class DeploymentsEndpoint(Endpoint):
    """How to read a deployments client's ``predict(endpoint=..., inputs={...})``; the request
    is its arguments as keywords (``names``: the positional parameters, in order)."""

    reads_arguments = True
    learns = True

    http_via_urllib3 = True  # its attempts are urllib3's (MLflow's http_request)

    def __init__(
        self, name: str, names: tuple[str, ...] = ("deployment_name", "inputs", "endpoint"), streaming: bool = False
    ) -> None:
        self.name = name
        self.names = names
        self.streaming = streaming
        self.provider = "openai"  # the gateway answers in OpenAI's shape; prices by model name
        self.prices = pricing.table_for(self.provider)

    def request(self, instance: Any, args: tuple, kwargs: dict) -> dict:
        named = dict(zip(self.names, args))
        named.update(kwargs)
        return named

    def forecast(self, kwargs: dict) -> tuple[str, int, int]:
        route = kwargs.get("endpoint") or kwargs.get("deployment_name") or ""
        inputs = kwargs.get("inputs")
        if not isinstance(inputs, dict):
            inputs = {}
        model = inputs.get("model") or _route_models.get(route) or str(route)
        messages = inputs.get("messages")
        if isinstance(messages, list):
            prompt = tokens.messages_tokens(messages, model)
            prompt += tokens.tools_tokens(inputs.get("tools"), model)
        else:
            prompt = tokens.input_tokens(inputs.get("prompt", inputs.get("input")), model)
        cap = 0
        for name in ("max_completion_tokens", "max_tokens"):
            value = inputs.get(name)
            if type(value) is int and value > 0:
                cap = value
                break
        choices = inputs.get("n")
        if type(choices) is int and choices > 1:
            cap *= choices
        return model, prompt, cap

    def usage(self, result: Any) -> tuple[int, int, int] | None:
        usage = result.get("usage") if isinstance(result, dict) else None
        if not isinstance(usage, dict):
            return None
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        output = usage.get("completion_tokens", usage.get("output_tokens")) or 0
        details = usage.get("prompt_tokens_details")
        cached = (details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
        if prompt is None:
            return None
        if not all(type(v) in (int, float) and v >= 0 for v in (prompt, output, cached)):
            raise TypeError(f"unexpected usage shape from a deployments client: {usage!r:.200}")
        return prompt, output, cached

    def learn(self, request: dict, result: Any) -> None:
        """A gateway route names no model: price it by the model its first reply names."""
        route = request.get("endpoint")
        if isinstance(result, dict) and isinstance(result.get("model"), str) and isinstance(route, str):
            _route_models.setdefault(route, result["model"])

    def payload(self, kwargs: dict) -> Any:
        inputs = kwargs.get("inputs")
        if not isinstance(inputs, dict):
            return None
        return {
            "route": kwargs.get("endpoint"),
            "messages": inputs.get("messages"),
            "prompt": inputs.get("prompt"),
            "tools": inputs.get("tools"),
        }

    def tool_calls(self, result: Any) -> list[tuple[Any, Any]]:
        found = []
        for choice in (result.get("choices") if isinstance(result, dict) else None) or ():
            message = choice.get("message") if isinstance(choice, dict) else None
            for call in (message or {}).get("tool_calls") or ():
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    found.append((function.get("name"), function.get("arguments")))
        return found

    # -- stream chunks (Databricks predict_stream: OpenAI-shaped dict chunks) ---------------
    def chunk_usage(self, chunk: Any, usage: Usage | None) -> Usage | None:
        return self.usage(chunk) if isinstance(chunk, dict) and chunk.get("usage") else usage

    def chunk_text(self, chunk: Any) -> str:
        text = ""
        for choice in (chunk.get("choices") if isinstance(chunk, dict) else None) or ():
            delta = choice.get("delta") or {}
            text += tokens.text_of(delta.get("content")) if isinstance(delta, dict) else ""
        return text

    def chunk_tool_calls(self, chunk: Any, into: dict) -> None:
        for choice in (chunk.get("choices") if isinstance(chunk, dict) else None) or ():
            delta = choice.get("delta") or {}
            for call in (delta.get("tool_calls") if isinstance(delta, dict) else None) or ():
                function = call.get("function") or {}
                entry = into.setdefault((choice.get("index"), call.get("index")), ["", ""])
                entry[0] += function.get("name") or ""
                entry[1] += function.get("arguments") or ""


PREDICT = DeploymentsEndpoint("mlflow.deployments.predict")
PREDICT_STREAM = DeploymentsEndpoint("mlflow.deployments.predict_stream")


class Urllib3Reader(Reader):
    """urllib3 responses as ``requests`` (under MLflow's ``http_request``) receives them."""

    status_attribute = "status"

    def header(self, response: Any, name: str) -> str | None:
        return response.headers.get(name)

    def text(self, response: Any) -> tuple[Any, str]:
        """Read the body, then hand back an equivalent response holding it (``requests``
        streams bodies, so the one read here would otherwise arrive empty). The connection
        goes with it, so it returns to the pool exactly once."""
        import urllib3

        raw = response.read(decode_content=False, cache_content=False)
        replacement = urllib3.HTTPResponse(
            body=io.BytesIO(raw),
            headers=response.headers,
            status=response.status,
            version=response.version,
            reason=response.reason,
            preload_content=False,
            decode_content=response.decode_content,
            retries=response.retries,
            request_method=getattr(response, "_request_method", None),
            request_url=response.url,
            enforce_content_length=False,
            pool=response._pool,
            connection=response._connection,
        )
        response._connection = None
        return replacement, raw.decode("utf-8", "replace")

    def close(self, response: Any) -> None:
        response.close()


def _requests_based_call():
    call = RUNTIME.in_sync_call.call
    return call if call is not None and getattr(call.endpoint, "http_via_urllib3", False) else None


# every urllib3 attempt of a guarded call whose endpoint posts through ``requests``; shared
# with the evaluation judges (installing a spec twice is a no-op)
URLLIB3_ATTEMPTS = PatchSpec(
    "urllib3.connectionpool",
    "HTTPConnectionPool._make_request",
    wrapper=sync_attempt(Urllib3Reader(), _requests_based_call),
)

PATCHES = (
    PatchSpec("mlflow.deployments.mlflow", "MlflowDeploymentClient.predict", PREDICT),
    PatchSpec("mlflow.deployments.databricks", "DatabricksDeploymentClient.predict", PREDICT),
    PatchSpec(
        "mlflow.deployments.databricks", "DatabricksDeploymentClient.predict_stream", PREDICT_STREAM, lazy_stream=True
    ),
    PatchSpec("mlflow.deployments.openai", "OpenAIDeploymentClient.predict", PREDICT),
    URLLIB3_ATTEMPTS,
)
