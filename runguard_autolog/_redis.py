"""How the shared budgets reach Redis: one node, a Sentinel-managed primary, or a Redis Cluster.

Every script a budget runs touches only that budget's keys, declared, in one hash slot
(``runguard:{<name>}:…``), so a budget lives on one node whatever the topology. A
:class:`Transport` sends a batch of commands to the node that owns each key, over a
connection the calling thread keeps (outside redis-py's pool and its per-command machinery:
a call waits for exactly one round trip, its reserve), and follows the topology as it moves:

- **Cluster**: slots map to nodes by ``CLUSTER SLOTS``; ``MOVED`` updates the map and sends
  again, ``ASK`` sends again to the importing node after ``ASKING`` (a slot in migration),
  ``TRYAGAIN`` (the budget's keys are split mid-migration) sends again every 10 ms for up to
  ``TRYAGAIN_S`` (then it is an outage: a migration moves a budget's few keys in milliseconds). A
  node that stops answering makes the map be read again (a failover promoted a replica).
- **Sentinel**: connections ask the sentinels for the primary each time they connect, and a
  primary demoted to replica (``READONLY``) drops them, so the next one finds the new one.
- **Durability** (``?min_replicas=N``): each batch ends with ``WAIT N``; fewer replicas than
  that is an outage (the write may be lost in a failover), never an admit.

Sending again is safe because every script is idempotent by id (a reserve by its lease id,
a settle by the call's id): a command redirected or re-sent after a dropped connection is
applied once. Any other failure is raised to the caller, which treats it as an outage.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

from ._config import StoreAddress, store_address

_PID = [os.getpid()]  # this process's id, kept without a system call per command
os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))
WAIT_MS = 100  # how long a write waits for its replicas (below the read timeout)
REDIRECTS = 8  # MOVED/ASK/NOSCRIPT answers followed for one command
TRYAGAIN_S = 0.5  # how long a command waits out a slot whose keys are split mid-migration
LOAD_S = 0.5  # how long reading a cluster's slot map may take (nodes tried in turn until then)


class NotReplicated(OSError):
    """Fewer replicas than ``min_replicas`` acknowledged a write: an outage, not an admit."""


class _Node:
    """One node (or a Sentinel-managed primary): connections made as a redis-py pool makes them,
    outside its count (an application's own pool is never drawn from: its limit stays its own)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def node_for(self, key: str) -> Any:
        return None

    def connect(self, node: Any) -> Any:
        return self.pool.connection_class(**self.pool.connection_kwargs)

    def moved(self, slot: int, host: str, port: int) -> bool:
        return False  # not a cluster: a MOVED answer is an error

    def lost(self) -> None:
        pass


class _Cluster:
    """A Redis Cluster: which node owns each slot, read with ``CLUSTER SLOTS`` from any node."""

    def __init__(self, hosts: Sequence[tuple[str, int]], kwargs: dict) -> None:
        import redis

        self._redis = redis
        self.startup = list(hosts)
        self.hosts = list(hosts)  # the startup nodes, then the primaries the last map named
        self.kwargs = kwargs
        self.slots: list[tuple[str, int]] | None = None
        from redis.crc import key_slot

        self._key_slot = key_slot

    def node_for(self, key: str) -> tuple[str, int]:
        slots = self.slots
        if slots is None:
            slots = self._load()
        return slots[self._key_slot(key.encode())]

    def connect(self, node: tuple[str, int]) -> Any:
        host, port = node
        return self._redis.ConnectionPool(host=host, port=port, **self.kwargs).make_connection()

    def moved(self, slot: int, host: str, port: int) -> bool:
        slots = self.slots
        if slots is not None:
            slots[slot] = (host, port)  # one list item: atomic under the GIL
        return True

    def lost(self) -> None:
        """A node stopped answering: read the map again on the next command (a failover)."""
        self.slots = None

    def _load(self) -> list[tuple[str, int]]:
        """Read the slot map from the first node that answers, within ``LOAD_S``. No lock: threads
        that find it missing at once each read it (bounded), none waits behind another's I/O."""
        error: BaseException | None = None
        deadline = time.monotonic() + LOAD_S
        for node in list(self.hosts):
            if time.monotonic() >= deadline:
                break
            conn = self.connect(node)
            try:
                conn.send_command("CLUSTER", "SLOTS")
                ranges = conn.read_response()
            except (self._redis.exceptions.RedisError, OSError) as failure:
                error = failure
                continue
            finally:
                conn.disconnect()
            slots: list[Any] = [None] * 16384
            owners = []
            for first, last, primary, *_ in ranges:
                host = primary[0].decode() if isinstance(primary[0], bytes) else primary[0]
                owner = (host or node[0], int(primary[1]))
                owners.append(owner)
                for slot in range(int(first), int(last) + 1):
                    slots[slot] = owner
            if None in slots:
                error = self._redis.exceptions.ClusterDownError("not every slot is served")
                continue
            # the nodes to ask next time: the primaries now, then the startup nodes (no dead address piles up)
            self.hosts = list(dict.fromkeys([*owners, *self.startup]))
            self.slots = slots
            return slots
        raise self._redis.exceptions.ConnectionError(
            f"no node of the cluster answered CLUSTER SLOTS ({type(error).__name__})"
        )


class _Connections(threading.local):
    def __init__(self) -> None:
        self.pid = _PID[0]
        self.by_node: dict[Any, Any] = {}


def _client_kwargs(address: StoreAddress, timeouts: dict) -> dict:
    kwargs: dict[str, Any] = {**timeouts, **address.timeouts}
    if address.username:
        kwargs["username"] = address.username
    if address.password is not None:
        kwargs["password"] = address.password
    if address.tls:
        import redis

        kwargs["connection_class"] = redis.SSLConnection
    return kwargs


class Transport:
    """Sends commands to the node that owns each key; see the module's docstring."""

    def __init__(self, store: Any, connect_timeout: float, read_timeout: float) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._errors = redis.exceptions
        timeouts = {
            "socket_connect_timeout": connect_timeout,
            "socket_timeout": read_timeout,
            "health_check_interval": 0,
            # one immediate retry on connect, for a pooled connection the server dropped (a restart)
            "retry": Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
        }
        self.replicas = 0
        self.topology: _Node | _Cluster
        self._capped = not isinstance(store, str)  # a client's own timeouts are capped at ours
        if not isinstance(store, str):  # a redis-py client the application built
            if hasattr(store, "nodes_manager"):
                kwargs = {**store.nodes_manager.connection_kwargs, **timeouts}
                for name in ("host", "port", "db", "decode_responses"):
                    kwargs.pop(name, None)
                hosts = [(node.host, node.port) for node in store.nodes_manager.startup_nodes.values()]
                self.topology = _Cluster(hosts, kwargs)
            else:
                self.topology = _Node(store.connection_pool)
        else:
            address = store_address(store)
            self.replicas = address.min_replicas
            if address.kind == "node":
                self.topology = _Node(redis.ConnectionPool.from_url(address.url, **timeouts))
            elif address.kind == "cluster":
                self.topology = _Cluster(address.hosts, _client_kwargs(address, timeouts))
            else:
                from redis.sentinel import Sentinel

                sentinel_timeouts: dict[str, Any] = {
                    n: timeouts[n] for n in ("socket_connect_timeout", "socket_timeout")
                }
                sentinels = Sentinel(list(address.hosts), sentinel_kwargs=sentinel_timeouts, **sentinel_timeouts)
                primary = sentinels.master_for(
                    address.service or "", db=address.db, **_client_kwargs(address, timeouts)
                )
                self.topology = _Node(primary.connection_pool)
        self._timeouts = (connect_timeout, read_timeout)
        self._connections = _Connections()
        self._all: weakref.WeakSet[Any] = weakref.WeakSet()  # every connection alive, to close them
        self._scripts: dict[str, str] = {}
        self._retried = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
        self._timeout = redis.exceptions.TimeoutError  # not a ConnectionError in redis-py: never re-sent
        self._retry = timeouts["retry"]
        self._response = redis.exceptions.ResponseError
        self._again = (redis.exceptions.AskError, redis.exceptions.TryAgainError, redis.exceptions.NoScriptError)

    def script(self, source: str) -> str:
        """Register a Lua script; returns its SHA1 (loaded on a node the first time it is missing)."""
        import hashlib

        sha = hashlib.sha1(source.encode()).hexdigest()
        self._scripts[sha] = source
        return sha

    # -- sending -----------------------------------------------------------------------------
    def call(self, key: str, *command: Any, write: bool = True) -> Any:
        """One command to the node owning ``key``; an error answer is raised."""
        reply = self.one(key, command, write)
        if isinstance(reply, Exception):
            raise reply
        return reply

    def one(self, key: str, command: tuple, write: bool = True) -> Any:
        """One command to the node owning ``key`` (:meth:`batch` of one, without its grouping)."""
        node = self.topology.node_for(key)
        reply = self._send(node, [command], False, write)[0]
        if isinstance(reply, self._again):
            reply = self._follow((key, command), reply, node, write)
        return reply

    def batch(self, items: Sequence[tuple[str, tuple]], write: bool = True) -> list[Any]:
        """Send each command to the node owning its key: one round trip per node, pipelined.
        Returns each reply, an error answer as its exception instance. A connection that
        fails (down, slow, not replicated) raises: the caller's outage. ``write``: the
        commands write (with ``min_replicas``, they count once replicated)."""
        topology = self.topology
        groups: dict[Any, list[int]] = {}
        for index, (key, _) in enumerate(items):
            groups.setdefault(topology.node_for(key), []).append(index)
        replies: list[Any] = [None] * len(items)
        for node, indexes in groups.items():
            for index, reply in zip(indexes, self._send(node, [items[i][1] for i in indexes], False, write)):
                if isinstance(reply, self._again):
                    reply = self._follow(items[index], reply, node, write)
                replies[index] = reply
        return replies

    def _connection(self, node: Any) -> Any:
        mine = self._connections
        if mine.pid != _PID[0]:  # a forked child: the parent's sockets are not ours
            mine.pid, mine.by_node = _PID[0], {}
        conn = mine.by_node.get(node)
        if conn is None:
            conn = mine.by_node[node] = self.topology.connect(node)
            if self._capped:
                # a client the application built keeps its settings, within ours: a dead store never
                # hangs a call, nor do its retries with backoff (a URL's own ?socket_timeout= is kept)
                connect_timeout, read_timeout = self._timeouts
                conn.socket_timeout = min(conn.socket_timeout or read_timeout, read_timeout)
                conn.socket_connect_timeout = min(conn.socket_connect_timeout or connect_timeout, connect_timeout)
                conn.retry = self._retry
            self._all.add(conn)
        return conn

    def _send(self, node: Any, commands: list[tuple], asking: bool = False, write: bool = True) -> list[Any]:
        conn = self._connection(node)
        prefix = [("ASKING",)] if asking else []
        suffix = [("WAIT", self.replicas, WAIT_MS)] if self.replicas and write else []
        packed = conn.pack_commands([*prefix, *commands, *suffix])
        count = len(prefix) + len(commands) + len(suffix)
        for attempt in (1, 2):
            try:
                if not conn.is_connected:  # connect() itself: a Sentinel-managed one asks for the primary
                    conn.connect()
                conn.send_packed_command(packed, check_health=False)
                replies = [self._read(conn) for _ in range(count)]
                break
            except self._retried as error:
                conn.disconnect()  # a reply may still be on its way: never reuse this connection as is
                if attempt == 2 or isinstance(error, self._timeout):
                    self.topology.lost()
                    raise
                # dropped (a restart, a failover): once more, on a new connection (scripts are idempotent)
            except BaseException:
                conn.disconnect()
                raise
        if suffix:
            acknowledged = replies.pop()
            if isinstance(acknowledged, Exception) or acknowledged < self.replicas:
                raise NotReplicated(f"{acknowledged} of {self.replicas} replicas acknowledged the write")
        return replies[len(prefix) :]

    def _read(self, conn: Any) -> Any:
        try:
            return conn.read_response()
        except self._response as error:  # an error answer: the caller sees it as that command's reply
            return error

    def _follow(self, item: tuple[str, tuple], error: Exception, node: Any, write: bool = True) -> Any:
        """Send one command again after ``node`` answered MOVED/ASK/TRYAGAIN/NOSCRIPT (bounded)."""
        key, command = item
        errors = self._errors
        redirects, waited_until, asking = 0, time.monotonic() + TRYAGAIN_S, False
        while True:
            if isinstance(error, errors.MovedError):
                if not self.topology.moved(error.slot_id, error.host, error.port):
                    return error
                node, asking = self.topology.node_for(key), False
            elif isinstance(error, errors.AskError):
                if not isinstance(self.topology, _Cluster):
                    return error
                node, asking = (error.host, error.port), True  # this once: the slot is migrating there
            elif isinstance(error, errors.TryAgainError):
                if time.monotonic() >= waited_until:
                    return error
                time.sleep(0.01)
                redirects -= 1  # bounded by time instead
            elif isinstance(error, errors.NoScriptError):  # a node that never saw it (or restarted)
                source = self._scripts.get(command[1] if isinstance(command[1], str) else "")
                if source is None:
                    return error
                loaded = self._send(node, [("SCRIPT", "LOAD", source)], False, False)[0]
                if isinstance(loaded, Exception):
                    return loaded
            else:
                return error
            redirects += 1
            if redirects > REDIRECTS:
                return error
            reply = self._send(node, [command], asking, write)[0]
            if not isinstance(reply, self._again):
                return reply
            error = reply

    def scan(self, key: str, match: str) -> list[bytes]:
        """Keys matching ``match`` on the node owning ``key`` (a budget's keys share its slot)."""
        node = self.topology.node_for(key)
        found: list[bytes] = []
        cursor: Any = 0
        while True:
            reply = self._send(node, [("SCAN", cursor, "MATCH", match, "COUNT", 1000)], False, False)[0]
            if isinstance(reply, Exception):
                raise reply
            cursor, keys = reply
            found.extend(keys)
            if int(cursor) == 0:
                return found

    def close(self) -> None:
        for conn in list(self._all):
            try:
                conn.disconnect()
            except Exception:
                pass
        self._connections = _Connections()
