"""LangChain and LangGraph: every chat model / LLM call, and every tool run.

Meeting point: the language model's own entry points, not its callbacks.
``BaseChatModel.generate``/``agenerate`` are where ``invoke``, ``ainvoke``, ``batch`` and
``abatch`` meet; ``stream``/``astream`` bypass them, so they are patched too (and the
same for ``BaseLLM``). ``mlflow.langchain.autolog()`` instead injects a callback handler
into every ``BaseCallbackManager``; runguard tried that first, but merely having a
handler on every manager makes LangChain do run bookkeeping for every runnable in a
graph: about 66 us per agent turn for a handler that does nothing, more than this guard's
whole budget. A trip raised here leaves the user's ``invoke`` as ``RunGuardTripped``
before the request is made, whatever callbacks are attached.

This module only reads: the guarded-call protocol (admission, settling, streams cut
mid-flight, failures) is ``_guard``'s and ``_streams``'s. Counted once: while a LangChain
model call is in flight it is marked, so the patched openai SDK underneath
(``ChatOpenAI``) passes straight through. A ``generate`` over a batch of prompts is one
admission of that many calls (all or none). Usage settles from the ``AIMessage``'s
``usage_metadata`` (else ``llm_output``); the tool calls the model asks for feed the loop
watch; ``BaseTool.run``/``arun`` refuse to run a tool once the unit of work has tripped,
so a repeated tool call is stopped before the tool runs again (LangGraph's default
``ToolNode`` error handling re-raises the trip).
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from typing import Any

from .. import pricing, tokens
from .._call import Endpoint, Usage, open_circuit
from .._errors import RunGuardTripped
from .._loops import observe_tool_calls
from .._patching import PatchSpec
from .._runtime import RUNTIME, internal_error
from .._scopes import current_charges

NAME = "langchain"
TARGET_MODULE = "langchain_core"

# LangChain's ls_provider -> genai-prices provider id (None: search every provider)
_PROVIDERS = {
    "openai": "openai",
    "azure": "azure",
    "anthropic": "anthropic",
    "google_genai": "google",
    "google_vertexai": "google",
    "mistralai": "mistral",
    "groq": "groq",
    "deepseek": "deepseek",
    "xai": "x-ai",
    "bedrock": "aws",
    "amazon_bedrock": "aws",
    "cohere": "cohere",
    "together": "together",
    "fireworks": "fireworks",
}
_INF = float("inf")

_counted: OrderedDict = OrderedDict()  # ids of tool calls already seen in a reply (bounded)
_counted_lock = threading.Lock()
_providers: dict[type, str | None] = {}  # model class -> genai-prices provider
RUNTIME.on_reset(_counted.clear)
RUNTIME.on_reset(_providers.clear)
RUNTIME.fork_safe(sys.modules[__name__], "_counted_lock", threading.Lock)


def _provider_of(instance: Any) -> str | None:
    """A model class's provider, read from its LangSmith params once per class (they cost
    ~17 us a call)."""
    cls = type(instance)
    if cls not in _providers:
        try:
            ls_provider = (instance._get_ls_params() or {}).get("ls_provider")
        except Exception:
            ls_provider = None
        _providers[cls] = _PROVIDERS.get(ls_provider or "")
    return _providers[cls]


def _announce(tool_calls: list) -> None:
    """Remember the ids of tool calls a reply asked for: running them is not a new loop step."""
    with _counted_lock:
        for entry in tool_calls:
            if len(entry) > 2 and entry[2]:
                _counted[entry[2]] = None
        while len(_counted) > 1024:
            _counted.popitem(last=False)


class LangChainEndpoint(Endpoint):
    """How to read a LangChain model call. Its request is a dict: ``model``, ``prompts`` (one
    message list, or one string for an LLM, per model call), ``cap``, ``tools``, ``provider``."""

    reads_arguments = True
    batched = True

    def __init__(self, kind: str, mode: str) -> None:
        self.name = "langchain.chat_model" if kind == "chat" else "langchain.llm"
        self.kind = kind  # "chat" or "completion"
        self.mode = mode  # "generate" or "stream"
        self.prices: dict = {}  # priced per call by the model class's provider (see rates)

    def request(self, instance: Any, args: tuple, kwargs: dict) -> dict:
        if self.mode == "stream":
            source = args[0] if args else kwargs.get("input")
            prompt = instance._convert_input(source)
            prompts = [prompt.to_messages() if self.kind == "chat" else prompt.to_string()]
        else:
            prompts = list(args[0] if args else kwargs.get("messages", kwargs.get("prompts")) or ())
        fields = instance.__dict__  # model fields (reading a missing pydantic attribute is slow)
        model = kwargs.get("model") or fields.get("model_name") or fields.get("model") or fields.get("model_id") or ""
        cap = (
            kwargs.get("max_completion_tokens")
            or kwargs.get("max_tokens")
            or fields.get("max_completion_tokens")
            or fields.get("max_tokens")
            or fields.get("max_output_tokens")
        )
        if type(cap) is not int or cap < 0:
            cap = 0
        choices = kwargs.get("n") or fields.get("n")
        if type(choices) is int and choices > 1:
            cap *= choices
        return {
            "model": str(model),
            "prompts": prompts,
            "cap": cap,
            "tools": kwargs.get("tools"),
            "provider": _provider_of(instance),
        }

    def rates(self, model: str, request: Any) -> Any:
        return pricing.rates_for(model, request["provider"])

    def forecast(self, request: dict) -> tuple[str, int, int]:
        model = request["model"]
        prompt = 0
        for each in request["prompts"]:
            if self.kind == "chat":
                prompt += tokens.messages_tokens(each, model)
            else:
                prompt += tokens.input_tokens(each, model)
        if request["tools"]:
            prompt += tokens.tools_tokens(request["tools"], model) * len(request["prompts"])
        return model, prompt, request["cap"] * len(request["prompts"])

    def calls(self, request: dict) -> int:
        return max(1, len(request["prompts"]))

    def payload(self, request: dict) -> Any:
        prompts = request["prompts"]
        return {"messages": prompts[0] if len(prompts) == 1 else prompts, "tools": request["tools"]}

    def usage(self, result: Any) -> Usage | None:
        """From an ``LLMResult``: the generations' ``usage_metadata`` summed, else ``llm_output``."""
        usage = None
        for generations in getattr(result, "generations", None) or ():
            for generation in generations:
                message = getattr(generation, "message", None)
                meta = getattr(message, "usage_metadata", None) if message is not None else None
                if meta:
                    usage = _add(usage, meta)
        if usage is not None:
            return usage
        llm_output = getattr(result, "llm_output", None) or {}
        token_usage = llm_output.get("token_usage") or llm_output.get("usage")
        if isinstance(token_usage, dict) and ("prompt_tokens" in token_usage or "input_tokens" in token_usage):
            prompt = int(token_usage.get("prompt_tokens", token_usage.get("input_tokens")) or 0)
            output = int(token_usage.get("completion_tokens", token_usage.get("output_tokens")) or 0)
            return prompt, output, 0
        return None

    def tool_calls(self, result: Any) -> list:
        found = []
        for generations in getattr(result, "generations", None) or ():
            for generation in generations:
                message = getattr(generation, "message", None)
                for call in getattr(message, "tool_calls", None) or ():
                    found.append((call.get("name"), call.get("args"), call.get("id")))
        _announce(found)
        return [(name, args) for name, args, _ in found]

    def streams(self, request: Any, result: Any) -> bool:
        return False  # a stream entry is driven lazily (see PATCHES)

    # -- stream chunks (AIMessageChunk for a chat model, text for an LLM) -----------------------
    def chunk_usage(self, chunk: Any, usage: Usage | None) -> Usage | None:
        meta = getattr(chunk, "usage_metadata", None)
        return _add(usage, meta) if meta else usage  # LangChain's chunk usage is additive

    def chunk_text(self, chunk: Any) -> str:
        if isinstance(chunk, str):
            return chunk
        text = tokens.text_of(getattr(chunk, "content", None))
        for part in getattr(chunk, "tool_call_chunks", None) or ():
            text += (part.get("name") or "") + (part.get("args") or "")
        return text

    def chunk_tool_calls(self, chunk: Any, into: dict) -> None:
        for part in getattr(chunk, "tool_call_chunks", None) or ():
            entry = into.setdefault(part.get("index"), ["", "", None])
            entry[0] += part.get("name") or ""
            entry[1] += part.get("args") or ""
            entry[2] = entry[2] or part.get("id")

    def stream_tool_calls(self, entries: list) -> list:
        _announce(entries)
        return [(name, args) for name, args, _ in entries if name]


def _add(usage: Usage | None, meta: dict) -> Usage:
    details = meta.get("input_token_details") or {}
    before = usage or (0, 0, 0)
    return (
        before[0] + int(meta.get("input_tokens") or 0),
        before[1] + int(meta.get("output_tokens") or 0),
        before[2] + int(details.get("cache_read") or 0),
    )


# -- tools -------------------------------------------------------------------------------------
def _check_tool(instance: Any, args: tuple, kwargs: dict) -> None:
    """Refuse to run a tool once the unit of work has tripped (a loop found in the reply that
    asked for it, say); a tool call no reply announced is watched here."""
    try:
        charges, limits = current_charges()
        scope = charges[-1][0]
        call_id = kwargs.get("tool_call_id")
        with _counted_lock:
            announced = call_id is not None and _counted.pop(call_id, False) is None
        if not announced and limits["loop_repeats"] != _INF:
            tool_input = args[0] if args else kwargs.get("tool_input")
            trip = observe_tool_calls(scope, [(getattr(instance, "name", "tool"), tool_input)], limits["loop_repeats"])
            if trip is not None:
                open_circuit(scope, trip)
        tripped = scope.tripped
    except Exception as error:
        internal_error("langchain tool check", error)
        return
    if tripped is not None:
        refusal = RunGuardTripped.from_trip(tripped)
        RUNTIME.events.refused(refusal, tripped, False, f"tool {getattr(instance, 'name', '')}")
        if limits["on_trip"] == "raise":
            raise refusal


def _tool_run(wrapped, instance, args, kwargs):
    if RUNTIME.enabled:
        _check_tool(instance, args, kwargs)
    return wrapped(*args, **kwargs)


async def _tool_arun(wrapped, instance, args, kwargs):
    if RUNTIME.enabled:
        _check_tool(instance, args, kwargs)
    return await wrapped(*args, **kwargs)


_CHAT = "langchain_core.language_models.chat_models"
_LLMS = "langchain_core.language_models.llms"
CHAT = LangChainEndpoint("chat", "generate")
CHAT_STREAM = LangChainEndpoint("chat", "stream")
LLM = LangChainEndpoint("completion", "generate")
LLM_STREAM = LangChainEndpoint("completion", "stream")
PATCHES = (
    PatchSpec(_CHAT, "BaseChatModel.generate", CHAT),
    PatchSpec(_CHAT, "BaseChatModel.agenerate", CHAT, is_async=True),
    PatchSpec(_CHAT, "BaseChatModel.stream", CHAT_STREAM, lazy_stream=True),
    PatchSpec(_CHAT, "BaseChatModel.astream", CHAT_STREAM, lazy_stream=True),
    PatchSpec(_LLMS, "BaseLLM.generate", LLM),
    PatchSpec(_LLMS, "BaseLLM.agenerate", LLM, is_async=True),
    PatchSpec(_LLMS, "BaseLLM.stream", LLM_STREAM, lazy_stream=True),
    PatchSpec(_LLMS, "BaseLLM.astream", LLM_STREAM, lazy_stream=True),
    PatchSpec("langchain_core.tools.base", "BaseTool.run", wrapper=_tool_run),
    PatchSpec("langchain_core.tools.base", "BaseTool.arun", wrapper=_tool_arun),
)
