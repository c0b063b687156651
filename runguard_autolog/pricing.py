"""USD cost from genai-prices, resolved once per model and cached.

An uncached genai-prices lookup costs ~100 µs, so the hot path only ever reads a
cached :class:`Rates` (plain floats; tiered prices keep genai-prices' cliff rule:
crossing a tier prices *all* tokens at that tier). A model genai-prices does not know
is *unpriced*: its tokens are counted, a warning is logged once, and cost limits
treat its calls as costing 0 USD.
"""

from __future__ import annotations

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

    __slots__ = ("cache_read", "context_window", "flat", "input", "model", "output")

    def __init__(self, model: str, model_price: Any, context_window: int | None) -> None:
        self.model = model
        self.input = _Price(getattr(model_price, "input_mtok", None))
        self.output = _Price(getattr(model_price, "output_mtok", None))
        cache_read = getattr(model_price, "cache_read_mtok", None)
        self.cache_read = _Price(cache_read) if cache_read is not None else self.input
        self.context_window = context_window
        tiered = self.input.tiers or self.output.tiers or self.cache_read.tiers
        # (input, output, cached-input) USD per token when no tier applies: lets the hot path
        # price a call with three multiplications and no call
        self.flat = None if tiered else (self.input.base, self.output.base, self.cache_read.base)

    def cost(self, input_tokens: float, output_tokens: float, cached_tokens: float = 0) -> float:
        flat = self.flat
        if flat is not None:
            return (input_tokens - cached_tokens) * flat[0] + output_tokens * flat[1] + cached_tokens * flat[2]
        uncached = max(input_tokens - cached_tokens, 0)
        return (
            uncached * self.input.per_token(input_tokens)
            + cached_tokens * self.cache_read.per_token(input_tokens)
            + output_tokens * self.output.per_token(input_tokens)
        )


# provider -> {model: Rates or None}; the guard reads a provider's table directly (one dict get)
_tables: dict[str | None, dict[str, Rates | None]] = {}
_lock = threading.Lock()
RUNTIME.fork_safe(sys.modules[__name__], "_lock", threading.Lock)


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
    rates = _lookup(model, provider)
    with _lock:
        table[model] = rates
    return rates


def _lookup(model: str, provider: str | None) -> Rates | None:
    if not model:
        return None
    try:
        from genai_prices import data_snapshot

        snapshot = data_snapshot.get_snapshot()
        try:
            _, info = snapshot.find_provider_model(model, None, provider, None)
        except LookupError:
            _, info = snapshot.find_provider_model(model, None, None, None)
        model_price = info.get_prices(datetime.now(timezone.utc))
        return Rates(model, model_price, getattr(info, "context_window", None))
    except Exception as error:
        log_once(
            ("unpriced", model),
            "runguard: no price known for model %r (%s); its tokens are counted, its cost is "
            "treated as 0 USD by cost limits. Logged once.",
            model,
            type(error).__name__,
        )
        return None


def clear_cache() -> None:
    with _lock:
        for table in _tables.values():
            table.clear()


RUNTIME.on_reset(clear_cache)
