"""Call, token and cost ceilings: exactly N billed requests, the next refused before sending."""

from __future__ import annotations

import asyncio
import math
import threading

import pytest
from genai_prices import Usage, calc_price

import runguard_autolog as runguard
from runguard_autolog.testing import Reply
from runguard_autolog.tokens import messages_tokens

from .conftest import MESSAGES, MODEL, chat


def test_call_ceiling_lets_exactly_n_requests_through_and_refuses_the_next_before_sending(client, server):
    runguard.autolog(max_calls=5)
    for _ in range(5):
        chat(client)
    with pytest.raises(runguard.RunGuardTripped) as info:
        chat(client)
    assert server.count("/chat/completions") == 5
    trip = info.value
    assert isinstance(trip, RuntimeError)
    assert (trip.limit, trip.threshold, trip.observed, trip.scope) == ("max_calls", 5, 5, "process")
    assert trip.reason == "call ceiling hit (5/5)"
    assert "RUNGUARD_MAX_CALLS" in str(trip) and "runguard.reset()" in str(trip)


async def test_async_ceiling_holds_exactly_under_50_concurrent_tasks(async_client, server):
    server.default = Reply(delay=0.02)
    runguard.autolog(max_calls=10)

    async def one():
        try:
            await async_client.chat.completions.create(model=MODEL, messages=MESSAGES)
            return "sent"
        except runguard.RunGuardTripped:
            return "refused"

    results = await asyncio.gather(*(one() for _ in range(50)))
    assert results.count("sent") == 10
    assert results.count("refused") == 40
    assert server.count("/chat/completions") == 10
    assert runguard.current().calls == 10


def test_thread_ceiling_holds_exactly_under_32_threads(client, server):
    server.default = Reply(delay=0.005)
    runguard.autolog(max_calls=25)
    outcomes: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(32)

    def worker():
        start.wait()
        for _ in range(3):
            try:
                chat(client)
                outcome = "sent"
            except runguard.RunGuardTripped:
                outcome = "refused"
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=worker) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("sent") == 25
    assert server.count("/chat/completions") == 25
    assert runguard.current().calls == 25


def test_trip_is_sticky_even_when_the_agent_swallows_the_exception(client, server):
    runguard.autolog(max_calls=2)
    refused = 0
    for _ in range(10):
        try:
            chat(client)
        except Exception:  # a careless agent loop
            refused += 1
    assert server.count() == 2
    assert refused == 8
    assert runguard.current().tripped.limit == "max_calls"


def test_reset_closes_the_circuit_and_zeroes_the_counters(client, server):
    runguard.autolog(max_calls=2)
    chat(client)
    chat(client)
    with pytest.raises(runguard.RunGuardTripped):
        chat(client)
    runguard.reset()
    snapshot = runguard.current()
    assert (snapshot.calls, snapshot.input_tokens, snapshot.tripped) == (0, 0, None)
    chat(client)
    chat(client)
    with pytest.raises(runguard.RunGuardTripped):
        chat(client)
    assert server.count() == 4


def test_input_token_ceiling_trips_on_reported_usage(client, server):
    server.default = Reply(prompt_tokens=100)
    runguard.autolog(max_input_tokens=250)
    for _ in range(3):  # 100, 200, then 300 >= 250 trips
        chat(client)
    with pytest.raises(runguard.RunGuardTripped) as info:
        chat(client)
    assert info.value.limit == "max_input_tokens"
    assert info.value.reason == "input-token ceiling hit (300/250)"
    assert server.count() == 3
    assert runguard.current().input_tokens == 300


def test_output_ceiling_without_cap_can_overshoot_by_one_call_but_with_cap_never(client, server):
    server.default = Reply(content="one two three four five")  # 5 completion tokens
    runguard.autolog(max_output_tokens=12)
    for _ in range(3):  # 5, 10, 15: the third call had no cap, so it may overshoot
        chat(client)
    with pytest.raises(runguard.RunGuardTripped) as info:
        chat(client)
    assert info.value.limit == "max_output_tokens"
    assert server.count() == 3

    server.reset()
    server.default = Reply(content="one two three four five")
    runguard.reset()
    chat(client, max_tokens=5)
    chat(client, max_tokens=5)
    with pytest.raises(runguard.RunGuardTripped) as info:  # 10 + 5 reserved > 12: refused, not sent
        chat(client, max_tokens=5)
    assert server.count() == 2
    assert runguard.current().output_tokens == 10


def test_total_token_ceiling(client, server):
    server.default = Reply(prompt_tokens=20, content="a b c d e")  # 25 per call
    runguard.autolog(max_total_tokens=70)
    chat(client)
    chat(client)
    chat(client)  # 50 + the prompt forecast still fits; 75 >= 70 trips
    with pytest.raises(runguard.RunGuardTripped) as info:
        chat(client)
    assert info.value.limit == "max_total_tokens"
    assert runguard.current().total_tokens == 75
    assert server.count() == 3


def test_cost_ceiling_matches_genai_prices(client, server):
    server.default = Reply(prompt_tokens=1000, content=" ".join(["w"] * 200))
    per_call = float(calc_price(Usage(input_tokens=1000, output_tokens=200), model_ref=MODEL, provider_id="openai").total_price)
    runguard.autolog(max_cost_usd=per_call * 2.5)
    chat(client)
    chat(client)
    assert runguard.current().cost_usd == pytest.approx(2 * per_call, rel=1e-9)
    chat(client)  # the forecast (prompt estimate only, no cap) still fits: 3 calls >= 2.5 trips
    with pytest.raises(runguard.RunGuardTripped) as info:
        chat(client)
    assert info.value.limit == "max_cost_usd"
    assert server.count() == 3
    assert runguard.current().cost_usd == pytest.approx(3 * per_call, rel=1e-9)


def test_a_single_oversized_request_is_refused_by_its_forecast(client, server):
    runguard.autolog(max_input_tokens=1000)
    huge = [{"role": "user", "content": "word " * 3000}]
    with pytest.raises(runguard.RunGuardTripped) as info:
        chat(client, messages=huge)
    assert server.count() == 0
    assert info.value.limit == "max_input_tokens"
    assert "would be exceeded by this call" in info.value.reason
    assert info.value.observed > 1000


def test_reservations_keep_cost_exact_under_concurrency_when_max_tokens_is_set(client, server):
    prompt = messages_tokens(MESSAGES, MODEL)
    # the server reports exactly what was forecast, and honours max_tokens like a provider
    server.default = Reply(prompt_tokens=prompt, content=" ".join(["w"] * 50), delay=0.01)
    per_call = float(calc_price(Usage(input_tokens=prompt, output_tokens=40), model_ref=MODEL, provider_id="openai").total_price)
    limit = per_call * 17.5
    runguard.autolog(max_cost_usd=limit, max_calls=math.inf)
    barrier = threading.Barrier(32)

    def worker():
        barrier.wait()
        for _ in range(3):
            try:
                chat(client, max_tokens=40)
            except runguard.RunGuardTripped:
                pass

    threads = [threading.Thread(target=worker) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    spent = runguard.current().cost_usd
    assert spent <= limit
    assert server.count() == 17
    assert spent == pytest.approx(17 * per_call, rel=1e-9)


def test_embeddings_and_responses_count_toward_calls_tokens_and_cost(client, server):
    runguard.autolog(max_calls=3)
    server.default = Reply(prompt_tokens=7)
    client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    response = client.responses.create(model=MODEL, input="hello")
    assert response.output_text == "ok"
    snapshot = runguard.current()
    assert snapshot.calls == 2
    assert snapshot.input_tokens == 14
    assert snapshot.output_tokens == 1
    assert snapshot.cost_usd > 0
    chat(client)
    with pytest.raises(runguard.RunGuardTripped):
        client.responses.create(model=MODEL, input="again")
    with pytest.raises(runguard.RunGuardTripped):
        client.embeddings.create(model="text-embedding-3-small", input="again")
    assert server.count() == 3
    assert server.count("/embeddings") == 1 and server.count("/responses") == 1


async def test_async_responses_parse_and_completions_are_guarded(async_client, server):
    runguard.autolog(max_calls=2)
    await async_client.completions.create(model="gpt-3.5-turbo-instruct", prompt="say ok")
    await async_client.responses.parse(model=MODEL, input="hello")
    with pytest.raises(runguard.RunGuardTripped):
        await async_client.chat.completions.parse(model=MODEL, messages=MESSAGES)
    assert server.count() == 2


def test_unknown_model_counts_tokens_and_is_unpriced(client, server, caplog):
    runguard.autolog(max_cost_usd=0.0000001)
    for _ in range(3):
        chat(client, model="my-private-finetune-xyz")
    snapshot = runguard.current()
    assert snapshot.calls == 3 and snapshot.input_tokens == 30 and snapshot.cost_usd == 0
    assert sum("no price known" in r.message for r in caplog.records) == 1


def test_ceiling_holds_under_threads_each_running_async_tasks(server):
    import openai

    server.default = Reply(delay=0.005)
    runguard.autolog(max_calls=37)
    sent = []

    def thread_main():
        async def run():
            client = openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0)

            async def one():
                try:
                    await client.chat.completions.create(model=MODEL, messages=MESSAGES)
                    return 1
                except runguard.RunGuardTripped:
                    return 0

            return sum(await asyncio.gather(*(one() for _ in range(10))))

        sent.append(asyncio.run(run()))

    threads = [threading.Thread(target=thread_main) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(sent) == 37
    assert server.count() == 37


def test_raw_response_calls_are_counted_with_their_usage(client, server):
    runguard.autolog(max_calls=1)
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
    assert raw.parse().choices[0].message.content == "ok"
    assert runguard.current().input_tokens == 10
    with pytest.raises(runguard.RunGuardTripped):
        client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
    assert server.count() == 1


def test_a_zero_ceiling_refuses_the_first_call(client, server):
    runguard.autolog(max_calls=0)
    with pytest.raises(runguard.RunGuardTripped) as info:
        chat(client)
    assert info.value.reason == "call ceiling hit (0/0)"
    assert server.count() == 0
