"""LangChain and LangGraph: every chat model / LLM call, through a callback handler.

Meeting point: like ``mlflow.langchain.autolog()``, runguard patches
``BaseCallbackManager.__init__`` so every callback manager LangChain builds carries
runguard's handler (one shared instance, so ``merge`` and child managers never hold it
twice). The handler runs inline and with ``raise_error``: a trip raised from
``on_chat_model_start`` / ``on_llm_start`` propagates out of the user's ``invoke`` /
``stream`` / ``batch`` (sync or async) before the request is made.

Counted once: while a LangChain model call is in flight, the handler marks it in the
context, so the patched openai SDK underneath (``ChatOpenAI``) passes straight through.
Usage settles from the ``AIMessage``'s ``usage_metadata`` (else ``llm_output``); the tool
calls the model asks for feed the loop watch; ``on_tool_start`` refuses to run a tool
once the unit of work has tripped.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from .. import pricing, tokens
from .._guard import IN_CALL, admit, in_flight, release_quietly, settle_quietly, trip_exception, watch_tool_calls
from .._errors import RunGuardTripped
from .._loops import observe_tool_calls
from .._patching import PatchSpec
from .._runtime import RUNTIME, internal_error
from .._scopes import current_charges

NAME = "langchain"
TARGET_MODULE = "langchain_core"

# LangChain's ls_provider -> genai-prices provider id (None: search every provider)
_PROVIDERS = {
    "openai": "openai", "azure": "azure", "anthropic": "anthropic", "google_genai": "google",
    "google_vertexai": "google", "mistralai": "mistral", "groq": "groq", "deepseek": "deepseek",
    "xai": "x-ai", "bedrock": "aws", "amazon_bedrock": "aws", "cohere": "cohere", "together": "together",
    "fireworks": "fireworks",
}
_INF = float("inf")


class LangChainEndpoint:
    """How to read a LangChain model call: the request from the callback's arguments, the
    response from its ``LLMResult``. ``kwargs`` here is what the handler gathered."""

    __slots__ = ("name", "kind", "provider", "prices")

    def __init__(self, kind: str, provider: str | None) -> None:
        self.name = "langchain.chat_model" if kind == "chat" else "langchain.llm"
        self.kind = kind
        self.provider = provider
        self.prices = pricing.table_for(provider)

    def forecast(self, kwargs: dict) -> tuple[str, int, int]:
        model = kwargs["model"]
        if self.kind == "chat":
            prompt = tokens.messages_tokens(kwargs["messages"], model)
        else:
            prompt = sum(tokens.input_tokens(text, model) for text in kwargs["messages"])
        if kwargs.get("tools"):
            prompt += tokens.tools_tokens(kwargs["tools"], model)
        return model, prompt, kwargs["cap"]

    def request_payload(self, kwargs: dict) -> Any:
        return {"messages": kwargs["messages"], "tools": kwargs.get("tools")}

    @staticmethod
    def usage(response: Any) -> tuple[int, int, int] | None:
        """(input, output, cached input) tokens of an ``LLMResult``, ``None`` when absent."""
        found = None
        for generations in response.generations or ():
            for generation in generations:
                meta = getattr(getattr(generation, "message", None), "usage_metadata", None)
                if meta:
                    details = meta.get("input_token_details") or {}
                    found = found or [0, 0, 0]
                    found[0] += int(meta.get("input_tokens") or 0)
                    found[1] += int(meta.get("output_tokens") or 0)
                    found[2] += int(details.get("cache_read") or 0)
        if found is not None:
            return tuple(found)
        usage = (response.llm_output or {}).get("token_usage") or (response.llm_output or {}).get("usage")
        if isinstance(usage, dict) and ("prompt_tokens" in usage or "input_tokens" in usage):
            prompt = int(usage.get("prompt_tokens", usage.get("input_tokens")) or 0)
            output = int(usage.get("completion_tokens", usage.get("output_tokens")) or 0)
            return prompt, output, 0
        return None

    @staticmethod
    def tool_calls(response: Any) -> list[tuple[str, Any, Any]]:
        """(name, arguments, id) of each tool call the model asked for."""
        found = []
        for generations in response.generations or ():
            for generation in generations:
                for call in getattr(getattr(generation, "message", None), "tool_calls", None) or ():
                    found.append((call.get("name"), call.get("args"), call.get("id")))
        return found


_endpoints: dict[tuple[str, str | None], LangChainEndpoint] = {}


def _endpoint(kind: str, provider: str | None) -> LangChainEndpoint:
    key = (kind, provider)
    endpoint = _endpoints.get(key)
    if endpoint is None:
        endpoint = _endpoints.setdefault(key, LangChainEndpoint(kind, provider))
    return endpoint


def _request(messages: Any, kwargs: dict) -> tuple[str, str | None, int, Any]:
    """(model, provider, output cap, tools) from a callback's ``invocation_params``/``metadata``."""
    params = kwargs.get("invocation_params") or {}
    metadata = kwargs.get("metadata") or {}
    model = params.get("model") or params.get("model_name") or metadata.get("ls_model_name") or ""
    provider = _PROVIDERS.get(metadata.get("ls_provider") or "")
    cap = 0
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = params.get(name)
        if type(value) is int and value > 0:
            cap = value
            break
    else:
        value = metadata.get("ls_max_tokens")
        if type(value) is int and value > 0:
            cap = value
    choices = params.get("n")
    if type(choices) is int and choices > 1:
        cap *= choices
    return str(model), provider, cap, params.get("tools")


class RunGuardCallbackHandler:
    """Checks each LangChain model call before it is made and settles it after."""

    # BaseCallbackHandler's switches, as plain attributes (the base class is mixed in below)
    raise_error = True
    run_inline = True
    ignore_chain = True
    ignore_agent = False  # LangChain dispatches on_tool_start under this switch
    ignore_retriever = True
    ignore_retry = True
    ignore_custom_event = True

    def __init__(self) -> None:
        self._calls: dict[Any, tuple[Any, Any]] = {}  # run_id -> (Call, context token)
        self._counted: OrderedDict = OrderedDict()  # tool-call ids already seen in a reply
        self._lock = threading.Lock()

    # -- model calls -------------------------------------------------------------------------
    def on_chat_model_start(self, serialized: Any, messages: list, *, run_id: Any, **kwargs: Any) -> None:
        self._start("chat", [m for batch in messages for m in batch], run_id, kwargs)

    def on_llm_start(self, serialized: Any, prompts: list, *, run_id: Any, **kwargs: Any) -> None:
        self._start("completion", list(prompts), run_id, kwargs)

    def _start(self, kind: str, messages: list, run_id: Any, kwargs: dict) -> None:
        if not RUNTIME.enabled or in_flight() is not None:
            return  # off, or nested in a call already guarded: counted once
        try:
            model, provider, cap, tools = _request(messages, kwargs)
            call = admit(_endpoint(kind, provider), {"model": model, "messages": messages, "cap": cap, "tools": tools})
        except RunGuardTripped:
            raise
        except Exception as error:
            internal_error("langchain preflight", error)
            return
        token = IN_CALL.set(call)
        with self._lock:
            self._calls[run_id] = (call, token)

    def _pop(self, run_id: Any):
        with self._lock:
            entry = self._calls.pop(run_id, None)
        if entry is None:
            return None
        call, token = entry
        try:
            IN_CALL.reset(token)
        except ValueError:  # ended in another context (a stream consumed elsewhere)
            IN_CALL.set(None)
        return call

    def on_llm_end(self, response: Any, *, run_id: Any, **kwargs: Any) -> None:
        call = self._pop(run_id)
        if call is None:
            return
        try:
            usage = call.endpoint.usage(response)
        except Exception as error:
            usage = None
            internal_error("langchain usage", error)
        settle_quietly(call, usage)  # no usage: charged its forecast (logged once)
        if call.loop_repeats != _INF:
            try:
                found = call.endpoint.tool_calls(response)
                if found:
                    with self._lock:
                        for _, _, call_id in found:
                            if call_id:
                                self._counted[call_id] = None
                        while len(self._counted) > 1024:
                            self._counted.popitem(last=False)
                    watch_tool_calls(call, [(name, args) for name, args, _ in found])
            except Exception as error:
                internal_error("langchain loop detection", error)

    def on_llm_error(self, error: BaseException, *, run_id: Any, **kwargs: Any) -> None:
        call = self._pop(run_id)
        if call is not None:
            release_quietly(call)

    # -- tools -------------------------------------------------------------------------------
    def on_tool_start(self, serialized: Any, input_str: str, *, run_id: Any, inputs: Any = None,
                      tool_call_id: Any = None, **kwargs: Any) -> None:
        """Refuse to run a tool once the unit of work has tripped (a loop found in the reply
        that asked for it, say); a tool call no reply showed is watched here."""
        if not RUNTIME.enabled:
            return
        try:
            charges, limits = current_charges()
            scope = charges[-1][0]
            with self._lock:
                counted = tool_call_id is not None and self._counted.pop(tool_call_id, False) is None
            if not counted and limits["loop_repeats"] != _INF:
                name = (serialized or {}).get("name") or kwargs.get("name") or "tool"
                trip = observe_tool_calls(scope, [(name, inputs if inputs is not None else input_str)],
                                          limits["loop_repeats"])
                if trip is not None and RUNTIME.store.trip(scope, trip) is trip:
                    from .. import _recording

                    _recording.tripped(trip, scope)
            tripped = scope.tripped
        except Exception as error:
            internal_error("langchain tool check", error)
            return
        if tripped is not None and limits["on_trip"] == "raise":
            raise trip_exception(tripped)


def _handler_class():
    """The handler as a real ``BaseCallbackHandler`` (langchain-core is imported by now)."""
    from langchain_core.callbacks import BaseCallbackHandler

    return type("RunGuardCallbackHandler", (RunGuardCallbackHandler, BaseCallbackHandler), {})


HANDLER: Any = None


def _manager_init(wrapped, instance, args, kwargs):
    wrapped(*args, **kwargs)
    try:
        if RUNTIME.enabled and HANDLER is not None and type(instance).__module__ != "langgraph.callbacks":
            instance.add_handler(HANDLER, inherit=True)  # one shared instance: never added twice
    except Exception as error:
        internal_error("langchain callback manager", error)


PATCHES = (PatchSpec("langchain_core.callbacks.base", "BaseCallbackManager.__init__", wrapper=_manager_init),)


def on_install() -> None:
    global HANDLER
    if HANDLER is None:
        HANDLER = _handler_class()()
