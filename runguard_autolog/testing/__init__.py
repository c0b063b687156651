"""Offline test kit: a loopback OpenAI-compatible server with scripted replies (and, as
``FakeAnthropicServer``, the Anthropic Messages API).

Use it to test your own agents' guards without a provider::

    from runguard_autolog.testing import FakeOpenAIServer, Reply

    with FakeOpenAIServer() as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="test")
        server.script(Reply(status=429, headers={"retry-after": "2"}), Reply(content="hi"))
        ...
        assert server.count("/chat/completions") == 2
"""

from .fake_openai import FakeAnthropicServer, FakeOpenAIServer
from .replies import Reply, ToolCall

__all__ = ["FakeAnthropicServer", "FakeOpenAIServer", "Reply", "ToolCall"]
