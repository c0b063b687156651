"""Real servers the gateway tests start on 127.0.0.1, and a counting proxy in front of them.

``CountingProxy`` forwards every request to an upstream (the MLflow AI Gateway, an
``mlflow server``) and records what arrived: it is how a test asserts on the requests a
gateway actually received, limiter-rejected ones included. ``delay`` makes the upstream
look slow. Every process started here runs in its own session and is killed as a group.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class CountingProxy:
    def __init__(self, upstream_port: int, delay: float = 0.0) -> None:
        self.upstream_port = upstream_port
        self.delay = delay
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def count(self, path_part: str = "", body_part: bytes = b"") -> int:
        with self._lock:
            return sum(1 for r in self.requests if path_part in r["path"] and body_part in r["body"])

    def statuses(self, path_part: str = "") -> list[int]:
        with self._lock:
            return [r["status"] for r in self.requests if path_part in r["path"]]

    def __enter__(self) -> "CountingProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                if proxy.delay:
                    time.sleep(proxy.delay)
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                upstream.request(self.command, self.path, body=body or None, headers=headers)
                reply = upstream.getresponse()
                payload = reply.read()
                with proxy._lock:
                    proxy.requests.append({"path": self.path, "body": body, "status": reply.status, "time": time.time()})
                self.send_response(reply.status)
                for key, value in reply.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(key, value)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                upstream.close()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        return Handler


def _wait_until_up(url: str, process: subprocess.Popen, log: Path, seconds: float = 60.0) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status == 200:
                    return
        except Exception:
            time.sleep(0.2)
    raise RuntimeError(f"server did not come up at {url}:\n{log.read_text()[-3000:]}")


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNGUARD_") and k != "_RUNGUARD_STRICT"}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true", MLFLOW_MODEL_CATALOG_URI="", **extra)
    return env


class ServerProcess:
    """A server command in its own process group; stopped as a group."""

    def __init__(self, command: list[str], health_url: str, log: Path, env: dict) -> None:
        self.log = log
        self._log_file = open(log, "wb")
        self.process = subprocess.Popen(command, stdout=self._log_file, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        try:
            _wait_until_up(health_url, self.process, log)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait(5)
        self._log_file.close()


def start_gateway(config: str, workdir: Path) -> tuple[ServerProcess, int]:
    """The YAML-configured MLflow AI Gateway (``mlflow gateway start``), one worker so its
    per-route limiter is one counter."""
    path = workdir / "gateway.yaml"
    path.write_text(config)
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "gateway", "start", "--config-path", str(path),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = _env(MLFLOW_GATEWAY_API_BASE_ALLOW_PRIVATE_IPS="true")
    return ServerProcess(command, f"http://127.0.0.1:{port}/health", workdir / "gateway.log", env), port


def start_tracking_server(workdir: Path, serve_artifacts: bool = False) -> tuple[ServerProcess, int]:
    """A real ``mlflow server`` with a sqlite store; artifacts in a local folder the client
    writes to, or (``serve_artifacts``) proxied through the server (``mlflow-artifacts:/``)."""
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", f"sqlite:///{workdir}/server.db", "--workers", "1"]
    if serve_artifacts:
        command += ["--serve-artifacts", "--artifacts-destination", str(workdir / "served-artifacts")]
    else:
        command += ["--default-artifact-root", str(workdir / "artifacts")]
    return ServerProcess(command, f"http://127.0.0.1:{port}/health", workdir / "server.log", _env()), port


class RedisServer:
    """A real ``redis-server`` (Debian's package) on 127.0.0.1, without persistence. It can be
    stopped, frozen (SIGSTOP: it accepts connections but never answers) and started again on
    the same port."""

    def __init__(self, directory: Path, port: int | None = None, *extra: str) -> None:
        self.directory = Path(directory)
        self.port = port or free_port()
        self.extra = extra  # more redis-server arguments
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian package redis-server)")
        self.process = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
            self.process.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        self.process = None

    def freeze(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
