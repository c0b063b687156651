"""A/B of two versions of runguard_autolog in one run: what each adds to an OpenAI chat call.

    python benchmarks/compare.py --base <git rev> [--rounds 8] [--calls 3000]
                                 [--out benchmarks/results-compare.md]

"base" is ``--base`` checked out in a temporary ``git worktree`` (removed at the end);
"head" is the current checkout's ``runguard_autolog`` package, uncommitted changes included,
copied to a temporary directory at the start (so edits made to the checkout during the run
do not mix two versions into one arm). Each round runs one child
process per version, one after the other, the order alternating (base, head, head, base,
...) so neither version always runs first. A child imports the package from its own tree
(``PYTHONPATH``; the child checks where it was imported from), starts the package's
loopback ``FakeOpenAIServer``, installs ``runguard_autolog.autolog()`` with lifted limits
(default scope, no session), warms up, then measures the call
``client.chat.completions.create(model="gpt-4o-mini", messages=[system, user])``:

(a) paired added latency: ``--calls`` pairs, the breaker switched on and off between
    consecutive calls with ``runguard_autolog._runtime.RUNTIME.enabled`` (set outside the
    timed region; the order within a pair alternates). Reported: median(on) - median(off)
    and the median of the per-pair differences (on - off).
(b) installed vs unpatched: ``--calls`` calls with the breaker on, then
    ``autolog(disable=True)`` and ``--calls`` calls on the unpatched SDK; median of each.
    Two blocks in sequence do not cancel drift, so before them the same comparison is also
    made call by call: ``--calls`` pairs of the installed call (breaker on) and the original
    ``Completions.create`` captured before ``autolog()`` (the unpatched SDK method), order
    alternating; the median of the per-pair differences.

The parent aggregates per version the median over rounds with a bootstrap 95% CI, and the
head - base difference with a paired (by round) bootstrap CI, then prints a markdown report
and writes it to ``--out``. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODEL = "gpt-4o-mini"
MESSAGES = [
    {"role": "system", "content": "You are a terse assistant. Answer in one word."},
    {"role": "user", "content": "Is the benchmark running?"},
]
WARMUP = 200
RESAMPLES = 10_000
ARMS = ("base", "head")
METRICS = {  # key in a child's result -> label in the report
    "added_pairs_us": "paired added: median of per-pair differences",
    "added_medians_us": "paired added: median(on) - median(off)",
    "installed_minus_unpatched_us": "installed (on) - unpatched, two blocks: medians",
    "installed_vs_original_pairs_us": "installed (on) - unpatched, interleaved: per-pair median",
}


# == child: one version, one process =========================================================
def child(calls: int, tree: str) -> dict:
    from time import perf_counter_ns

    import openai
    import wrapt
    from openai.resources.chat.completions import Completions

    import runguard_autolog as runguard
    from runguard_autolog._runtime import RUNTIME
    from runguard_autolog.testing import FakeOpenAIServer

    imported_from = str(Path(runguard.__file__).resolve())
    if not imported_from.startswith(str(Path(tree).resolve()) + os.sep):
        raise SystemExit(f"runguard_autolog imported from {imported_from}, not from {tree}")

    original = Completions.create  # the unpatched SDK method, captured before autolog() wraps it
    with FakeOpenAIServer() as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="t", max_retries=0)
        runguard.autolog(max_calls=math.inf, max_input_tokens=math.inf, max_output_tokens=math.inf)

        def timed(flag: bool) -> int:
            RUNTIME.enabled = flag
            start = perf_counter_ns()
            client.chat.completions.create(model=MODEL, messages=MESSAGES)
            return perf_counter_ns() - start

        def timed_original() -> int:
            RUNTIME.enabled = True  # as for the installed call: only the wrapper is missing
            start = perf_counter_ns()
            original(client.chat.completions, model=MODEL, messages=MESSAGES)
            return perf_counter_ns() - start

        def pairs(n: int, off_arm=lambda: timed(False)) -> tuple[list[int], list[int]]:
            on, off = [], []
            for i in range(n):
                if i % 2:
                    off.append(off_arm())
                    on.append(timed(True))
                else:
                    on.append(timed(True))
                    off.append(off_arm())
            return on, off

        requests = 0

        def phase(run):  # the server's request log is emptied after each phase (it only grows)
            nonlocal requests
            result = run()
            requests += server.count()
            server.reset()
            return result

        phase(lambda: pairs(WARMUP))
        before = runguard.current().calls
        on, off = phase(lambda: pairs(calls))
        counted = runguard.current().calls - before
        versus = phase(lambda: pairs(calls, timed_original))
        installed = phase(lambda: [timed(True) for _ in range(calls)])
        runguard.autolog(disable=True)
        unpatched_ok = not isinstance(Completions.__dict__["create"], wrapt.ObjectProxy)
        unpatched = phase(lambda: [timed(False) for _ in range(calls)])  # no wrapper left to switch

    med = statistics.median
    expected = 2 * WARMUP + 6 * calls
    if counted != calls or requests != expected or not unpatched_ok:
        raise SystemExit(f"sanity check failed: counted {counted} of {calls} guarded calls, server got "
                         f"{requests} of {expected} requests, unpatched after disable: {unpatched_ok}")
    return {
        "on_us": med(on) / 1e3, "off_us": med(off) / 1e3,
        "added_medians_us": (med(on) - med(off)) / 1e3,
        "added_pairs_us": med(a - b for a, b in zip(on, off)) / 1e3,
        "installed_us": med(installed) / 1e3, "unpatched_us": med(unpatched) / 1e3,
        "installed_minus_unpatched_us": (med(installed) - med(unpatched)) / 1e3,
        "installed_vs_original_pairs_us": med(a - b for a, b in zip(*versus)) / 1e3,
        "openai": openai.__version__, "imported_from": imported_from,
    }


# == parent ==================================================================================
def git(*args: str, cwd: Path = REPO) -> str:
    proc = subprocess.run(["git", *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise SystemExit(f"git {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def child_env(tree: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNGUARD_")}
    env.update(PYTHONPATH=str(tree), MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true",
               _RUNGUARD_STRICT="1")  # an internal runguard error fails the run, not the measurement
    return env


def run_child(tree: Path, calls: int) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--calls", str(calls), "--tree", str(tree)]
    proc = subprocess.run(command, check=False, cwd=tree, capture_output=True, text=True, env=child_env(tree), timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"child in {tree} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bootstrap_ci(samples: list[float], rng: random.Random) -> tuple[float, float]:
    """Percentile bootstrap 95% CI of the median (overhead.py's order-statistic CI of the
    median spans every value at 6-8 rounds, so it is not reused here)."""
    n = len(samples)
    stats = sorted(statistics.median(rng.choices(samples, k=n)) for _ in range(RESAMPLES))
    return stats[int(0.025 * RESAMPLES)], stats[int(0.975 * RESAMPLES) - 1]


def paired_difference(head: list[float], base: list[float], rng: random.Random) -> tuple[float, tuple]:
    """median(head) - median(base), with a bootstrap CI resampling whole rounds (both arms
    of a round together, which keeps the drift they shared)."""
    n = len(head)
    stats = []
    for _ in range(RESAMPLES):
        idx = [rng.randrange(n) for _ in range(n)]
        stats.append(statistics.median(head[i] for i in idx) - statistics.median(base[i] for i in idx))
    stats.sort()
    return statistics.median(head) - statistics.median(base), (stats[int(0.025 * RESAMPLES)],
                                                              stats[int(0.975 * RESAMPLES) - 1])


def package_digest(tree: Path) -> str:
    """A digest of the package's sources (the checkout may change while the run goes on)."""
    digest = hashlib.sha256()
    for path in sorted((tree / "runguard_autolog").rglob("*.py")):
        digest.update(str(path.relative_to(tree)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def fmt(x: float) -> str:
    return f"{x:,.1f}"


def interval(ci: tuple[float, float]) -> str:
    return f"{fmt(ci[0])} to {fmt(ci[1])}"


def render(results: dict[str, list[dict]], meta: dict) -> str:
    rng = random.Random(0)
    lines = [
        "# runguard_autolog: base vs head, interleaved processes", "",
        f"`{meta['command']}`", "",
        (f"{meta['when']}; {os.cpu_count()} CPUs ({platform.machine()}); Python {platform.python_version()}, "
         f"openai {meta['openai']}; took {meta['seconds']:.0f} s."),
        f"base = `{meta['base_rev']}` ({meta['base_sha']}); head = {meta['head']}.",
        (f"{meta['rounds']} rounds, one process per version per round, order alternating "
         f"(base, head, head, base, ...); per process {meta['calls']:,} on/off pairs, {meta['calls']:,} "
         f"installed/unpatched pairs and {meta['calls']:,} + {meta['calls']:,} installed/unpatched calls "
         "in two blocks over loopback HTTP "
         f"(the package's `FakeOpenAIServer`, in the child), after {WARMUP} warm-up pairs. "
         "Figures are microseconds per call: the median over rounds, with a bootstrap 95% CI."), "",
        "| version | " + " | ".join(METRICS.values()) + " | median on / off | installed / unpatched |",
        "|---|" + "---:|" * len(METRICS) + "---:|---:|",
    ]
    for name in ARMS:
        runs = results[name]
        cells = []
        for key in METRICS:
            values = [r[key] for r in runs]
            cells.append(f"**{fmt(statistics.median(values))}** ({interval(bootstrap_ci(values, rng))})")
        on_off = f"{fmt(statistics.median(r['on_us'] for r in runs))} / {fmt(statistics.median(r['off_us'] for r in runs))}"
        inst = (f"{fmt(statistics.median(r['installed_us'] for r in runs))} / "
                f"{fmt(statistics.median(r['unpatched_us'] for r in runs))}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {on_off} | {inst} |")
    lines += ["", "Head minus base (rounds paired; bootstrap 95% CI resampling rounds):", "",
              "| metric | head - base | 95% CI |", "|---|---:|---|"]
    for key, label in METRICS.items():
        diff, ci = paired_difference([r[key] for r in results["head"]], [r[key] for r in results["base"]], rng)
        lines.append(f"| {label} | **{fmt(diff)}** | {interval(ci)} |")
    lines += ["", "Per-round values (paired added, median of per-pair differences):", ""]
    for name in ARMS:
        lines.append(f"- {name}: " + " / ".join(fmt(r["added_pairs_us"]) for r in results[name]))
    lines += ["", ("'Two blocks' compares two consecutive blocks of calls in one process (the unpatched "
                   "block after `autolog(disable=True)`), so slow drift is not cancelled there as it is in "
                   "the paired figures. 'Interleaved' pairs each installed call (breaker on) with a call to "
                   "the original `Completions.create` captured before `autolog()`, so it is paired like (a) "
                   "and is the figure to read."), ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="git revision to compare the current checkout against")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--calls", type=int, default=3000, help="pairs, and calls per installed/unpatched block")
    parser.add_argument("--out", type=Path, default=HERE / "results-compare.md")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.calls, args.tree)))
        return
    if not args.base:
        parser.error("--base is required")
    if args.rounds < 2 or args.calls < 1:
        parser.error("need --rounds >= 2 and --calls >= 1")

    started = time.monotonic()
    base_sha = git("rev-parse", "--verify", f"{args.base}^{{commit}}")
    head_sha = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--", "runguard_autolog")
    meta = {
        "command": "python3 benchmarks/compare.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "when": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "base_rev": args.base, "base_sha": base_sha[:12], "rounds": args.rounds, "calls": args.calls,
        "head": f"the checkout at {head_sha}" + (" plus uncommitted package changes" if dirty else ""),
    }
    results: dict[str, list[dict]] = {name: [] for name in ARMS}
    with tempfile.TemporaryDirectory(prefix="runguard-compare-") as tmp:
        base_tree, head_tree = Path(tmp) / "base", Path(tmp) / "head"
        shutil.copytree(REPO / "runguard_autolog", head_tree / "runguard_autolog",
                        ignore=shutil.ignore_patterns("__pycache__"))
        head_digest = package_digest(head_tree)
        meta["head"] += f" (package sources digest {head_digest})"
        git("worktree", "add", "--detach", str(base_tree), base_sha)
        try:
            trees = {"base": base_tree, "head": head_tree}
            progress(f"compare: base {base_sha[:12]} in {base_tree} vs head {REPO} (copied to {head_tree})")
            for r in range(args.rounds):
                for name in (ARMS if r % 2 == 0 else ARMS[::-1]):
                    result = run_child(trees[name], args.calls)
                    results[name].append(result)
                    progress(f"  round {r + 1}/{args.rounds} {name}: paired added {result['added_pairs_us']:6.1f} us "
                             f"(medians {result['added_medians_us']:6.1f}), installed - unpatched "
                             f"{result['installed_minus_unpatched_us']:6.1f} us (blocks), "
                             f"{result['installed_vs_original_pairs_us']:6.1f} us (interleaved)")
        finally:
            git("worktree", "remove", "--force", str(base_tree))
    if package_digest(REPO) != head_digest:
        meta["head"] += "; the checkout changed during the run, the copy taken at the start was measured"
        progress("note: the checkout's package changed during the run; the copy taken at the start was measured")
    meta["openai"] = results["head"][0]["openai"]
    meta["seconds"] = time.monotonic() - started
    report = render(results, meta)
    print(report)
    args.out.write_text(report)
    progress(f"written to {args.out}")


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
