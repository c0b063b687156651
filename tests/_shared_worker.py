"""One worker process of a job on a shared budget (run by tests/test_shared.py).

    python tests/_shared_worker.py '<json>'

The JSON gives ``autolog`` (keywords), ``base_url``, ``threads``, ``calls_per_thread`` and
the request's ``max_tokens`` (optional); ``session`` (optional) gives the keywords of a
``runguard.session()`` each call runs in (a tenant's shared budget, say). Each thread calls
until runguard refuses it, then stops. Prints one JSON line: how many calls returned, the limit/scope of each refusal, and the SDK
errors of calls whose answer never arrived (the thread goes on).
With ``"hold": true`` it makes a single call (the test answers it slowly), printing
``sending`` first, so the test can kill the process while its reservation is held. With
``"through_outage": true`` a thread refused because the store is unreachable (a failover)
waits 20 ms and goes on; the refusal is reported all the same.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import openai

import runguard_autolog as runguard


def main() -> None:
    params = json.loads(sys.argv[1])
    runguard.autolog(**params["autolog"])
    client = openai.OpenAI(base_url=params["base_url"], api_key="test", max_retries=0)
    request = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "work"}]}
    if params.get("max_tokens"):
        request["max_tokens"] = params["max_tokens"]
    if params.get("hold"):
        print("sending", flush=True)
        client.chat.completions.create(**request)
        return
    done, refused, failed, after_sending, lock = [0], [], [], [], threading.Lock()

    def work() -> None:
        for _ in range(params["calls_per_thread"]):
            try:
                with runguard.session(**params.get("session", {})):
                    client.chat.completions.create(**request)
            except runguard.RunGuardTripped as trip:
                with lock:
                    refused.append([trip.limit, trip.scope])
                    if "was not sent" not in str(trip):  # stopped after its request left (a retry refused)
                        after_sending.append(trip.limit)
                if trip.limit == "store_outage" and params.get("through_outage"):
                    time.sleep(0.02)
                    continue
                return
            except openai.APIError as error:  # the provider's answer never arrived (a billed request may have)
                with lock:
                    failed.append(type(error).__name__)
                continue
            with lock:
                done[0] += 1

    # build the SDK's response models once before the threads start: pydantic builds them lazily,
    # and 16 threads building one at once can raise (the call's request has left by then)
    from openai.types.chat import ChatCompletion

    ChatCompletion.construct(**{"choices": [{"message": {"role": "assistant", "content": ""}}], "usage": {}})
    threads = [threading.Thread(target=work) for _ in range(params["threads"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    deadline = time.monotonic() + 15  # after an outage, until what is owed has reached the store
    while not runguard.flush(2.0) and time.monotonic() < deadline:
        time.sleep(0.2)
    print(json.dumps({"done": done[0], "refused": refused, "failed": failed, "after_sending": after_sending}),
          flush=True)


if __name__ == "__main__":
    main()
