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

    def arguments(self, binary: str) -> list[str]:
        return [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
                "--dir", str(self.directory), *self.extra]

    def start(self) -> "RedisServer":
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian package redis-server)")
        self.process = subprocess.Popen(self.arguments(binary), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
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


def free_cluster_port() -> int:
    """A port whose cluster bus port (+10000) is free too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 < 65536:
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _redis_cli(*args: str, timeout: float = 30) -> str:
    return subprocess.run([shutil.which("redis-cli") or "redis-cli", *args], capture_output=True, text=True,
                          timeout=timeout, check=True).stdout


class LocalRedisCluster:
    """A real Redis Cluster on 127.0.0.1: ``primaries`` nodes started with ``--cluster-enabled
    yes`` (and ``replicas`` replicas of each), joined by ``redis-cli --cluster create``."""

    def __init__(self, directory: Path, primaries: int = 3, replicas: int = 0) -> None:
        self.directory = Path(directory)
        self.primaries, self.replicas = primaries, replicas
        self.nodes: list[RedisServer] = []

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes[:2])

    def start(self) -> "LocalRedisCluster":
        if shutil.which("redis-cli") is None:
            raise RuntimeError("redis-cli is not installed (Debian package redis-tools)")
        try:
            for index in range(self.primaries * (1 + self.replicas)):
                directory = self.directory / f"node{index}"
                directory.mkdir(parents=True, exist_ok=True)
                self.nodes.append(RedisServer(directory, free_cluster_port(), "--cluster-enabled", "yes",
                                              "--cluster-config-file", "nodes.conf", "--cluster-node-timeout",
                                              "1000", "--enable-debug-command", "local").start())
            _redis_cli("--cluster", "create", *(f"127.0.0.1:{node.port}" for node in self.nodes),
                       "--cluster-replicas", str(self.replicas), "--cluster-yes")
            self.wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def admin(self, node: RedisServer):
        import redis

        return redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=5)

    def wait_ok(self, seconds: float = 30) -> None:
        """Until every live node says the cluster is up and agrees on the primaries."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                states = [self.admin(n).execute_command("CLUSTER", "INFO") for n in self.nodes if n.process]
                maps = [self.slot_map(n) for n in self.nodes if n.process]
                if all(b"cluster_state:ok" in s for s in states) and all(m == maps[0] for m in maps):
                    return
            except Exception:
                pass
            time.sleep(0.1)
        raise RuntimeError("the cluster did not come up")

    def slot_map(self, node: RedisServer) -> list:
        return sorted((first, last, primary[1]) for first, last, primary, *_ in
                      self.admin(node).execute_command("CLUSTER", "SLOTS"))

    def owner(self, key: str) -> RedisServer:
        """The node serving ``key``'s slot now."""
        from redis.crc import key_slot

        slot = key_slot(key.encode())
        live = next(n for n in self.nodes if n.process)
        for first, last, port in self.slot_map(live):
            if first <= slot <= last:
                return next(n for n in self.nodes if n.port == port)
        raise RuntimeError(f"no node serves slot {slot}")

    def node_id(self, node: RedisServer) -> str:
        return self.admin(node).execute_command("CLUSTER", "MYID").decode()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> "LocalRedisCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class LocalSentinels:
    """A primary, ``replicas`` replicas and three ``redis-server --sentinel`` processes watching
    them (quorum 2, down after 1 s) on 127.0.0.1: a Sentinel-managed store that fails over."""

    SERVICE = "runguard"

    def __init__(self, directory: Path, replicas: int = 2) -> None:
        self.directory = Path(directory)
        self.replicas = replicas
        self.servers: list[RedisServer] = []
        self.sentinels: list[RedisServer] = []

    def url(self, **query: str) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        tail = "&".join(f"{k}={v}" for k, v in query.items())
        return f"redis+sentinel://{hosts}/{self.SERVICE}/0" + (f"?{tail}" if tail else "")

    def start(self) -> "LocalSentinels":
        try:
            primary = RedisServer(self._dir("primary"), None).start()
            self.servers.append(primary)
            for index in range(self.replicas):
                self.servers.append(RedisServer(self._dir(f"replica{index}"), None, "--replicaof", "127.0.0.1",
                                                str(primary.port)).start())
            self.wait_replicas(primary, self.replicas)
            for index in range(3):
                directory = self._dir(f"sentinel{index}")
                port = free_port()
                (directory / "sentinel.conf").write_text(
                    f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
                    f"sentinel monitor {self.SERVICE} 127.0.0.1 {primary.port} 2\n"
                    f"sentinel down-after-milliseconds {self.SERVICE} 1000\n"
                    f"sentinel failover-timeout {self.SERVICE} 5000\n"
                    f"sentinel parallel-syncs {self.SERVICE} 2\n")
                self.sentinels.append(_Sentinel(directory, port).start())
            self.wait_primary(primary)
        except BaseException:
            self.stop()
            raise
        return self

    def _dir(self, name: str) -> Path:
        directory = self.directory / name
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def primary(self) -> RedisServer:
        """The server the sentinels name as primary now."""
        import redis

        reply = redis.Redis(port=self.sentinels[0].port, socket_timeout=5).execute_command(
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.SERVICE)
        return next(s for s in self.servers if s.port == int(reply[1]))

    def wait_primary(self, server: RedisServer, seconds: float = 30) -> None:
        import redis

        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if all(int(redis.Redis(port=s.port, socket_timeout=2).execute_command(
                        "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.SERVICE)[1]) == server.port
                       for s in self.sentinels):
                    return
            except Exception:
                pass
            time.sleep(0.1)
        raise RuntimeError("the sentinels did not agree on the primary")

    def wait_failover(self, old: RedisServer, seconds: float = 30) -> RedisServer:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                new = self.primary()
                if new is not old:
                    self.wait_primary(new)
                    return new
            except Exception:
                pass
            time.sleep(0.1)
        raise RuntimeError("the sentinels did not fail over")

    @staticmethod
    def wait_replicas(primary: RedisServer, count: int, seconds: float = 30) -> None:
        import redis

        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            info = redis.Redis(port=primary.port, socket_timeout=2).info("replication")
            if sum(1 for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)
                   and v.get("state") == "online") >= count:
                return
            time.sleep(0.1)
        raise RuntimeError("the replicas did not catch up")

    def stop(self) -> None:
        for server in [*self.sentinels, *self.servers]:
            server.stop()

    def __enter__(self) -> "LocalSentinels":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Sentinel(RedisServer):
    """``redis-server <conf> --sentinel`` (the sentinel rewrites its configuration file)."""

    def arguments(self, binary: str) -> list[str]:
        return [binary, str(self.directory / "sentinel.conf"), "--sentinel"]
