"""``runguard demo``: a looping agent stopped by the breaker, offline, recorded in MLflow.

Starts the package's loopback fake OpenAI server, runs a ReAct-style agent that never
decides it is done (each reply asks for the same tool again) with
``mlflow.openai.autolog()`` + ``runguard.autolog()`` into a local sqlite tracking store,
and prints what tripped, after how many calls, what the unguarded loop would have cost,
and the ``mlflow ui`` command to see the run.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

MODEL = "gpt-4o"
UNGUARDED_CALLS = 3_000  # what a looping agent reaches in a couple of hours
OUTPUT_TOKENS = 60


def _prompt_tokens(body: dict) -> int:
    return max(1, len(json.dumps(body.get("messages", []))) // 4)


def run_demo(directory: str | None = None, max_calls: int = 25, out=print) -> dict[str, Any]:
    for key, value in (
        ("MLFLOW_MODEL_CATALOG_URI", ""),
        ("MLFLOW_DISABLE_TELEMETRY", "true"),
        ("DO_NOT_TRACK", "true"),
    ):
        os.environ.setdefault(key, value)
    import logging

    import mlflow
    import openai

    for name in ("mlflow", "alembic"):  # the demo prints its own summary, not MLflow's set-up chatter
        logging.getLogger(name).setLevel(logging.WARNING)

    import runguard_autolog as runguard
    from runguard_autolog.pricing import rates_for
    from runguard_autolog.testing import FakeOpenAIServer, Reply, ToolCall

    directory = directory or tempfile.mkdtemp(prefix="runguard-demo-")
    uri = f"sqlite:///{os.path.abspath(directory)}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("runguard-demo")

    def looping_reply(body: dict) -> Reply:  # the agent is always told to search again
        return Reply(
            content=_REPLY, tool_calls=[ToolCall("search", _ARGUMENTS)], usage=(_prompt_tokens(body), OUTPUT_TOKENS)
        )

    with FakeOpenAIServer(default=looping_reply) as server:  # type: ignore[arg-type]
        client = openai.OpenAI(base_url=server.base_url, api_key="demo", max_retries=0)
        mlflow.openai.autolog()
        runguard.autolog(max_calls=max_calls)
        messages: list[dict] = [
            {"role": "system", "content": "You are a helpful agent. Use tools until you can answer."},
            {"role": "user", "content": "What is the weather in Paris?"},
        ]
        trip = None
        with mlflow.start_run(run_name="looping-agent") as run:
            while True:
                try:
                    reply = client.chat.completions.create(
                        model=MODEL,
                        messages=messages,  # type: ignore[arg-type]
                        tools=_TOOLS,  # type: ignore[arg-type]
                    )
                except runguard.RunGuardTripped as error:
                    trip = error
                    break
                call = (reply.choices[0].message.tool_calls or [])[0]
                messages.append(reply.choices[0].message.model_dump(exclude_none=True))
                messages.append({"role": "tool", "tool_call_id": call.id, "content": "Cloudy, 12°C (unchanged)."})
            spent = runguard.current()
        mlflow.openai.autolog(disable=True)
        runguard.autolog(disable=True)
        sent = server.count("/chat/completions")

    rates = rates_for(MODEL)
    first_prompt = _prompt_tokens({"messages": messages[:2]})
    # each turn adds one assistant reply and one tool result: the same growth whatever the ceiling
    growth = _prompt_tokens({"messages": messages[:2] + _ONE_TURN}) - first_prompt
    window = (rates.context_window if rates else None) or float("inf")  # the context stops growing at the window
    unguarded = (
        sum(rates.cost(min(first_prompt + growth * i, window), OUTPUT_TOKENS) for i in range(UNGUARDED_CALLS))
        if rates
        else 0.0
    )
    out(f"runguard demo: a ReAct agent that never stops asking for the same tool ({MODEL}).")
    out(f"  tripped:        {trip.reason} [{trip.limit}, scope {trip.scope}]")
    out(f"  billed calls:   {sent} reached the provider; call {sent + 1} was refused before sending")
    out(f"  spent:          ${spent.cost_usd:.4f} ({spent.input_tokens} input + {spent.output_tokens} output tokens)")
    out(f"  unguarded:      the same loop for {UNGUARDED_CALLS:,} calls would have cost about ${unguarded:,.2f}")
    out(f"  MLflow run:     {run.info.run_id} (tags runguard.tripped, runguard.trip_limit; metrics runguard.*)")
    out(f"  see it:         mlflow ui --backend-store-uri {uri}")
    return {
        "trip": trip,
        "sent": sent,
        "spent": spent,
        "unguarded_usd": unguarded,
        "run_id": run.info.run_id,
        "uri": uri,
    }


_REPLY = "Let me look that up once more."
_ARGUMENTS = json.dumps({"query": "current weather in Paris"})
_ONE_TURN = [
    {
        "role": "assistant",
        "content": _REPLY,
        "tool_calls": [{"id": "call_0", "type": "function", "function": {"name": "search", "arguments": _ARGUMENTS}}],
    },
    {"role": "tool", "tool_call_id": "call_0", "content": "Cloudy, 12°C (unchanged)."},
]
_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the web.",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
        },
    }
]
