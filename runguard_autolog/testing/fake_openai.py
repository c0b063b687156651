"""A loopback OpenAI-compatible HTTP server (stdlib only) for tests, demos and benchmarks.

Endpoints: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``,
``/v1/responses`` (JSON and SSE streaming), plus any other path answered from the
script. Replies come from a FIFO script, else from ``default``. Every request is
recorded (path, JSON body, headers) so tests assert on what was *billed*.
Binds to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .fake_anthropic import count_tokens_json, error_json, is_messages, message_events, message_json
from .replies import Reply, ToolCall, completion_tokens

__all__ = ["FakeAnthropicServer", "FakeOpenAIServer", "Reply", "ToolCall"]


class FakeOpenAIServer:
    def __init__(self, default: Reply | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the fake server binds to loopback only")
        self.default = default or Reply()
        self._initial_default = self.default
        self._script: list[Reply | Callable[[dict], Reply]] = []
        self.requests: list[dict] = []
        self.streams_completed = 0
        self.streams_cut = 0  # the client hung up before the stream ended
        self._lock = threading.Lock()
        self._httpd = _Server((host, port), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def start(self) -> FakeOpenAIServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- scripting and inspection ------------------------------------------------------------
    def script(self, *replies: Reply | Callable[[dict], Reply]) -> None:
        """Queue replies answered in order before falling back to ``default``."""
        with self._lock:
            self._script.extend(replies)

    def reset(self) -> None:
        """Forget requests and the script, and restore the default reply."""
        with self._lock:
            self.default = self._initial_default
            self._script.clear()
            self.requests.clear()
            self.streams_completed = self.streams_cut = 0

    def count(self, path_suffix: str = "") -> int:
        """How many requests arrived (whose path ends with ``path_suffix``)."""
        with self._lock:
            return sum(1 for r in self.requests if r["path"].endswith(path_suffix))

    def _next_reply(self, body: dict) -> Reply:
        with self._lock:
            item = self._script.pop(0) if self._script else self.default
        return item(body) if callable(item) else item

    def _answer(self, handler: Any, path: str, body: dict, reply: Reply) -> bool:
        """Answer the Anthropic Messages API (``/v1/messages``, ``/v1/messages/count_tokens``) as
        Anthropic does; False: another path, answered as OpenAI."""
        if not is_messages(path):
            return False
        if reply.status != 200:
            handler._send_json(reply.status, reply.body if reply.body is not None else error_json(reply), reply.headers)
        elif reply.body is not None:
            handler._send_json(200, reply.body, reply.headers)
        elif path.endswith("/count_tokens"):
            handler._send_json(200, count_tokens_json(reply, body), reply.headers)
        elif body.get("stream") is True:
            handler._send_sse(message_events(reply, body), reply, done_marker=False, named=True)
        else:
            handler._send_json(200, message_json(reply, body), reply.headers)
        return True

    def _record(self, path: str, body: dict, headers: dict) -> None:
        with self._lock:
            self.requests.append({"path": path, "body": body, "headers": headers, "time": time.time()})


# -- response bodies ---------------------------------------------------------------------
def _chat_json(reply: Reply, body: dict) -> dict:
    pieces, prompt, completion = completion_tokens(reply, body)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(pieces) if pieces else None}
    finish = "stop"
    if reply.tool_calls:
        message["tool_calls"] = [
            {"id": f"call_{i}", "type": "function", "function": {"name": t.name, "arguments": t.arguments}}
            for i, t in enumerate(reply.tool_calls)
        ]
        finish = "tool_calls"
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": reply.model or body.get("model", "gpt-4o-mini"),
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": _chat_usage(reply, prompt, completion),
    }


def _chat_usage(reply: Reply, prompt: int, completion: int) -> dict:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if reply.cache_read_input_tokens:  # prompt tokens read from OpenAI's prompt cache (part of the prompt)
        usage["prompt_tokens_details"] = {"cached_tokens": min(reply.cache_read_input_tokens, prompt)}
    return usage


def _chat_chunks(reply: Reply, body: dict):
    pieces, prompt, completion = completion_tokens(reply, body)
    model = reply.model or body.get("model", "gpt-4o-mini")

    def chunk(delta: dict, finish=None, usage=None, choices=True):
        data = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else [],
        }
        if usage is not None:
            data["usage"] = usage
        return data

    yield chunk({"role": "assistant", "content": ""})
    for piece in pieces:
        yield chunk({"content": [{"type": "text", "text": piece}] if reply.content_parts else piece})
    for i, t in enumerate(reply.tool_calls):
        yield chunk(
            {
                "tool_calls": [
                    {
                        "index": i,
                        "id": f"call_{i}",
                        "type": "function",
                        "function": {"name": t.name, "arguments": t.arguments},
                    }
                ]
            }
        )
    yield chunk({}, finish="tool_calls" if reply.tool_calls else "stop")
    include = reply.include_usage_in_stream
    if include is None:
        include = bool((body.get("stream_options") or {}).get("include_usage"))
    if include:
        yield chunk(
            {},
            usage=_chat_usage(reply, prompt, completion),
            choices=False,
        )


def _completion_json(reply: Reply, body: dict) -> dict:
    pieces, prompt, completion = completion_tokens(reply, body)
    return {
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": 0,
        "model": body.get("model", "x"),
        "choices": [{"index": 0, "text": "".join(pieces), "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    }


def _embedding_json(reply: Reply, body: dict) -> dict:
    inputs = body.get("input")
    count = len(inputs) if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else 1
    prompt = reply.usage[0] if reply.usage else reply.prompt_tokens
    return {
        "object": "list",
        "model": body.get("model", "x"),
        "data": [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(count)],
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    }


def _response_obj(
    reply: Reply, body: dict, pieces: list[str], prompt: int, completion: int, status="completed"
) -> dict:
    output = [
        {
            "type": "message",
            "id": "msg_fake",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "".join(pieces), "annotations": []}],
        }
    ]
    for i, t in enumerate(reply.tool_calls):
        output.append(
            {
                "type": "function_call",
                "id": f"fc_{i}",
                "call_id": f"call_{i}",
                "name": t.name,
                "arguments": t.arguments,
                "status": "completed",
            }
        )
    return {
        "id": "resp_fake",
        "object": "response",
        "created_at": 0,
        "status": status,
        "model": body.get("model", "x"),
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": prompt,
            "output_tokens": completion,
            "total_tokens": prompt + completion,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }


def _responses_json(reply: Reply, body: dict) -> dict:
    pieces, prompt, completion = completion_tokens(reply, body)
    return _response_obj(reply, body, pieces, prompt, completion)


def _responses_events(reply: Reply, body: dict):
    pieces, prompt, completion = completion_tokens(reply, body)
    created = _response_obj(reply, body, [], 0, 0, status="in_progress")
    yield {"type": "response.created", "sequence_number": 0, "response": created}
    for n, piece in enumerate(pieces, start=1):
        yield {
            "type": "response.output_text.delta",
            "sequence_number": n,
            "item_id": "msg_fake",
            "output_index": 0,
            "content_index": 0,
            "delta": piece,
            "logprobs": [],
        }
    yield {
        "type": "response.completed",
        "sequence_number": len(pieces) + 1,
        "response": _response_obj(reply, body, pieces, prompt, completion),
    }


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # many concurrent clients connect at once in concurrency tests
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up (a cut stream, a closed keep-alive connection) is normal here."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


def _handler_for(server: FakeOpenAIServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # else delayed ACKs add ~40 ms to every small reply

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            self._send_json(200, {"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]})

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                body = {"_raw": raw.decode("utf-8", "replace")}
            path = self.path.split("?")[0]
            server._record(path, body, dict(self.headers))
            reply = server._next_reply(body)
            if reply.delay:
                time.sleep(reply.delay)
            if server._answer(self, path, body, reply):
                return
            if reply.status != 200:
                message = (
                    reply.content if reply.content != "ok" else "Rate limit reached" if reply.status == 429 else "error"
                )
                error = (
                    reply.body
                    if reply.body is not None
                    else {
                        "error": {
                            "message": message,
                            "type": "requests" if reply.status == 429 else "invalid_request_error",
                            "code": "rate_limit_exceeded" if reply.status == 429 else None,
                        }
                    }
                )
                self._send_json(reply.status, error, reply.headers)
                return
            if reply.body is not None:
                self._send_json(200, reply.body, reply.headers)
                return
            stream = body.get("stream") is True
            if path.endswith("/chat/completions"):
                if stream:
                    self._send_sse(_chat_chunks(reply, body), reply, done_marker=True)
                else:
                    self._send_json(200, _chat_json(reply, body), reply.headers)
            elif path.endswith("/responses"):
                if stream:
                    self._send_sse(_responses_events(reply, body), reply, done_marker=False, named=True)
                else:
                    self._send_json(200, _responses_json(reply, body), reply.headers)
            elif path.endswith("/completions"):
                self._send_json(200, _completion_json(reply, body), reply.headers)
            elif path.endswith("/embeddings"):
                self._send_json(200, _embedding_json(reply, body), reply.headers)
            elif stream:  # any other route (a gateway's, a serving endpoint's) answers as chat
                self._send_sse(_chat_chunks(reply, body), reply, done_marker=True)
            else:
                self._send_json(200, _chat_json(reply, body), reply.headers)

        def _send_json(self, status: int, payload: Any, headers: dict | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def _send_sse(self, events, reply: Reply, done_marker: bool, named: bool = False) -> None:
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            for key, value in reply.headers.items():
                self.send_header(key, value)
            self.end_headers()
            try:
                for event in events:
                    prefix = f"event: {event['type']}\n" if named else ""
                    self._chunk(f"{prefix}data: {json.dumps(event)}\n\n".encode())
                    if reply.chunk_delay:
                        time.sleep(reply.chunk_delay)
                if done_marker:
                    self._chunk(b"data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
                with server._lock:
                    server.streams_cut += 1
                self.close_connection = True
                return
            with server._lock:
                server.streams_completed += 1

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

    return Handler


class FakeAnthropicServer(FakeOpenAIServer):
    """The same loopback server (one script, one record of requests), addressed as the
    ``anthropic`` client expects: its ``base_url`` has no ``/v1``."""

    @property
    def base_url(self) -> str:
        return super().base_url.removesuffix("/v1")
