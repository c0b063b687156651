"""Every Python sample in README.md and docs/ runs, against the package's fake OpenAI server.

Each page's samples run in order in one namespace. What a sample leaves to the reader is given
here, and only that: ``client`` (an ``openai.OpenAI()`` that reads ``OPENAI_BASE_URL``, set to
the fake server), a small ``agent`` making three chat calls per ``run()``/``invoke()``,
``tenant``, ``tasks``, ``pool``, ``work`` and ``items``. The samples' Redis host
(``redis.internal``) is the test Redis (``RG_TEST_REDIS_URL``; pages that need it skip without).
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SAMPLED = [page for page in PAGES if "```python" in page.read_text()]
SAMPLE_REDIS = "redis://redis.internal:6379/0"


def samples(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M)


def test_the_docs_have_samples_and_every_one_is_collected():
    assert len(SAMPLED) >= 8
    assert sum(len(samples(page)) for page in PAGES) == sum(p.read_text().count("```python") for p in PAGES)


@pytest.mark.parametrize("page", SAMPLED, ids=[str(page.relative_to(ROOT)) for page in SAMPLED])
def test_every_sample_of_the_page_runs(page, server, tracking, monkeypatch):
    import mlflow
    import openai

    import runguard_autolog as runguard

    blocks = samples(page)
    redis_url = os.environ.get("RG_TEST_REDIS_URL")
    if any(SAMPLE_REDIS in block for block in blocks) and not redis_url:
        pytest.skip("RG_TEST_REDIS_URL is not set (.ci/run starts Debian's redis-server)")
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    client = openai.OpenAI(max_retries=0)

    class Agent:
        """Three chat calls per run: what the samples' ``agent`` stands for."""

        def run(self, task=None):
            for _ in range(3):
                client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "go"}])

        def invoke(self, *args, **kwargs):
            self.run()

    def work(item):
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": str(item)}])
        return item

    pool = ThreadPoolExecutor(2)
    namespace = {
        "__name__": "doc_sample", "runguard": runguard, "mlflow": mlflow, "openai": openai, "client": client,
        "agent": Agent(), "tenant": "acme", "tasks": [SimpleNamespace(id=f"task-{i}") for i in range(2)],
        "pool": pool, "work": work, "items": [1, 2],
    }
    try:
        for index, block in enumerate(blocks):
            code = block.replace(SAMPLE_REDIS, redis_url or SAMPLE_REDIS)
            exec(compile(code, f"{page.relative_to(ROOT)} sample {index + 1}", "exec"), namespace)  # noqa: S102
        assert runguard.flush()
    finally:
        pool.shutdown()
        if redis_url:
            for name in ("nightly-eval", "tenant:acme"):
                runguard.reset_shared(name, store=redis_url)
    calls = any("agent." in b or ("client.chat" in b and "FakeOpenAIServer" not in b) for b in blocks)
    if calls:  # the samples' calls reached the fake server (a page of settings alone makes none)
        assert server.count() > 0
