"""One guarded call, step by step: what an integration's reader declares (:class:`Endpoint`),
what an admitted call holds (:class:`Call`), and the steps around it: :func:`begin` before
the call, :func:`failed` when it raised, :func:`settle` after it. The drivers that run these
steps around an SDK call are in ``_guard``; the stream driver in ``_streams``.

NB: BE CAREFUL HERE: see ``_guard`` for the rules every step keeps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._counters import COST, Trip, as_counters
from ._errors import RunGuardTripped
from ._loops import observe_request, observe_tool_calls
from ._runtime import RUNTIME, internal_error, log_once
from ._scopes import current_charges, retry_after
from ._store import Refusal, Reservation
from .pricing import SNAPSHOT, rates_for
from .pricing import refresh as refresh_prices

_INF = float("inf")
_UNPRICED = (0.0, 0.0, 0.0)  # a model genai-prices does not know costs 0 (documented)
_MISSING = object()
Usage = tuple  # (input tokens, output tokens, cached input tokens[, input tokens written to a prompt cache])


class Endpoint:
    """How to read one kind of SDK request and reply. Integrations subclass it; every method is
    a pure reader (no I/O, no state) that may raise on a shape it does not know: the driver
    turns that into "logged once, the call goes on"."""

    name = "llm"
    provider: str | None = None
    # NB: which optional readers this endpoint has. Each is a Python call per billed call when
    # used, so the driver skips those an endpoint does not declare (hot path).
    reads_arguments = False  # request() builds the request from the call (else: its keywords)
    batched = False  # calls() may answer more than 1
    learns = False  # learn() remembers something from replies
    stream_key: str | None = None  # the request field that asks for a stream (streams() is asked then)
    prices: dict[str, Any]  # cached rates of this endpoint's models (see pricing.table_for)

    def request(self, instance: Any, args: tuple, kwargs: dict) -> Any:
        """The request as the readers below take it (by default the call's keywords)."""
        return kwargs

    def forecast(self, request: Any) -> tuple[str, int, int]:
        """(model, prompt-token estimate, output cap or 0) of the whole request."""
        raise NotImplementedError

    def rates(self, model: str, request: Any) -> Any:
        """The model's prices when :attr:`prices` (this endpoint's cached table) lacks it."""
        return rates_for(model, self.provider)

    def calls(self, request: Any) -> int:
        """How many model calls the request makes (a LangChain batch makes one per prompt)."""
        return 1

    def payload(self, request: Any) -> Any:
        """What makes two requests identical besides the model (``None``: not watched)."""
        return None

    def usage(self, result: Any) -> Usage | None:
        """(input, output, cached input) tokens of a reply, ``None`` when it carries none."""
        return None

    def tool_calls(self, result: Any) -> list:
        """(name, arguments) of each tool call a reply asks for."""
        return []

    def reply(self, result: Any, tools: bool) -> tuple[Usage | None, list]:
        """:meth:`usage` and (when ``tools``) :meth:`tool_calls` of a reply: one call per billed
        call, which a reader may answer in one pass."""
        return self.usage(result), self.tool_calls(result) if tools else []

    def streams(self, request: Any, result: Any) -> bool | None:
        """Whether ``result`` is a stream to meter chunk by chunk (``None``: a stream this
        reader cannot meter, such as a raw streaming response: it is charged its forecast).
        By default: the request asked for one (``stream_key``) and the result iterates."""
        if self.stream_key is None or request.get(self.stream_key) is not True:
            return False
        return True if hasattr(result, "__next__") or hasattr(result, "__anext__") else None

    def chunk_usage(self, chunk: Any, usage: Usage | None) -> Usage | None:
        """The stream's usage so far, given what earlier chunks said (``usage``)."""
        return usage

    def chunk_text(self, chunk: Any) -> str:
        """The generated text a chunk carries (to count output as it arrives)."""
        return ""

    def chunk_tool_calls(self, chunk: Any, into: dict) -> None:
        """Collect the tool calls a stream asks for: ``into[key] = [name, arguments text]``."""

    def learn(self, request: Any, result: Any) -> None:
        """Remember what a reply says about later requests (a route's model, say)."""

    def reply_model(self, result: Any) -> str | None:
        """The model a reply names (an Azure deployment answers with its base model)."""
        model = result.get("model") if isinstance(result, dict) else getattr(result, "model", None)
        return model if isinstance(model, str) else None

    def stream_tool_calls(self, entries: list) -> list:
        """The (name, arguments) of the tool calls :meth:`chunk_tool_calls` gathered."""
        return [(entry[0], entry[1]) for entry in entries if entry[0]]


class Call(Reservation):
    """One admitted call: what it reserved, how to price and settle it, and its HTTP attempts.
    Built by :func:`admit` (no ``__init__``: one Python frame less per billed call)."""

    __slots__ = (
        # its HTTP attempts (see _attempts): how many left the process, whether the next one is
        # a retry, seconds spent in them not yet charged, the trip that stopped a retry
        "attempts",
        "cap",
        "count",
        # (enforce, a refusal found already) while the shared budgets' reserve is still to be
        # awaited (an async call: see admit_shared), else None
        "deferred",
        "endpoint",
        "flat",
        "loop_repeats",
        "model",
        "on_trip",
        "prompt",
        "rates",
        "refusal",
        "request",
        "retry_due",
        "seconds",
        "stopped",
    )

    endpoint: Endpoint
    request: Any
    model: str
    rates: Any
    flat: tuple[float, float, float] | None
    prompt: int
    cap: int
    count: int
    on_trip: Any
    loop_repeats: float
    refusal: Any
    attempts: int
    deferred: tuple[bool, Any] | None
    retry_due: bool
    seconds: float
    stopped: RunGuardTripped | None

    def amounts(self, input_tokens: float, output_tokens: float, cached: float = 0, written: float = 0) -> tuple:
        """The counters (see ``_counters.COUNTERS``) this usage adds, priced (``written``: input
        tokens written to a prompt cache, priced apart by providers that charge for it)."""
        flat = self.flat
        if flat is not None and not written:
            cost = (input_tokens - cached) * flat[0] + output_tokens * flat[1] + cached * flat[2]
        elif self.rates is not None:
            cost = self.rates.cost(input_tokens, output_tokens, cached, written)
        else:
            cost = 0.0
        count = self.count
        return (count, count, input_tokens, output_tokens, input_tokens + output_tokens, cost, self.seconds)

    def failure_amounts(self) -> tuple:
        """What a call that raised after sending used: its first attempts (retries were charged
        as they left) and their seconds; no tokens, no call."""
        return (0, min(self.attempts, self.count), 0, 0, 0, 0, self.seconds)


# NB: admit() and finish() run around every billed call. Between two SDK calls the CPU caches
# are cold, so what costs here is mostly how many distinct functions and objects a call
# touches (each Python function is a few cache misses, ~0.5 us in situ), far more than how
# many lines run: helpers are inlined on purpose (see benchmarks/README.md).
def admit(endpoint: Endpoint, request: Any, defer: bool = False) -> Call:
    """Reserve this call in every open scope. A refusal is put on ``call.refusal`` (the driver
    applies the policy); anything this raises is runguard's own failure. ``defer`` (an async
    call): a shared store's reserve is left on ``call.deferred``, for :func:`admit_shared` to
    await, so the event loop never waits for the store."""
    charges, limits = current_charges()
    model, prompt, cap = endpoint.forecast(request)
    count = endpoint.calls(request) if endpoint.batched else 1
    snapshot = SNAPSHOT  # genai-prices' data replaced (UpdatePrices): drop the cached lookups once
    if snapshot.module is not None and snapshot.module._custom_snapshot is not snapshot.seen:
        refresh_prices()
    rates = endpoint.prices.get(model, _MISSING)
    if rates is _MISSING:
        rates = endpoint.rates(model, request)
    flat = _UNPRICED if rates is None else rates.flat  # None: tiered prices
    call = Call()
    call.charges = charges
    call.settled = False
    call.lease = None
    call.endpoint = endpoint
    call.request = request
    call.model = model
    call.rates = rates
    call.flat = flat
    call.prompt = prompt
    call.cap = cap
    call.count = count
    call.on_trip = on_trip = limits["on_trip"]
    call.loop_repeats = limits["loop_repeats"]
    call.refusal = None
    call.deferred = None
    call.attempts = 0
    call.retry_due = False
    call.seconds = 0.0
    call.stopped = None
    cost = prompt * flat[0] + cap * flat[1] if flat is not None else rates.cost(prompt, cap)
    call.forecast = (count, count, prompt, cap, prompt + cap, cost, 0)
    # signals that are not counters open the innermost scope's circuit first; reserve() then
    # refuses the call like any other in a tripped scope
    window = None if rates is None else rates.context_window
    if window:
        if prompt > limits["max_context_fraction"] * window:
            open_circuit(charges[-1][0], _context_trip(charges[-1][0], model, prompt, window, limits))
    else:
        log_once(
            ("no-window", model),
            "runguard: no context window known for model %r; context overflow is not checked for it. Logged once.",
            model,
        )
    if limits["loop_identical_requests"] != _INF:
        payload = endpoint.payload(request)
        if payload is not None:
            trip = observe_request(charges[-1][0], model, payload, limits["loop_identical_requests"])
            if trip is not None:
                open_circuit(charges[-1][0], trip)
    if rates is None and limits["unpriced"] == "refuse" and _cost_limited(charges):
        refusal = _unpriced(charges[-1][0], model)
        if on_trip == "raise":
            call.settled = True  # nothing held
            call.refusal = refusal
            return call
        if defer and RUNTIME.store.remote:
            call.deferred = (False, refusal)
            return call
        call.refusal = RUNTIME.store.reserve(call, False) or refusal  # shadow mode: held like any call
        return call
    if defer and RUNTIME.store.remote:
        call.deferred = (on_trip == "raise", None)
        return call
    call.refusal = RUNTIME.store.reserve(call, on_trip == "raise")
    return call


async def admit_shared(call: Call) -> bool:
    """An async call's reserve in a shared store, awaited off the event loop (the store's I/O
    threads; see ``SharedStore.areserve``); then the refusal policy, as :func:`begin` applies it.
    False: runguard itself failed (logged once, nothing held), and the call goes once, unguarded."""
    enforce, found = call.deferred  # type: ignore[misc]
    call.deferred = None
    try:
        refusal = await RUNTIME.store.areserve(call, enforce) or found
    except Exception as error:
        internal_error("preflight", error)  # strict mode (tests) re-raises
        return False
    call.refusal = refusal
    if refusal is not None:
        refuse(call, refusal.trip, refusal.new, call.endpoint.name, refusal.sticky)
    return True


def _cost_limited(charges: list) -> bool:
    """Whether a cost limit applies to this call (in a scope, or in a shared budget)."""
    for scope, checks in charges:
        if any(index == COST for index, _ in checks):
            return True
        shared = scope.shared  # a session's own shared budget (one per tenant, say)
        if shared is not None and shared.limits["shared_max_cost_usd"] != float("inf"):
            return True
    budget = getattr(RUNTIME.store, "budget", None)
    return budget is not None and any(index == COST for index, _ in budget.checks)


def _unpriced(scope: Any, model: str) -> Refusal:
    trip = Trip(
        scope.name,
        "unpriced",
        None,
        model,
        f"no price is known for model {model!r} and a cost limit is set (unpriced='refuse'); register one "
        "with runguard.register_price()",
        as_counters(scope.used),
    )
    return Refusal(scope, trip, False, False)


def _context_trip(scope: Any, model: str, prompt: int, window: int, limits: dict) -> Trip:
    fraction = limits["max_context_fraction"]
    return Trip(
        scope.name,
        "max_context_fraction",
        fraction,
        prompt,
        f"context overflow: the prompt is forecast at {prompt} tokens, over {fraction:g} of "
        f"{model}'s {window}-token context window ({int(fraction * window)} tokens)",
        as_counters(scope.used),
    )


def open_circuit(scope: Any, trip: Trip) -> None:
    """Open a scope's circuit for a signal that is not a counter; record it if it is new."""
    if RUNTIME.store.trip(scope, trip) is trip:
        RUNTIME.events.tripped(trip, scope)


def refuse(call: Any, trip: Trip, newly: bool, target: str, sticky: bool = True) -> None:
    """Record a refusal, then apply the on_trip policy: raise the trip, warn (shadow mode), or
    hand it to the callable, whose exception (any) stops the call and reaches the caller."""
    policy = call.on_trip
    error = RunGuardTripped.from_trip(trip, shadow=policy != "raise")
    # a windowed scope opens again when its window rolls over (a store outage: when the store answers)
    seconds = None if trip.limit == "store_outage" else retry_after(trip.scope, call.charges)
    if seconds is not None:
        error.details["retry_after"] = seconds
    try:
        RUNTIME.events.refused(error, trip, newly, target, getattr(call, "request", None), sticky)
    except Exception as failure:  # recording never replaces the trip
        log_once(
            ("record-refusal", type(failure).__name__),
            "runguard: could not record a refusal (%s)",
            type(failure).__name__,
        )
    if policy == "raise":
        raise error
    if policy == "warn":
        log_once(
            ("warn", trip.scope, trip.limit),
            "runguard (shadow mode): would refuse %s: %s; the call was sent",
            target,
            trip.reason,
        )
        return
    try:
        policy(error)
    except BaseException:
        if not call.attempts:  # before sending: nothing to charge (after, failed() charges the attempts)
            _quietly(RUNTIME.store.release, call, "release")
        raise


def _quietly(step: Callable[[Any], Any], call: Any, stage: str) -> None:
    try:
        step(call)
    except Exception as error:
        internal_error(stage, error)


# -- the three steps every driver runs ------------------------------------------------------
def begin(endpoint: Endpoint, instance: Any, args: tuple, kwargs: dict, defer: bool = False) -> Call | None:
    """Admit the call, or refuse it before it is sent. ``None``: runguard itself failed, and
    the caller makes the call once, unguarded. Raises only the trip (or ``on_trip``'s own).
    ``defer``: see :func:`admit` (the caller then awaits :func:`admit_shared`)."""
    try:
        call = admit(endpoint, endpoint.request(instance, args, kwargs) if endpoint.reads_arguments else kwargs, defer)
    except Exception as error:
        internal_error("preflight", error)  # strict mode (tests) re-raises
        return None
    refusal = call.refusal
    if refusal is not None:
        refuse(call, refusal.trip, refusal.new, endpoint.name, refusal.sticky)
    return call


def failed(call: Call) -> RunGuardTripped | None:
    """The SDK call raised. Charge what its HTTP attempts used, or drop the hold if none left
    the process. Returns the trip that stopped it when runguard did: an SDK that wraps
    transport errors (MLflow's deployments client, LangChain's retries) must not hide it."""
    try:
        if call.attempts:
            for scope, trip in RUNTIME.store.settle(call, call.failure_amounts(), ok=False):
                RUNTIME.events.tripped(trip, scope)
        else:
            RUNTIME.store.release(call)
    except Exception as error:
        _last_resort(call, charge=False)
        internal_error("release", error)
    return call.stopped


def settle(call: Call, usage: Usage | None) -> None:
    """Charge the actual usage (or, lacking it, the forecast) and trip scopes that reached a limit."""
    if usage is None:
        log_once(
            ("no-usage", call.endpoint.name),
            "runguard: %s returned no usage; the call is charged its forecast instead",
            call.endpoint.name,
        )
        usage = (call.prompt, call.cap, 0)
    for scope, trip in RUNTIME.store.settle(call, call.amounts(*usage)):
        RUNTIME.events.tripped(trip, scope)


def settle_quietly(call: Call, usage: Usage | None = None) -> None:
    """:func:`settle` that never raises (strict mode aside) and never leaks the hold."""
    try:
        settle(call, usage)
    except Exception as error:
        _last_resort(call)
        internal_error("settle", error)


def _last_resort(call: Call, charge: bool = True) -> None:
    """Settling failed: a reply came, so charge the call its forecast (``charge``); failing
    that, drop its hold. Either way the hold never outlives the call."""
    if call.settled:
        return
    try:
        if not charge:
            raise LookupError
        RUNTIME.store.settle(call, call.forecast)
    except Exception:
        try:
            RUNTIME.store.release(call)
        except Exception:
            pass


def watch_tool_calls(call: Call, tool_calls: list) -> None:
    """Feed the tool calls a reply asks for, ``(name, arguments)``, to the innermost scope's loop watch."""
    if tool_calls:
        scope = call.charges[-1][0]
        trip = observe_tool_calls(scope, tool_calls, call.loop_repeats)
        if trip is not None:
            open_circuit(scope, trip)
