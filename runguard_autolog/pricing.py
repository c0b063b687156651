"""USD cost from registered prices, else genai-prices, resolved once per model and cached.

An uncached genai-prices lookup costs ~100 µs, so the hot path only ever reads a
cached :class:`Rates` (plain floats; tiered prices keep genai-prices' cliff rule:
crossing a tier prices *all* tokens at that tier). Prices registered with
:func:`register_price` (or ``RUNGUARD_PRICES``) win over genai-prices; a name may be an
alias of another model (``same_as``: a deployment name). A model neither knows is
*unpriced*: its tokens are counted, a warning is logged once, and cost limits treat its
calls as costing 0 USD, unless ``unpriced="refuse"``. When genai-prices' snapshot changes
(``UpdatePrices``, a custom snapshot), the cache is dropped at the next call: prices are
looked up again once per model, not per call.
"""

from __future__ import annotations

import math
import sys
import threading
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from ._runtime import RUNTIME, log_once

_MTOK = 1_000_000.0


class _Price:
    __slots__ = ("base", "tiers")
    base: float
    tiers: tuple[tuple[Any, float], ...]

    def __init__(self, price: Any) -> None:
        if price is None:
            self.base, self.tiers = 0.0, ()
        elif isinstance(price, Decimal):
            self.base, self.tiers = float(price) / _MTOK, ()
        else:  # genai_prices TieredPrices
            self.base = float(price.base) / _MTOK
            self.tiers = tuple((tier.start, float(tier.price) / _MTOK) for tier in reversed(price.tiers))

    def per_token(self, total_input: float) -> float:
        for start, rate in self.tiers:
            if total_input > start:
                return rate
        return self.base


class Rates:
    """Per-token USD rates of one model."""

    __slots__ = ("cache_read", "cache_write", "context_window", "flat", "input", "model", "output")

    def __init__(self, model: str, model_price: Any, context_window: int | None) -> None:
        self.model = model
        self.input = _Price(getattr(model_price, "input_mtok", None))
        self.output = _Price(getattr(model_price, "output_mtok", None))
        cache_read = getattr(model_price, "cache_read_mtok", None)
        self.cache_read = _Price(cache_read) if cache_read is not None else self.input
        cache_write = getattr(model_price, "cache_write_mtok", None)  # Anthropic's prompt-cache writes
        self.cache_write = _Price(cache_write) if cache_write is not None else self.input
        self.context_window = context_window
        tiered = self.input.tiers or self.output.tiers or self.cache_read.tiers or self.cache_write.tiers
        # (input, output, cached-input) USD per token when no tier applies: lets the hot path
        # price a call with three multiplications and no call
        self.flat = None if tiered else (self.input.base, self.output.base, self.cache_read.base)

    def cost(self, input_tokens: float, output_tokens: float, cached_tokens: float = 0, written: float = 0) -> float:
        """USD for ``input_tokens`` (all of them: ``cached_tokens`` read from a prompt cache and
        ``written`` to one included), ``output_tokens``."""
        flat = self.flat
        if flat is not None and not written:
            # more cached than input tokens (a malformed reply) never makes a negative cost
            uncached = input_tokens - cached_tokens if input_tokens > cached_tokens else 0
            return uncached * flat[0] + output_tokens * flat[1] + cached_tokens * flat[2]
        uncached = max(input_tokens - cached_tokens - written, 0)
        return (
            uncached * self.input.per_token(input_tokens)
            + cached_tokens * self.cache_read.per_token(input_tokens)
            + written * self.cache_write.per_token(input_tokens)
            + output_tokens * self.output.per_token(input_tokens)
        )


# provider -> {model: Rates or None}; the guard reads a provider's table directly (one dict get)
_tables: dict[str | None, dict[str, Rates | None]] = {}
_lock = threading.Lock()
RUNTIME.fork_safe(sys.modules[__name__], "_lock", threading.Lock)


_registered: dict[str, Rates] = {}  # model -> prices given by the user
_aliases: dict[str, str] = {}  # name -> the model whose prices it has (same_as)
_learned: dict[tuple[str | None, str], str] = {}  # (provider, requested name) -> the model its reply named
_MAX_ALIASES = 32


class _Snapshot:
    """Which genai-prices snapshot the cache was built from (``module``: genai-prices' data
    module once imported; its ``_custom_snapshot`` is what ``UpdatePrices`` replaces)."""

    __slots__ = ("module", "seen")

    def __init__(self) -> None:
        self.module: Any = None
        self.seen: Any = None


SNAPSHOT = _Snapshot()


def refresh() -> None:
    """genai-prices' snapshot changed: forget every cached lookup (each model is looked up again
    on its next call)."""
    if SNAPSHOT.module is not None:
        SNAPSHOT.seen = SNAPSHOT.module._custom_snapshot
    clear_cache()


def _mtok(value: Any, what: str) -> Decimal:
    from ._errors import RunGuardConfigError

    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        raise RunGuardConfigError(
            f"runguard: register_price: {what}={value!r} is not valid: pass USD per million tokens"
        )
    try:
        number = Decimal(str(value))
    except ArithmeticError:
        raise RunGuardConfigError(f"runguard: register_price: {what}={value!r} is not a number") from None
    if not number.is_finite() or number < 0 or math.isinf(float(number)):  # 1e999: inf once a float
        raise RunGuardConfigError(f"runguard: register_price: {what}={value!r} must be a finite number >= 0")
    return number


class _Given:
    """Prices in genai-prices' shape (USD per million tokens), for :class:`Rates`."""

    def __init__(self, input_mtok: Decimal, output_mtok: Decimal, cache_read_mtok: Decimal | None) -> None:
        self.input_mtok = input_mtok
        self.output_mtok = output_mtok
        self.cache_read_mtok = cache_read_mtok


def register_price(
    model: str,
    *,
    input_usd_per_mtok: float | None = None,
    output_usd_per_mtok: float | None = None,
    cached_input_usd_per_mtok: float | None = None,
    same_as: str | None = None,
) -> None:
    """Price ``model`` (USD per million tokens), or make it an alias of another model
    (``same_as``: a deployment or fine-tune priced like its base). Registered prices win over
    genai-prices. A negative or missing price, or ``same_as`` a model nobody prices, raises
    :class:`~runguard_autolog.RunGuardConfigError`."""
    from ._errors import RunGuardConfigError

    if not isinstance(model, str) or not model.strip():
        raise RunGuardConfigError(f"runguard: register_price: model={model!r} is not valid: pass the model's name")
    if same_as is not None:
        if input_usd_per_mtok is not None or output_usd_per_mtok is not None or cached_input_usd_per_mtok is not None:
            raise RunGuardConfigError(f"runguard: register_price({model!r}): pass prices or same_as=, not both")
        if not isinstance(same_as, str) or same_as == model:
            raise RunGuardConfigError(f"runguard: register_price({model!r}): same_as={same_as!r} is not valid")
        target, hops = same_as, 0
        while target in _aliases and hops < _MAX_ALIASES:
            target, hops = _aliases[target], hops + 1
            if target == model:
                raise RunGuardConfigError(
                    f"runguard: register_price({model!r}): same_as={same_as!r} leads back to {model!r} (an alias cycle)"
                )
        if _resolve(same_as, None) is None:
            raise RunGuardConfigError(
                f"runguard: register_price({model!r}): same_as={same_as!r} names a model with no known price "
                "(register it first)"
            )
        with _lock:
            _aliases[model] = same_as
            _registered.pop(model, None)
    else:
        if input_usd_per_mtok is None or output_usd_per_mtok is None:
            raise RunGuardConfigError(
                f"runguard: register_price({model!r}): pass input_usd_per_mtok= and output_usd_per_mtok= (or same_as=)"
            )
        given = _Given(
            _mtok(input_usd_per_mtok, "input_usd_per_mtok"),
            _mtok(output_usd_per_mtok, "output_usd_per_mtok"),
            None
            if cached_input_usd_per_mtok is None
            else _mtok(cached_input_usd_per_mtok, "cached_input_usd_per_mtok"),
        )
        with _lock:
            _registered[model] = Rates(model, given, None)
            _aliases.pop(model, None)
    clear_cache()


def clear_registered() -> None:
    with _lock:
        _registered.clear()
        _aliases.clear()
        _learned.clear()
    clear_cache()


def learn_reply_model(provider: str | None, requested: str, replied: Any) -> Rates | None:
    """A request for an unpriced name (an Azure deployment, say) whose reply names a priced model:
    price it so, and price later requests for that name the same way (their forecasts too)."""
    if not isinstance(replied, str) or not replied or replied == requested:
        return None
    rates = rates_for(replied, provider)
    if rates is not None:
        with _lock:
            _learned[(provider, requested)] = replied  # kept when the cache is dropped
            table_for(provider)[requested] = rates
    return rates


def table_for(provider: str | None = "openai") -> dict[str, Rates | None]:
    """The cached rates of one provider's models, filled by :func:`rates_for`."""
    table = _tables.get(provider)
    if table is None:
        with _lock:
            table = _tables.setdefault(provider, {})
    return table


def rates_for(model: str, provider: str | None = "openai") -> Rates | None:
    """Cached rates for a model, ``None`` when genai-prices does not know it."""
    table = table_for(provider)
    try:
        return table[model]
    except KeyError:
        pass
    rates = _resolve(model, provider)
    if rates is None:
        log_once(
            ("unpriced", model),
            "runguard: no price known for model %r; its tokens are counted, its cost is treated as 0 USD by "
            "cost limits (or refused with unpriced='refuse'). Register one with runguard.register_price(). "
            "Logged once.",
            model,
        )
    with _lock:
        table[model] = rates
    return rates


def _resolve(model: str, provider: str | None, depth: int = 0) -> Rates | None:
    """Registered prices, then an alias's target, then genai-prices."""
    if model in _registered:
        return _registered[model]
    target = _aliases.get(model) or _learned.get((provider, model))
    if target is not None and depth < _MAX_ALIASES:
        return _resolve(target, provider, depth + 1)
    return _lookup(model, provider)


def _lookup(model: str, provider: str | None) -> Rates | None:
    if not model:
        return None
    try:
        from genai_prices import data_snapshot

        if SNAPSHOT.module is None:
            SNAPSHOT.module, SNAPSHOT.seen = data_snapshot, data_snapshot._custom_snapshot

        snapshot = data_snapshot.get_snapshot()
        try:
            _, info = snapshot.find_provider_model(model, None, provider, None)
        except LookupError:
            _, info = snapshot.find_provider_model(model, None, None, None)
        model_price = info.get_prices(datetime.now(timezone.utc))
        return Rates(model, model_price, getattr(info, "context_window", None))
    except Exception:
        return None


def clear_cache() -> None:
    with _lock:
        for table in _tables.values():
            table.clear()


RUNTIME.on_reset(clear_registered)
