"""The commonest billed call, guarded in one function.

Most calls an agent makes are a plain sync ``chat.completions.create``: a list of
messages, a model genai-prices prices flat, no streaming, no tool definitions, one
choice. Between two SDK calls the CPU caches are cold, and what a guarded call costs in
situ is mostly how many distinct functions and objects it touches (see
``benchmarks/README.md``). So for that call this guard does in one frame what the general
driver spreads over ``admit``, ``Endpoint.forecast``, ``tokens.messages_tokens``,
``_finish``, ``Endpoint.usage`` and ``Call.amounts``, with the same store calls and the
same semantics. Every other call, and any surprise (a message that is not a plain
``{"role", "content"}`` dict, an unknown model, an unexpected usage shape), takes the
general driver in ``_guard``, which stays the reference: the test suite runs both.
"""

from __future__ import annotations

from openai.types import CompletionUsage

from . import _recording
from ._errors import RunGuardTripped
from ._guard import (
    IN_CALL, IN_SYNC_CALL, Call, _context_trip, _finish, failed, make_sync_guard, open_circuit, refuse,
    watch_tool_calls,
)
from ._runtime import RUNTIME, internal_error
from ._scopes import current_charges
from .tokens import PER_MESSAGE, REPLY_PRIMING, _counters, estimate_text

_INF = float("inf")


def make_chat_guard(endpoint):
    """A wrapt wrapper for sync ``chat.completions.create``: the fast path, else ``general``."""
    general = make_sync_guard(endpoint)
    prices = endpoint.prices

    def guard(wrapped, instance, args, kwargs):
        mark = IN_SYNC_CALL
        if not RUNTIME.enabled or mark.call is not None or ((outer := IN_CALL.get()) is not None and not outer.settled):
            return wrapped(*args, **kwargs)
        try:
            # -- admit(), for this call only ------------------------------------------------
            model = kwargs.get("model")
            messages = kwargs.get("messages")
            rates = prices.get(model) if type(model) is str else None
            # fields that change what the call forecasts or returns: the general driver reads them
            if (rates is None or rates.flat is None or type(messages) is not list or args
                    or _counters.get(model) is not estimate_text or "stream" in kwargs or "tools" in kwargs
                    or "n" in kwargs or "functions" in kwargs):
                return general(wrapped, instance, args, kwargs)
            prompt = REPLY_PRIMING  # tokens.messages_tokens, for plain ASCII text messages
            for message in messages:
                if type(message) is dict and len(message) == 2:
                    content = message.get("content")
                    if type(content) is str and content.isascii():
                        prompt += PER_MESSAGE + (len(content) + 2) // 3
                        continue
                return general(wrapped, instance, args, kwargs)
            charges, limits = current_charges()
            if limits["loop_identical_requests"] != _INF:
                return general(wrapped, instance, args, kwargs)
            cap = kwargs.get("max_completion_tokens")  # openai._cap(), inlined
            if type(cap) is not int or cap <= 0:
                cap = kwargs.get("max_tokens")
                if type(cap) is not int or cap <= 0:
                    cap = 0
            flat = rates.flat
            # NB: as in admit() (inline on purpose, a frame less per call): keep the two in step
            call = Call()
            call.charges = charges
            call.settled = False
            call.endpoint = endpoint
            call.model = model
            call.rates = rates
            call.flat = flat
            call.prompt = prompt
            call.cap = cap
            call.on_trip = on_trip = limits["on_trip"]
            call.loop_repeats = limits["loop_repeats"]
            call.attempts = 0
            call.retry_due = False
            call.seconds = 0.0
            call.stopped = None
            call.forecast = (1, 1, prompt, cap, prompt + cap, prompt * flat[0] + cap * flat[1], 0)
            window = rates.context_window
            if window and prompt > limits["max_context_fraction"] * window:
                open_circuit(charges[-1][0], _context_trip(charges[-1][0], model, prompt, window, limits))
            refusal = RUNTIME.store.reserve(call, on_trip == "raise")
            if refusal is not None:
                refuse(call, refusal.trip, newly=refusal.new, target=endpoint.name)
        except RunGuardTripped:
            raise
        except Exception as error:
            internal_error("preflight", error)
            return wrapped(*args, **kwargs)
        mark.call = call
        try:
            result = wrapped(*args, **kwargs)
        except BaseException:
            mark.call = None
            stopped = failed(call)
            if stopped is not None:
                raise stopped from None
            raise
        mark.call = None
        # -- _finish(), for a parsed ChatCompletion carrying its usage --------------------------
        try:
            usage = getattr(result, "usage", None)
            if type(usage) is not CompletionUsage:
                return _finish(call, result, kwargs)
            prompt, output, details = usage.prompt_tokens, usage.completion_tokens, usage.prompt_tokens_details
            cached = 0 if details is None else details.cached_tokens or 0
            if not (type(prompt) is int and type(output) is int and type(cached) is int
                    and prompt >= 0 and output >= 0 and cached >= 0):
                return _finish(call, result, kwargs)
            cost = (prompt - cached) * flat[0] + output * flat[1] + cached * flat[2]
            for scope, trip in RUNTIME.store.settle(call, (1, 1, prompt, output, prompt + output, cost, call.seconds)):
                _recording.tripped(trip, scope)
            if call.loop_repeats != _INF:
                for choice in result.choices:
                    if choice.message.tool_calls:
                        watch_tool_calls(call, endpoint.tool_calls(result))
                        break
        except Exception:
            return _finish(call, result, kwargs)  # settles what is not settled yet, or logs
        return result

    guard.runguard_endpoint = endpoint
    return guard
