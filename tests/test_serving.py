"""A model served by MLflow's scoring server (its FastAPI app under a real uvicorn on
127.0.0.1) gets one unit of work per scoring request: identical requests are not a loop,
and the process scope is not used up by independent requests."""

from __future__ import annotations

import threading
import time
import warnings

import mlflow
import pytest
import requests
import uvicorn

import runguard_autolog as runguard
from runguard_autolog.testing import Reply, ToolCall

from ._servers import free_port


class Agent(mlflow.pyfunc.PythonModel):
    """Asks the model once per request; the model always wants the same tool (one step of an agent)."""

    def load_context(self, context):
        import os

        self.base_url = os.environ["RG_TEST_FAKE_OPENAI"]

    def predict(self, context, model_input, params=None):
        import openai

        client = openai.OpenAI(base_url=self.base_url, api_key="t", max_retries=0)
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "weather?"}])
        return [reply.choices[0].message.content or "tool"]


class ResponsesAgentStep(mlflow.pyfunc.ResponsesAgent):
    """The same step as an MLflow ``ResponsesAgent`` (the Responses API shape MLflow serves)."""

    def predict(self, request):
        import os

        import openai
        from mlflow.types.responses import ResponsesAgentResponse

        client = openai.OpenAI(base_url=os.environ["RG_TEST_FAKE_OPENAI"], api_key="t", max_retries=0)
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "weather?"}])
        text = reply.choices[0].message.content or "tool"
        return ResponsesAgentResponse(output=[self.create_text_output_item(text=text, id="msg-1")])


class ChatModelStep(mlflow.pyfunc.ChatModel):
    """The same step as an MLflow ``ChatModel``."""

    def predict(self, context, messages, params=None):
        import os

        import openai
        from mlflow.types.llm import ChatChoice, ChatCompletionResponse, ChatMessage

        client = openai.OpenAI(base_url=os.environ["RG_TEST_FAKE_OPENAI"], api_key="t", max_retries=0)
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "weather?"}])
        text = reply.choices[0].message.content or "tool"
        return ChatCompletionResponse(choices=[ChatChoice(index=0, message=ChatMessage(role="assistant", content=text))])


MODELS = {"pyfunc": Agent, "chat_model": ChatModelStep, "responses_agent": ResponsesAgentStep}
PAYLOADS = {
    "pyfunc": {"inputs": ["what is the weather?"]},
    "chat_model": {"messages": [{"role": "user", "content": "what is the weather?"}]},
    "responses_agent": {"input": [{"role": "user", "content": "what is the weather?"}]},
}


@pytest.fixture(params=sorted(PAYLOADS))
def scoring_server(request, tmp_path, server, monkeypatch):
    from mlflow.pyfunc import scoring_server

    monkeypatch.setenv("RG_TEST_FAKE_OPENAI", server.base_url)
    path = str(tmp_path / "agent")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # ChatModel is deprecated, and still served
        mlflow.pyfunc.save_model(path, python_model=MODELS[request.param]())
    app = scoring_server.init(mlflow.pyfunc.load_model(path))
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not uv.started and time.time() < deadline:
        time.sleep(0.05)
    server.reset()  # saving a ChatModel or ResponsesAgent runs it on an example input
    yield f"http://127.0.0.1:{port}", PAYLOADS[request.param]
    uv.should_exit = True
    thread.join(10)
    assert not thread.is_alive(), "uvicorn did not stop"


def _score(served: tuple[str, dict]) -> requests.Response:
    url, payload = served
    return requests.post(f"{url}/invocations", json=payload, timeout=30)


def test_identical_scoring_requests_are_not_a_loop(scoring_server, server):
    server.default = Reply(tool_calls=[ToolCall("search", '{"query": "weather"}')])
    runguard.autolog()  # default limits: loop_repeats=3, max_calls=50
    statuses = [_score(scoring_server).status_code for _ in range(5)]
    assert statuses == [200] * 5
    assert server.count() == 5
    assert runguard.current().tripped is None


def test_independent_requests_do_not_use_up_the_process(scoring_server, server):
    runguard.autolog(max_calls=2)  # per unit of work: each request makes one call
    statuses = [_score(scoring_server).status_code for _ in range(6)]
    assert statuses == [200] * 6
    assert server.count() == 6


def test_serving_can_be_left_alone(scoring_server, server):
    server.default = Reply(tool_calls=[ToolCall("search", '{"query": "weather"}')])
    runguard.autolog(disabled_integrations=["serving"])
    statuses = [_score(scoring_server).status_code for _ in range(4)]
    assert statuses[:3] == [200] * 3 and statuses[3] != 200  # the process scope saw a loop
