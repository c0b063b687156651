"""MLflow evaluation: the pre-run check on ``mlflow.evaluate`` / ``mlflow.genai.evaluate``,
and the judge requests MLflow sends through its own transport.

Entry points: every binding a user calls is patched (``mlflow.genai.evaluate`` is the
same function as ``mlflow.genai.evaluation.base.evaluate`` under three names;
``mlflow.evaluate`` is a deprecation wrapper around ``mlflow.models.evaluate``, which has
three names too), so each call path passes exactly one wrapper; an evaluation started by
``runguard.guarded_evaluate`` is not checked twice.

Judges: with ``openai:/`` judge models and no litellm, MLflow posts with ``requests``:
``mlflow.genai`` judges through ``send_chat_request`` (its own loop of up to 1 + 10
attempts on 429/5xx), ``make_genai_metric`` through ``model_utils._send_request``. Each
is guarded as one LLM call; each HTTP attempt under it counts (urllib3, see
``_attempts``). Those modules are patched when first imported.
"""

from __future__ import annotations

from typing import Any

from .. import tokens
from .._errors import tripped_in
from .._evaluation import guard_genai_evaluate, guard_legacy_evaluate
from .._patching import PatchSpec
from .mlflow_deployments import URLLIB3_ATTEMPTS, DeploymentsEndpoint

NAME = "mlflow_evaluation"
TARGET_MODULE = "mlflow"


class JudgeEndpoint(DeploymentsEndpoint):
    """A judge request: an OpenAI chat payload posted by MLflow, a dict reply."""

    __slots__ = ()

    def forecast(self, kwargs: dict) -> tuple[str, int, int]:
        payload = kwargs.get("payload")
        if not isinstance(payload, dict):
            payload = {}
        model = str(payload.get("model") or "")
        messages = payload.get("messages")
        prompt = tokens.messages_tokens(messages, model) if isinstance(messages, list) else 0
        prompt += tokens.tools_tokens(payload.get("tools"), model)
        cap = payload.get("max_completion_tokens") or payload.get("max_tokens")
        return model, prompt, cap if type(cap) is int and cap > 0 else 0

    learns = False  # a judge's reply says nothing about a route

    def payload(self, kwargs: dict) -> Any:
        return None  # a judge asked the same question twice is not an agent loop

    def tool_calls(self, result: Any) -> list:
        return []  # a trace judge's tool calls read the trace; they are not the agent's


GENAI_JUDGE = JudgeEndpoint("mlflow.genai.judge", ("endpoint", "headers", "payload", "num_retries"))
LEGACY_JUDGE = JudgeEndpoint("mlflow.metrics.genai.judge", ("endpoint", "headers", "payload"))


def _trip_is_not_a_rate_limit(wrapped, instance, args, kwargs):
    """MLflow's evaluation harness retries a scorer whose error looks like a rate limit (it
    matches "429" in the message, which a ``max_consecutive_429s`` trip carries), sleeping
    1 + 2 + 4 s first. A refusal does not pass by waiting."""
    error = args[0] if args else kwargs.get("exc")
    if isinstance(error, BaseException) and tripped_in(error) is not None:  # MLflow's adapters wrap it
        return False
    return wrapped(*args, **kwargs)


_GENAI_EVALUATE = ("mlflow.genai", "mlflow.genai.evaluation", "mlflow.genai.evaluation.base")
_LEGACY_EVALUATE = ("mlflow", "mlflow.models", "mlflow.models.evaluation", "mlflow.models.evaluation.base")

PATCHES = (
    *(PatchSpec(module, "evaluate", wrapper=guard_genai_evaluate) for module in _GENAI_EVALUATE),
    *(PatchSpec(module, "evaluate", wrapper=guard_legacy_evaluate) for module in _LEGACY_EVALUATE),
    PatchSpec("mlflow.genai.judges.adapters.gateway_adapter", "send_chat_request", GENAI_JUDGE, lazy=True),
    PatchSpec("mlflow.metrics.genai.model_utils", "_send_request", LEGACY_JUDGE, lazy=True),
    PatchSpec(
        "mlflow.genai.evaluation.rate_limiter", "is_rate_limit_error", lazy=True, wrapper=_trip_is_not_a_rate_limit
    ),
    URLLIB3_ATTEMPTS,
)
