#!/usr/bin/env python
"""What runguard adds to an Anthropic ``messages.create`` call, beside an openai chat call, in one run.

    python benchmarks/anthropic_overhead.py           # about 1 minute; writes benchmarks/results-anthropic.md
    python benchmarks/anthropic_overhead.py --quick   # about 15 s; prints only

The parent hosts the package's loopback fake server (it answers both APIs); a child process
measures, so the server does not compete with the client for the GIL. In the child,
``runguard.autolog()`` is installed with lifted limits, and pairs of calls are timed with the
breaker switched on and off between consecutive calls (``RUNTIME.enabled``, set outside the
timed region; the order within a pair alternating), round-robin between the two SDKs:

- openai: ``client.chat.completions.create(model="gpt-4o-mini", messages=[system, user])``;
- anthropic: ``client.messages.create(model="claude-3-5-haiku-latest", max_tokens=64,
  system=..., messages=[user])``.

Reported per SDK: the median call with the breaker off and on, and the median of the per-pair
differences with a distribution-free 95% CI. Each SDK's guard must count exactly the calls it
guarded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

CHILD = r"""
import json, sys, time
import anthropic, openai
import runguard_autolog as runguard
from runguard_autolog import _runtime
base_url, pairs = sys.argv[1], int(sys.argv[2])
_runtime.set_strict(True)
runguard.autolog(max_calls="none", max_input_tokens="none", max_output_tokens="none")
oa = openai.OpenAI(base_url=base_url, api_key="t", max_retries=0)
an = anthropic.Anthropic(base_url=base_url.removesuffix("/v1"), api_key="t", max_retries=0)
SYSTEM, USER = "You are a careful assistant.", {"role": "user", "content": "Summarize the plan in one line."}
calls = {
    "openai": lambda: oa.chat.completions.create(model="gpt-4o-mini",
                                                  messages=[{"role": "system", "content": SYSTEM}, USER]),
    "anthropic": lambda: an.messages.create(model="claude-3-5-haiku-latest", max_tokens=64, system=SYSTEM,
                                            messages=[USER]),
}
samples = {name: {"on": [], "off": []} for name in calls}
guarded = {name: 0 for name in calls}
for name, call in calls.items():  # warm-up
    for _ in range(200):
        call()
runguard.reset()
for i in range(pairs):
    for name, call in calls.items():
        order = ("on", "off") if i % 2 else ("off", "on")
        for arm in order:
            _runtime.RUNTIME.enabled = arm == "on"
            started = time.perf_counter_ns()
            call()
            samples[name][arm].append(time.perf_counter_ns() - started)
            guarded[name] += arm == "on"
        _runtime.RUNTIME.enabled = True
snapshot = runguard.current()
assert snapshot.calls == sum(guarded.values()), (snapshot.calls, guarded)
print(json.dumps(samples))
"""


def median_ci_us(values: list[int]) -> tuple[float, float]:
    ordered = sorted(values)
    n = len(ordered)
    half = 0.98 * math.sqrt(n)
    low, high = max(0, math.floor(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half))
    return ordered[low] / 1e3, ordered[high] / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    pairs = 500 if args.quick else 3000
    sys.path.insert(0, str(ROOT))
    import anthropic
    import openai

    from runguard_autolog.testing import FakeOpenAIServer

    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNGUARD_")}
    env["PYTHONPATH"] = str(ROOT)
    with FakeOpenAIServer() as server:
        result = subprocess.run([sys.executable, "-c", CHILD, server.base_url, str(pairs)], capture_output=True,
                                text=True, env=env, timeout=1800)
        if result.returncode != 0:
            raise SystemExit(result.stderr[-3000:])
        sent = server.count()
    samples = json.loads(result.stdout.strip().splitlines()[-1])
    assert sent == 2 * 200 + 4 * pairs, sent
    command = "python benchmarks/anthropic_overhead.py" + (" --quick" if args.quick else "")
    lines = [
        "# What runguard adds to an Anthropic call, beside openai", "",
        f"{datetime.date.today().isoformat()}; Python {platform.python_version()}, anthropic {anthropic.__version__}, "
        f"openai {openai.__version__}; {os.cpu_count()} CPUs. `{command}`: {pairs:,} pairs per SDK, loopback fake "
        "server, breaker switched on/off between consecutive calls.", "",
        "| SDK | median off (us) | median on (us) | added, median of pair differences (us) | 95% CI (us) |",
        "|---|---|---|---|---|",
    ]
    for name in ("openai", "anthropic"):
        on, off = samples[name]["on"], samples[name]["off"]
        diffs = [a - b for a, b in zip(on, off)]
        low, high = median_ci_us(diffs)
        lines.append(
            f"| {name} | {statistics.median(off) / 1e3:.0f} | {statistics.median(on) / 1e3:.0f} | "
            f"**{statistics.median(diffs) / 1e3:.1f}** | {low:.1f} to {high:.1f} |"
        )
    lines.append("")
    report = "\n".join(lines)
    print(report)
    if not args.quick:
        (HERE / "results-anthropic.md").write_text(report)


if __name__ == "__main__":
    main()
