"""What settling a call through genai-prices' own price calculation would add, beside the cached
flat rates runguard settles with.

    python benchmarks/pricing_settle.py [--calls 20000] [--out benchmarks/results-pricing.md]

Three ways to price one call's usage (gpt-4o-mini, 1,200 input tokens of which 200 cached, 300
output tokens), each timed over ``--calls`` calls in one process, interleaved in blocks of 1,000
so machine drift hits all three alike: runguard's cached ``Rates.cost`` (what a settle does),
runguard's price lookup when the cache is cold (once per model, or after genai-prices' snapshot
changes), and ``genai_prices.calc_price`` per call. Prints a markdown table and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

from genai_prices import Usage, calc_price

from runguard_autolog import pricing

MODEL = "gpt-4o-mini"
INPUT, CACHED, OUTPUT = 1200, 200, 300


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results-pricing.md"))
    args = parser.parse_args()
    rates = pricing.rates_for(MODEL)
    assert rates is not None
    usage = Usage(input_tokens=INPUT, cache_read_tokens=CACHED, output_tokens=OUTPUT)
    expected = float(calc_price(usage, MODEL, provider_id="openai").total_price)
    assert abs(rates.cost(INPUT, OUTPUT, CACHED) - expected) < 1e-12, "the two must price alike"

    def cached() -> None:
        rates.cost(INPUT, OUTPUT, CACHED)

    def cold() -> None:
        pricing.clear_cache()
        pricing.rates_for(MODEL)

    def genai() -> None:
        calc_price(usage, MODEL, provider_id="openai")

    arms = {
        "runguard cached rates (each settle)": cached,
        "runguard lookup, cold cache (once per model)": cold,
        "genai_prices.calc_price (per call)": genai,
    }
    samples: dict[str, list[float]] = {name: [] for name in arms}
    block = 1000
    for _ in range(max(1, args.calls // block)):
        for name, step in arms.items():
            started = time.perf_counter_ns()
            for _ in range(block):
                step()
            samples[name].append((time.perf_counter_ns() - started) / block / 1000)
    lines = [
        "# Pricing a settle: cached rates vs genai-prices' calculation",
        "",
        (
            f"`python benchmarks/pricing_settle.py --calls {args.calls}`; Python {platform.python_version()}, "
            f"{MODEL}, {INPUT} input ({CACHED} cached) + {OUTPUT} output tokens; median of blocks of {block} calls."
        ),
        "",
        "| way | µs per call |",
        "| --- | ---: |",
        *(f"| {name} | {statistics.median(values):.2f} |" for name, values in samples.items()),
        "",
        (
            "Both price the call alike (checked at start). Settling every call through `calc_price` would add "
            "its figure to each billed call, so runguard keeps the cached rates on the hot path and looks "
            "prices up again only when genai-prices' snapshot changes."
        ),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
