"""LangChain and LangGraph: every chat model / LLM call, and every tool run.

Meeting point: the language model's own entry points, not its callbacks.
``BaseChatModel.generate``/``agenerate`` are where ``invoke``, ``ainvoke``, ``batch`` and
``abatch`` meet; ``stream``/``astream`` bypass them, so they are patched too (and the
same for ``BaseLLM``). ``mlflow.langchain.autolog()`` instead injects a callback handler
into every ``BaseCallbackManager``; runguard tried that first, but merely having a
handler on every manager makes LangChain do run bookkeeping for every runnable in a
graph: about 66 us per agent turn for a handler that does nothing, more than this guard's
whole budget (1/10 of ``ModelCallLimitMiddleware``). A trip raised here leaves the
user's ``invoke`` as ``RunGuardTripped`` before the request is made, whatever callbacks
are attached.

Counted once: while a LangChain model call is in flight it is marked in the context, so
the patched openai SDK underneath (``ChatOpenAI``) passes straight through. Usage settles
from the ``AIMessage``'s ``usage_metadata`` (else ``llm_output``); the tool calls the
model asks for feed the loop watch; ``BaseTool.run``/``arun`` refuse to run a tool once
the unit of work has tripped, so a repeated tool call is stopped before the tool runs
again (LangGraph's default ``ToolNode`` error handling re-raises the trip).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from .. import _recording, pricing, tokens
from .._errors import RunGuardTripped
from .._guard import (IN_CALL, IN_SYNC_CALL, admit, failed, in_flight, open_circuit, release_quietly, settle_quietly, trip_exception,
                      watch_tool_calls)
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
    def read(generation_lists: list, llm_output: dict | None) -> tuple[tuple | None, list]:
        """From an ``LLMResult``'s generations: (input, output, cached input) tokens or ``None``,
        and (name, arguments, id) of each tool call the model asked for. One pass."""
        usage, tool_calls = None, []
        for generations in generation_lists or ():
            for generation in generations:
                message = getattr(generation, "message", None)
                if message is None:
                    continue
                meta = message.usage_metadata if hasattr(message, "usage_metadata") else None
                if meta:
                    details = meta.get("input_token_details") or {}
                    usage = usage or [0, 0, 0]
                    usage[0] += int(meta.get("input_tokens") or 0)
                    usage[1] += int(meta.get("output_tokens") or 0)
                    usage[2] += int(details.get("cache_read") or 0)
                for call in getattr(message, "tool_calls", None) or ():
                    tool_calls.append((call.get("name"), call.get("args"), call.get("id")))
        if usage is not None:
            return tuple(usage), tool_calls
        token_usage = (llm_output or {}).get("token_usage") or (llm_output or {}).get("usage")
        if isinstance(token_usage, dict) and ("prompt_tokens" in token_usage or "input_tokens" in token_usage):
            prompt = int(token_usage.get("prompt_tokens", token_usage.get("input_tokens")) or 0)
            output = int(token_usage.get("completion_tokens", token_usage.get("output_tokens")) or 0)
            return (prompt, output, 0), tool_calls
        return None, tool_calls


_counted: OrderedDict = OrderedDict()  # ids of tool calls already seen in a reply (bounded)
_counted_lock = threading.Lock()
_endpoints_by_class: dict[tuple[type, str], LangChainEndpoint] = {}  # (model class, kind) -> endpoint


def _endpoint_of(instance: Any, kind: str) -> LangChainEndpoint:
    """The endpoint of a model class, its provider read from its LangSmith params once per
    class (they cost ~17 us a call)."""
    key = (type(instance), kind)
    endpoint = _endpoints_by_class.get(key)
    if endpoint is None:
        try:
            ls_provider = (instance._get_ls_params() or {}).get("ls_provider")
        except Exception:
            ls_provider = None
        endpoint = _endpoints_by_class[key] = LangChainEndpoint(kind, _PROVIDERS.get(ls_provider or ""))
    return endpoint


def _admit_one(instance: Any, kind: str, messages: list, call_kwargs: dict) -> Any:
    """Admit one model call. ``call_kwargs`` are the keywords the model was called with (only
    ``model``, the max-token caps, ``n`` and ``tools`` are read)."""
    fields = instance.__dict__  # model fields (reading a missing pydantic attribute is slow)
    model = call_kwargs.get("model") or fields.get("model_name") or fields.get("model") or fields.get("model_id") or ""
    cap = call_kwargs.get("max_completion_tokens") or call_kwargs.get("max_tokens") \
        or fields.get("max_completion_tokens") or fields.get("max_tokens") or fields.get("max_output_tokens")
    if type(cap) is not int or cap < 0:
        cap = 0
    choices = call_kwargs.get("n") or fields.get("n")
    if type(choices) is int and choices > 1:
        cap *= choices
    request = {"model": str(model), "messages": messages, "cap": cap, "tools": call_kwargs.get("tools")}
    return admit(_endpoint_of(instance, kind), request)


def _admit_all(instance: Any, kind: str, batches: list, call_kwargs: dict) -> list:
    """One admitted call per prompt (``generate`` takes a batch); all or none."""
    if kind != "chat":
        batches = [[prompt] for prompt in batches]  # an LLM's prompts are strings
    if len(batches) == 1:
        return [_admit_one(instance, kind, batches[0], call_kwargs)]
    calls = []
    try:
        for messages in batches:
            calls.append(_admit_one(instance, kind, list(messages), call_kwargs))
    except BaseException:
        for call in calls:
            release_quietly(call)
        raise
    return calls


def _settle(call: Any, usage: Any, tool_calls: list) -> None:
    settle_quietly(call, usage)  # no usage: charged its forecast (logged once)
    if tool_calls and call.loop_repeats != _INF:
        try:
            with _counted_lock:
                for _, _, call_id in tool_calls:
                    if call_id:
                        _counted[call_id] = None
                while len(_counted) > 1024:
                    _counted.popitem(last=False)
            watch_tool_calls(call, [(name, args) for name, args, _ in tool_calls])
        except Exception as error:
            internal_error("langchain loop detection", error)


def _settle_result(calls: list, result: Any) -> None:
    try:
        generations = result.generations
        if len(calls) == 1:
            _settle(calls[0], *LangChainEndpoint.read(generations, result.llm_output))
            return
        for position, call in enumerate(calls):  # a batch: llm_output is the batch's sum, so unused
            _settle(call, *LangChainEndpoint.read([generations[position]], None))
    except Exception as error:
        for call in calls:
            if not call.settled:
                settle_quietly(call, None)
        internal_error("langchain settle", error)


def _failed(calls: list):
    """The model raised: charge what its HTTP attempts used; the trip that stopped it, if any
    (LangChain's callbacks and retries must not hide it)."""
    stopped = None
    for call in calls:
        stopped = failed(call) or stopped
    return stopped


def _batches(args: tuple, kwargs: dict) -> list:
    """``generate``'s prompts (a list of message lists, or of strings for an LLM)."""
    return args[0] if args else kwargs.get("messages", kwargs.get("prompts"))


def _preflight(instance: Any, kind: str, args: tuple, kwargs: dict) -> list | None:
    """The admitted calls of a ``generate``; ``None`` when runguard itself failed (the call
    then goes ahead unguarded). A trip raises."""
    try:
        return _admit_all(instance, kind, _batches(args, kwargs), kwargs)
    except RunGuardTripped:
        raise
    except Exception as error:
        internal_error("langchain preflight", error)
        return None


# NB: the sync and async drivers below are deliberately parallel: keep them in step.
def _make_generate(kind: str):
    def guard(wrapped, instance, args, kwargs):
        calls = None if not RUNTIME.enabled or in_flight() is not None else _preflight(instance, kind, args, kwargs)
        if calls is None:
            return wrapped(*args, **kwargs)
        mark = IN_SYNC_CALL
        mark.call = calls[0]
        try:
            result = wrapped(*args, **kwargs)
        except BaseException:
            mark.call = None
            stopped = _failed(calls)
            if stopped is not None:
                raise stopped from None
            raise
        finally:
            mark.call = None
        _settle_result(calls, result)
        return result

    return guard


def _make_agenerate(kind: str):
    async def guard(wrapped, instance, args, kwargs):
        calls = None if not RUNTIME.enabled or in_flight() is not None else _preflight(instance, kind, args, kwargs)
        if calls is None:
            return await wrapped(*args, **kwargs)
        token = IN_CALL.set(calls[0])
        try:
            result = await wrapped(*args, **kwargs)
        except BaseException:
            stopped = _failed(calls)
            if stopped is not None:
                raise stopped from None
            raise
        finally:
            IN_CALL.reset(token)
        _settle_result(calls, result)
        return result

    return guard


class _ChunkMeter:
    """Usage and tool calls gathered from a LangChain stream's chunks."""

    __slots__ = ("usage", "tools", "seen")

    def __init__(self) -> None:
        self.usage: list | None = None
        self.tools: dict = {}
        self.seen = False

    def add(self, chunk: Any) -> None:
        self.seen = True
        meta = getattr(chunk, "usage_metadata", None)
        if meta:
            usage = self.usage = self.usage or [0, 0, 0]
            usage[0] += int(meta.get("input_tokens") or 0)
            usage[1] += int(meta.get("output_tokens") or 0)
            usage[2] += int((meta.get("input_token_details") or {}).get("cache_read") or 0)
        for part in getattr(chunk, "tool_call_chunks", None) or ():
            entry = self.tools.setdefault(part.get("index"), ["", "", None])
            entry[0] += part.get("name") or ""
            entry[1] += part.get("args") or ""
            entry[2] = entry[2] or part.get("id")

    def settle(self, call: Any) -> None:
        _settle(call, tuple(self.usage) if self.usage else None,
                [(name, args, call_id) for name, args, call_id in self.tools.values() if name])


def _stream_request(instance: Any, kind: str, args: tuple, kwargs: dict) -> Any:
    source = args[0] if args else kwargs.get("input")
    prompt = instance._convert_input(source)
    messages = prompt.to_messages() if kind == "chat" else [prompt.to_string()]
    return _admit_one(instance, kind, messages, kwargs)


def _stream_preflight(instance: Any, kind: str, args: tuple, kwargs: dict) -> Any:
    """The admitted call of a stream; ``None`` when runguard itself failed. A trip raises."""
    try:
        return _stream_request(instance, kind, args, kwargs)
    except RunGuardTripped:
        raise
    except Exception as error:
        internal_error("langchain preflight", error)
        return None


def _make_stream(kind: str):
    def guard(wrapped, instance, args, kwargs):
        if not RUNTIME.enabled or in_flight() is not None:
            return wrapped(*args, **kwargs)
        return _metered(wrapped, instance, args, kwargs)

    def _metered(wrapped, instance, args, kwargs):
        call = _stream_preflight(instance, kind, args, kwargs)
        if call is None:
            yield from wrapped(*args, **kwargs)
            return
        inner, meter, mark = wrapped(*args, **kwargs), _ChunkMeter(), IN_SYNC_CALL
        try:
            while True:
                mark.call = call
                try:
                    chunk = next(inner)
                except StopIteration:
                    break
                finally:
                    mark.call = None
                meter.add(chunk)
                yield chunk
        except BaseException:  # failed, or the consumer stopped early (GeneratorExit)
            inner.close()
            stopped = None if meter.seen else failed(call)
            if meter.seen:
                meter.settle(call)
            if stopped is not None:
                raise stopped from None
            raise
        meter.settle(call)

    return guard


def _make_astream(kind: str):
    def guard(wrapped, instance, args, kwargs):
        if not RUNTIME.enabled or in_flight() is not None:
            return wrapped(*args, **kwargs)
        return _metered(wrapped, instance, args, kwargs)

    async def _metered(wrapped, instance, args, kwargs):
        call = _stream_preflight(instance, kind, args, kwargs)
        if call is None:
            async for chunk in wrapped(*args, **kwargs):
                yield chunk
            return
        inner, meter = wrapped(*args, **kwargs), _ChunkMeter()
        try:
            while True:
                token = IN_CALL.set(call)
                try:
                    chunk = await inner.__anext__()
                except StopAsyncIteration:
                    break
                finally:
                    IN_CALL.reset(token)
                meter.add(chunk)
                yield chunk
        except BaseException:  # failed, or the consumer stopped early
            await inner.aclose()
            stopped = None if meter.seen else failed(call)
            if meter.seen:
                meter.settle(call)
            if stopped is not None:
                raise stopped from None
            raise
        meter.settle(call)

    return guard


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
        error = trip_exception(tripped)
        _recording.refused(error, tripped, newly=False, target=f"tool {getattr(instance, 'name', '')}")
        if limits["on_trip"] == "raise":
            raise error


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
PATCHES = (
    PatchSpec(_CHAT, "BaseChatModel.generate", wrapper=_make_generate("chat")),
    PatchSpec(_CHAT, "BaseChatModel.agenerate", wrapper=_make_agenerate("chat")),
    PatchSpec(_CHAT, "BaseChatModel.stream", wrapper=_make_stream("chat")),
    PatchSpec(_CHAT, "BaseChatModel.astream", wrapper=_make_astream("chat")),
    PatchSpec(_LLMS, "BaseLLM.generate", wrapper=_make_generate("completion")),
    PatchSpec(_LLMS, "BaseLLM.agenerate", wrapper=_make_agenerate("completion")),
    PatchSpec(_LLMS, "BaseLLM.stream", wrapper=_make_stream("completion")),
    PatchSpec(_LLMS, "BaseLLM.astream", wrapper=_make_astream("completion")),
    PatchSpec("langchain_core.tools.base", "BaseTool.run", wrapper=_tool_run),
    PatchSpec("langchain_core.tools.base", "BaseTool.arun", wrapper=_tool_arun),
)
