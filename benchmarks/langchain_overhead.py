"""What runguard adds to a LangChain model call, beside LangChain's ModelCallLimitMiddleware.

One model call per agent turn: ``langchain.agents.create_agent`` over ``ChatOpenAI``
whose HTTP client is an ``httpx.MockTransport`` answering a canned final reply (no tool
calls), so each ``agent.invoke`` is exactly one model call through the real openai SDK.

In each of ``--processes`` fresh processes, three arms are interleaved round by round
(the order rotates): the bare agent with runguard installed but switched off; the same
agent with runguard switched on; and an agent built with
``ModelCallLimitMiddleware(run_limit=10**9)`` with runguard switched off. "Added" is the
median of the per-round differences against the bare arm, pooled over processes. In
separate fresh processes, ``mlflow.langchain.autolog()`` (traces to a temp sqlite store)
is timed against a bare agent for context: its added median, not paired.

    python benchmarks/langchain_overhead.py            # ~1 minute; writes benchmarks/results-langchain.md
    python benchmarks/langchain_overhead.py --quick    # ~15 s; prints only

Target (issue: LangChain): runguard's added latency <= 1/10 of ModelCallLimitMiddleware's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

CANNED = {
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "yes"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 20, "completion_tokens": 1, "total_tokens": 21},
}
ENV = {"MLFLOW_MODEL_CATALOG_URI": "", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


def make_agent(middleware=()):
    import httpx
    from langchain.agents import create_agent
    from langchain_openai import ChatOpenAI

    body = json.dumps(CANNED).encode()
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body,
                                                                   headers={"content-type": "application/json"}))
    model = ChatOpenAI(model="gpt-4o-mini", base_url="http://mock.invalid/v1", api_key="bench", max_retries=0,
                       http_client=httpx.Client(transport=transport))
    return create_agent(model, [], middleware=list(middleware))


def child_paired(rounds: int) -> dict:
    from langchain.agents.middleware import ModelCallLimitMiddleware

    import runguard_autolog as runguard
    from runguard_autolog._runtime import RUNTIME

    runguard.autolog(max_calls=math.inf, max_input_tokens=math.inf, max_output_tokens=math.inf)
    bare, limited = make_agent(), make_agent([ModelCallLimitMiddleware(run_limit=10**9)])
    request = {"messages": [("user", "Is the benchmark running?")]}

    def timed(agent, guard_on: bool) -> int:
        RUNTIME.enabled = guard_on
        start = time.perf_counter_ns()
        agent.invoke(request)
        return time.perf_counter_ns() - start

    arms = {"bare": (bare, False), "runguard": (bare, True), "middleware": (limited, False)}
    names = list(arms)
    for _ in range(50):
        for name in names:
            timed(*arms[name])
    before = runguard.current().calls
    samples: dict[str, list[int]] = {name: [] for name in names}
    for i in range(rounds):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(timed(*arms[name]))
    RUNTIME.enabled = True
    assert runguard.current().calls - before == rounds, "runguard must count each guarded model call once"
    return samples


def child_mlflow(calls: int, with_mlflow: bool) -> dict:
    if with_mlflow:
        import mlflow

        mlflow.set_tracking_uri(f"sqlite:///{tempfile.mkdtemp()}/mlflow.db")
        mlflow.langchain.autolog()
    agent = make_agent()
    request = {"messages": [("user", "Is the benchmark running?")]}
    for _ in range(10):
        agent.invoke(request)
    samples = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        agent.invoke(request)
        samples.append(time.perf_counter_ns() - start)
        if with_mlflow:
            time.sleep(0.02)  # let the asynchronous trace export drain between calls
    return {"samples": samples}


def run_child(kind: str, params: dict) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RUNGUARD_")}
    environ.update(ENV, _RUNGUARD_STRICT="1")
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--params", json.dumps(params)],
                         env=environ, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"child {kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def paired_added(on: list[int], off: list[int]) -> tuple[float, float, float]:
    diffs = sorted(a - b for a, b in zip(on, off))
    n = len(diffs)
    half = 0.98 * math.sqrt(n)
    lo, hi = diffs[max(0, int(n / 2 - half))], diffs[min(n - 1, int(n / 2 + half))]
    return statistics.median(diffs) / 1000, lo / 1000, hi / 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--processes", type=int, default=None)
    parser.add_argument("--child", choices=["paired", "mlflow", "bare"])
    parser.add_argument("--params", default="{}")
    args = parser.parse_args()
    if args.child:
        params = json.loads(args.params)
        if args.child == "paired":
            result = child_paired(params["rounds"])
        else:
            result = child_mlflow(params["calls"], args.child == "mlflow")
        print(json.dumps(result))
        return

    started = time.time()
    processes = args.processes or (1 if args.quick else 3)
    rounds = 300 if args.quick else 1000
    pooled: dict[str, list[int]] = {"bare": [], "runguard": [], "middleware": []}
    for p in range(processes):
        samples = run_child("paired", {"rounds": rounds})
        for name in pooled:
            pooled[name] += samples[name]
        print(f"  process {p + 1}/{processes} done", file=sys.stderr)
    rg = paired_added(pooled["runguard"], pooled["bare"])
    mw = paired_added(pooled["middleware"], pooled["bare"])
    calls = 30 if args.quick else 100
    bare = statistics.median(run_child("bare", {"calls": calls})["samples"]) / 1000
    traced = statistics.median(run_child("mlflow", {"calls": calls})["samples"]) / 1000
    ratio = rg[0] / mw[0] if mw[0] > 0 else math.inf
    lines = [
        "# runguard on a LangChain model call" + (" (quick run)" if args.quick else ""),
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}; {os.cpu_count()} CPUs; Python {sys.version.split()[0]}; "
        f"`python benchmarks/langchain_overhead.py{' --quick' if args.quick else ''}` took {time.time() - started:.0f} s. "
        f"One model call per `agent.invoke` (`create_agent` over `ChatOpenAI`, MockTransport). "
        f"Paired arms: {processes} process(es) x {rounds:,} rounds, pooled. Microseconds per model call.",
        "",
        "| what | added per model call | 95% CI | how |",
        "|---|---:|---|---|",
        f"| runguard | **{rg[0]:.1f}** | {rg[1]:.1f} to {rg[2]:.1f} | paired, switch flipped |",
        f"| `ModelCallLimitMiddleware(run_limit=10**9)` | **{mw[0]:.1f}** | {mw[1]:.1f} to {mw[2]:.1f} | paired, second agent |",
        f"| `mlflow.langchain.autolog()` | {traced - bare:.1f} | - | fresh-process medians ({bare:.0f} vs {traced:.0f}), context only |",
        "",
        f"Target: runguard <= 1/10 of ModelCallLimitMiddleware's added latency. Measured ratio: **{ratio:.3f}** "
        f"-> {'PASS' if ratio <= 0.1 else 'FAIL'}.",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if not args.quick:
        (HERE / "results-langchain.md").write_text(report)


if __name__ == "__main__":
    main()
