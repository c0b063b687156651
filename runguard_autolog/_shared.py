"""Shared budgets: one named budget that every process of a job charges, kept in Redis.

A batch of agents on many workers wants one ceiling for the whole job ("this nightly
eval may spend $100"); in-process counters cannot see the other processes. With
``autolog(store="redis://…", shared_budget="nightly-eval", shared_max_cost_usd=100)``
every call also charges the budget ``shared:nightly-eval`` as one more open scope, with
the same reserve-before / settle-after exactness as the in-memory store, across
processes and machines:

- **Atomic.** Reserve, settle, release and retry are Lua scripts, one round trip each, so
  a call costs two round trips (reserve, settle). Check-and-hold is one step in Redis:
  32 threads in 4 processes cannot overshoot a shared call ceiling.
- **Leases.** Each reservation is a lease (``shared_lease_s``, default 30 s) that a
  background thread renews while the call runs. A process that dies mid-call stops
  renewing; its holds are reclaimed by the next reservation after the lease runs out,
  so a dead process blocks headroom for at most ``shared_lease_s`` seconds. Its usage
  is lost with it (it never settled).
- **Windows.** ``shared_window="minute"|"hour"|"day"`` (or a whole number of seconds)
  gives fixed windows aligned to the Unix epoch in UTC, as MLflow's gateway budget
  windows are, on the Redis server's clock (one clock for every machine). A trip lasts
  until the window rolls over or ``reset_shared``.
- **Sticky.** A shared trip is stored in Redis: every process on the budget is refused
  until ``runguard.reset_shared(name)`` / ``runguard reset --shared NAME``.
- **Outage.** Redis calls time out after 0.25 s (``?socket_timeout=…`` in the URL to
  change), retried once only on a dropped connection. While the store is unreachable
  (re-probed at most once a second) ``store_outage="fail_closed"`` (the default: the
  shared budget is the only limit that sees the whole fleet, and N processes on local
  limits alone may spend N times it) refuses calls with ``RunGuardTripped(limit=
  "store_outage")``; ``"fail_open"`` lets calls through on their local limits, logs once,
  and adds what they used to the budget when the store answers again.

Keys: ``runguard:{<name>}:w:<window start>`` (a hash of used ``u0..u6`` and reserved
``r0..r6`` counters in ``_store.COUNTERS`` order, and ``trip``), ``…:leases`` (lease id
-> window start and held amounts) and ``…:expiry`` (lease id -> expiry, ms). The braces
keep one budget's keys in one Redis Cluster slot.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import threading
import time
from typing import Any

from ._config import INF, SHARED_LIMITS, redact
from ._errors import RunGuardConfigError
from ._runtime import internal_error, log_once, logger
from ._store import COUNTER_OF_LIMIT, COUNTERS, LIMIT_OF_COUNTER, Refusal, Trip, make_trip

CONNECT_TIMEOUT_S = 0.25
READ_TIMEOUT_S = 0.25
REPROBE_S = 1.0  # while the store is down, try it again at most this often
RECLAIM_PER_CALL = 32  # expired leases a reservation reclaims (amortised O(1))
MAX_UNSETTLED = 10_000  # settles kept for reconciliation while the store is down
_ZEROS = ("0",) * len(COUNTERS)

# -- Lua ---------------------------------------------------------------------------------------
# ARGV[1] key prefix, ARGV[2] window length (s, 0: none), ARGV[3] lease (ms); KEYS[1] leases,
# KEYS[2] lease expiries. A lease record is "<window start>|<index>=<amount>|...".
_PRELUDE = """
local prefix, window, lease_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]), tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function window_start(seconds)
  if window > 0 then return seconds - (seconds % window) end
  return 0
end
local function key(start) return prefix .. ':w:' .. start end
local function keep(wkey, start)
  if window > 0 then redis.call('PEXPIREAT', wkey, (start + window) * 1000 + 2 * lease_ms) end
end
local function drop_lease(id)
  local record = redis.call('HGET', KEYS[1], id)
  if not record then return nil end
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  local start = nil
  for part in string.gmatch(record, '[^|]+') do
    if start == nil then
      start = part
      if redis.call('EXISTS', key(start)) == 0 then return start end
    else
      local index, amount = string.match(part, '^(%d)=(.+)$')
      redis.call('HINCRBYFLOAT', key(start), 'r' .. index, '-' .. amount)
    end
  end
  return start
end
local FIELDS = {'u0', 'u1', 'u2', 'u3', 'u4', 'u5', 'u6', 'r0', 'r1', 'r2', 'r3', 'r4', 'r5', 'r6', 'trip'}
local function state(wkey) return redis.call('HMGET', wkey, unpack(FIELDS)) end
local function used_of(s)
  local used = {}
  for i = 1, 7 do used[i] = tonumber(s[i] or '0') end
  return used
end
-- why an amount does not fit; the trip is stored (sticky) when committed usage alone forbids it
local function refusal(wkey, s, index, threshold_text, wanted)
  local threshold = tonumber(threshold_text)
  local used = used_of(s)
  local u, r = used[index + 1], tonumber(s[index + 8] or '0')
  local sticky = u + wanted > threshold
  local observed, forecast = u, 0
  if u < threshold then
    forecast = 1
    if sticky then observed = u + wanted else observed = u + r + wanted end
  end
  local trip = cjson.encode({index, threshold_text, observed, forecast, used})
  if sticky then redis.call('HSET', wkey, 'trip', trip) end
  return trip, sticky and 1 or 0
end
"""

# ARGV[4] lease id, ARGV[5] enforce (1/0), ARGV[6] n checks, then n (index, threshold), then
# the 7 forecast amounts. Returns {1, start} admitted, {0, start, trip} tripped before,
# {2, start, trip, sticky} refused, {3, start, trip, sticky} over but held (shadow mode).
_RESERVE = _PRELUDE + """
local seconds, now = clock()
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, %d)) do drop_lease(id) end
local start = window_start(seconds)
local wkey = key(start)
local s = state(wkey)
local n = tonumber(ARGV[6])
local amounts = 6 + 2 * n
local verdict = nil
if s[15] then
  verdict = {0, start, s[15]}
else
  for k = 0, n - 1 do
    local index, threshold = tonumber(ARGV[7 + 2 * k]), tonumber(ARGV[8 + 2 * k])
    local wanted = tonumber(ARGV[amounts + 1 + index])
    if tonumber(s[index + 1] or '0') + tonumber(s[index + 8] or '0') + wanted > threshold then
      local trip, sticky = refusal(wkey, s, index, ARGV[8 + 2 * k], wanted)
      verdict = {2, start, trip, sticky}
      break
    end
  end
end
if verdict and ARGV[5] == '1' then return verdict end
local record = tostring(start)
for k = 0, n - 1 do
  local index = ARGV[7 + 2 * k]
  local amount = ARGV[amounts + 1 + tonumber(index)]
  redis.call('HINCRBYFLOAT', wkey, 'r' .. index, amount)
  record = record .. '|' .. index .. '=' .. amount
end
redis.call('HSET', KEYS[1], ARGV[4], record)
redis.call('ZADD', KEYS[2], now + lease_ms, ARGV[4])
keep(wkey, start)
if verdict then
  if verdict[1] == 2 then verdict[1] = 3 end
  return verdict
end
return {1, start}
""" % RECLAIM_PER_CALL

# ARGV[4] lease id ('' for none), ARGV[5] window start to use when the lease is gone ('' for
# the current one), ARGV[6] n checks, then n (index, threshold), then the 7 actual amounts.
# Drops the lease's holds, adds the usage, trips what reached a limit. Returns {start} or
# {start, trip} when this settle opened the circuit.
_SETTLE = _PRELUDE + """
local start = drop_lease(ARGV[4])
if not start then
  if ARGV[5] ~= '' then start = ARGV[5] else start = window_start(clock()) end
end
local wkey = key(start)
local n = tonumber(ARGV[6])
local amounts = 6 + 2 * n
for i = 0, 6 do
  local amount = ARGV[amounts + 1 + i]
  if tonumber(amount) ~= 0 then redis.call('HINCRBYFLOAT', wkey, 'u' .. i, amount) end
end
keep(wkey, start)
if n == 0 then return {start} end
local s = state(wkey)
if s[15] then return {start} end
local used = used_of(s)
for k = 0, n - 1 do
  local index = tonumber(ARGV[7 + 2 * k])
  if used[index + 1] >= tonumber(ARGV[8 + 2 * k]) then
    local trip = cjson.encode({index, ARGV[8 + 2 * k], used[index + 1], 0, used})
    redis.call('HSET', wkey, 'trip', trip)
    return {start, trip}
  end
end
return {start}
"""

# One more HTTP attempt of an admitted call. ARGV[4] lease id, ARGV[5] fallback start,
# ARGV[6] seconds spent so far, ARGV[7] n checks, then n (index, threshold). Returns {1}
# admitted (one more request used), {0, trip} tripped before, {2, trip, sticky} refused.
_RETRY = _PRELUDE + """
local record = redis.call('HGET', KEYS[1], ARGV[4])
local start = ARGV[5]
if record then start = string.match(record, '^[^|]+') end
local wkey = key(start)
if tonumber(ARGV[6]) ~= 0 then redis.call('HINCRBYFLOAT', wkey, 'u6', ARGV[6]) end
local s = state(wkey)
if s[15] then return {0, s[15]} end
local used = used_of(s)
local n = tonumber(ARGV[7])
for k = 0, n - 1 do
  local index, threshold = tonumber(ARGV[8 + 2 * k]), tonumber(ARGV[9 + 2 * k])
  if index == 6 and used[7] >= threshold then
    local trip = cjson.encode({6, ARGV[9 + 2 * k], used[7], 0, used})
    redis.call('HSET', wkey, 'trip', trip)
    return {2, trip, 1}
  end
  if index == 1 and used[2] + tonumber(s[9] or '0') + 1 > threshold then
    local trip, sticky = refusal(wkey, s, 1, ARGV[9 + 2 * k], 1)
    return {2, trip, sticky}
  end
end
redis.call('HINCRBYFLOAT', wkey, 'u1', 1)
keep(wkey, start)
return {1}
"""

# ARGV[4..]: lease ids still running here; their leases are extended.
_RENEW = _PRELUDE + """
local _, now = clock()
for i = 4, #ARGV do redis.call('ZADD', KEYS[2], 'XX', now + lease_ms, ARGV[i]) end
return #ARGV - 3
"""

# Returns {start, leases held, trip or false, u0..u6, r0..r6} of the current window.
_SNAPSHOT = _PRELUDE + """
local start = window_start(clock())
local s = state(key(start))
return {start, redis.call('ZCARD', KEYS[2]), s[15] or false, unpack(s, 1, 14)}
"""

# Zero the current window's counters, drop every lease and close the circuit.
_RESET = _PRELUDE + """
local start = window_start(clock())
redis.call('DEL', key(start), KEYS[1], KEYS[2])
return start
"""


def _number(text: Any) -> float:
    value = float(text)
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


def _amount(value: float) -> str:
    """An amount as Redis' HINCRBYFLOAT reads it back exactly."""
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class SharedScope:
    """What a shared budget's trips and records name (``shared:<name>``)."""

    __slots__ = ("name", "budget")

    def __init__(self, budget: "SharedBudget") -> None:
        self.name = f"shared:{budget.name}"
        self.budget = budget

    def __repr__(self) -> str:
        return f"<runguard scope {self.name}>"


def connect(url: str):
    """A Redis client with short timeouts: a dead store must never hang an agent."""
    try:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
    except ImportError:
        raise RunGuardConfigError(
            f"runguard: store={redact(url)!r} needs the redis package: pip install 'runguard-autolog[redis]'"
        ) from None
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=READ_TIMEOUT_S,
        # one immediate retry, for a pooled connection the server dropped (a restart)
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
        health_check_interval=0,
    )


def _outage_errors() -> tuple:
    import redis

    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


class SharedBudget:
    """One named budget in Redis: reserve/settle/release/retry for the calls of this process."""

    def __init__(self, name: str, url: str, limits: dict[str, float], window: int | None = None,
                 outage: str = "fail_closed", lease_s: float = 30.0) -> None:
        self.name = name
        self.url = url
        self.shown_url = redact(url)
        self.scope = SharedScope(self)
        self.limits = dict(limits)
        self.checks = tuple(
            (COUNTER_OF_LIMIT[limit[len("shared_"):]], value) for limit, value in limits.items() if value != INF
        )
        self._check_args = [str(len(self.checks))]
        for index, threshold in self.checks:
            self._check_args += [str(index), _amount(threshold)]
        self.window = window or 0
        self.outage = outage
        self.lease_s = lease_s
        self._client = connect(url)
        self._outage_error_types = _outage_errors()
        prefix = f"runguard:{{{name}}}"
        self._keys = [f"{prefix}:leases", f"{prefix}:expiry"]
        self._head = [prefix, str(self.window), str(int(lease_s * 1000))]
        self._scripts = {
            name: self._client.register_script(source)
            for name, source in (("reserve", _RESERVE), ("settle", _SETTLE), ("retry", _RETRY),
                                 ("renew", _RENEW), ("snapshot", _SNAPSHOT), ("reset", _RESET))
        }
        self._ids = itertools.count(1)
        self._host = socket.gethostname()[:64]
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._live: dict[str, None] = {}  # leases of calls running here (renewed)
        self._unsettled: list[tuple[str, str, tuple]] = []  # settles the store did not receive
        self._renewer_pid = None
        self._closed = threading.Event()

    # -- store calls ---------------------------------------------------------------------
    def _run(self, script: str, args: list) -> Any:
        return self._scripts[script](keys=self._keys, args=self._head + args)

    def reserve(self, reservation, enforce: bool) -> Refusal | None:
        """Hold this call's forecast in the budget, or say why it is refused."""
        reservation.lease = None
        if self._down_until and time.monotonic() < self._down_until:
            return self._outage(reservation, None)
        lease_id = f"{self._host}:{os.getpid()}:{next(self._ids)}"
        forecast = [_amount(amount) for amount in reservation.forecast]
        try:
            reply = self._run("reserve", [lease_id, "1" if enforce else "0", *self._check_args, *forecast])
        except self._outage_error_types as error:
            return self._outage(reservation, error)
        if self._down_until:
            self._back_up()
        status, start = reply[0], reply[1]
        if status == 1 or status == 3 or (status == 0 and not enforce):
            reservation.lease = (lease_id, str(start))
            self._live[lease_id] = None
            self._renew_in_background()
        if status == 1:
            return None
        trip = self._trip(reply[2])
        if status == 0:
            return Refusal(self.scope, trip, True, False)
        sticky = bool(reply[3])
        return Refusal(self.scope, trip, sticky, sticky)

    def settle(self, lease: tuple, actual: tuple) -> Trip | None:
        """Drop the lease's holds and charge what the call used; the trip it opened, if any."""
        lease_id, start = lease
        self._live.pop(lease_id, None)
        amounts = [_amount(amount) for amount in actual]
        try:
            reply = self._run("settle", [lease_id, start, *self._check_args, *amounts])
        except self._outage_error_types as error:
            self._mark_down(error)
            self._owe(lease_id, start, tuple(actual))
            return None
        return self._trip(reply[1]) if len(reply) > 1 else None

    def release(self, lease: tuple) -> None:
        """The call never left the process: drop its holds."""
        lease_id, start = lease
        self._live.pop(lease_id, None)
        try:
            self._run("settle", [lease_id, start, "0", *_ZEROS])
        except self._outage_error_types as error:
            self._mark_down(error)
            self._owe(lease_id, start, (0,) * len(COUNTERS))

    def retry(self, lease: tuple, seconds: float) -> Refusal | None:
        lease_id, start = lease
        try:
            reply = self._run("retry", [lease_id, start, _amount(seconds), *self._check_args])
        except self._outage_error_types as error:
            self._mark_down(error)
            return None  # the attempt is already admitted locally; its request settles later
        if reply[0] == 1:
            return None
        trip = self._trip(reply[1])
        if reply[0] == 0:
            return Refusal(self.scope, trip, True, False)
        return Refusal(self.scope, trip, bool(reply[2]), bool(reply[2]))

    def snapshot(self) -> tuple[int, int, list, Trip | None]:
        """(window start, calls holding a lease, used, trip) of the current window."""
        reply = self._run("snapshot", [])
        used = [_number(value or 0) for value in reply[3:10]]
        trip = self._trip(reply[2]) if reply[2] else None
        return int(reply[0]), int(reply[1]), used, trip

    def reset(self) -> None:
        self._run("reset", [])

    # -- trips -----------------------------------------------------------------------------
    def _trip(self, raw: Any) -> Trip:
        index, threshold, observed, forecast, used = json.loads(raw)
        limit = "shared_" + LIMIT_OF_COUNTER[index]
        trip = make_trip(self.scope.name, index, _number(threshold), _number(observed), limit,
                         [_number(value) for value in used], forecast=bool(forecast))
        return Trip(trip.scope, trip.limit, trip.threshold, trip.observed,
                    f"shared budget {self.name!r}: {trip.reason}", trip.used)

    # -- outage ------------------------------------------------------------------------------
    def _mark_down(self, error: BaseException) -> None:
        self._down_until = time.monotonic() + REPROBE_S
        log_once(("store-down", self.name), "runguard: the shared budget's store %s is unreachable (%s: %s); "
                 "store_outage=%r. Logged once.", self.shown_url, type(error).__name__, error, self.outage)

    def _outage(self, reservation, error: BaseException | None) -> Refusal | None:
        if error is not None:
            self._mark_down(error)
        if self.outage == "fail_open":
            reservation.lease = ("", self._local_window_start())  # settled into the budget later
            return None
        trip = Trip(
            self.scope.name, "store_outage", None, None,
            f"shared budget {self.name!r}: its store {self.shown_url} is unreachable; calls are refused "
            "while it is down (store_outage='fail_closed')",
        )
        return Refusal(self.scope, trip, False, False)

    def _local_window_start(self) -> str:
        now = int(time.time())
        return str(now - now % self.window if self.window else 0)

    def _owe(self, lease_id: str, start: str, actual: tuple) -> None:
        """Keep a settle the store did not receive, to send when it answers again."""
        with self._lock:
            if len(self._unsettled) < MAX_UNSETTLED:
                self._unsettled.append((lease_id, start, actual))
                return
            # past the bound: fold usage into the last entry; the dropped lease expires on its own
            last_id, last_start, last = self._unsettled[-1]
            self._unsettled[-1] = (last_id, last_start, tuple(a + b for a, b in zip(last, actual)))

    def owe_offline(self, start: str, actual: tuple) -> None:
        self._owe("", start, actual)

    def _back_up(self) -> None:
        """The store answers again: send what was settled while it was down."""
        self._down_until = 0.0
        with self._lock:
            owed, self._unsettled = self._unsettled, []
        if owed:
            logger.warning("runguard: the shared budget's store %s answers again; reconciling %d call(s)",
                           self.shown_url, len(owed))
        from . import _recording

        for position, (lease_id, start, actual) in enumerate(owed):
            try:
                reply = self._run("settle", [lease_id, start, *self._check_args, *map(_amount, actual)])
            except self._outage_error_types as error:
                with self._lock:
                    self._unsettled[:0] = owed[position:]
                self._mark_down(error)
                return
            if len(reply) > 1:
                _recording.tripped(self._trip(reply[1]), self.scope)

    # -- leases --------------------------------------------------------------------------------
    def _renew_in_background(self) -> None:
        if self._renewer_pid == os.getpid():
            return
        with self._lock:
            if self._renewer_pid == os.getpid():
                return
            self._renewer_pid = os.getpid()
            threading.Thread(target=self._renew_loop, name="runguard-lease-renewer", daemon=True).start()

    def _renew_loop(self) -> None:
        while not self._closed.wait(self.lease_s / 3):
            live = list(self._live)
            if not live:
                continue
            try:
                self._run("renew", live)
            except Exception as error:  # the next reserve sees an outage; leases may lapse meanwhile
                log_once(("renew", self.name, type(error).__name__),
                         "runguard: could not renew shared-budget leases (%s: %s). Logged once.",
                         type(error).__name__, error)

    def close(self) -> None:
        self._closed.set()
        try:
            self._client.close()
        except Exception:
            pass


class SharedStore:
    """The in-memory store for this process's scopes, plus one shared budget every call also
    charges (the outermost scope). Same contract as ``MemoryStore``; local scopes are checked
    first, so a call refused locally never costs a round trip."""

    def __init__(self, local, budget: SharedBudget) -> None:
        self.local = local
        self.budget = budget
        self._lock = local._lock

    def reserve(self, reservation, enforce=True):
        refusal = self.local.reserve(reservation, enforce)
        if refusal is not None and enforce:
            reservation.lease = None
            return refusal
        try:
            shared = self.budget.reserve(reservation, enforce)
        except Exception as error:
            reservation.lease = None
            internal_error("reserving in the shared budget", error)
            return refusal
        if shared is not None and enforce:
            self.local.release(reservation)
            return shared
        return refusal or shared

    def _take_lease(self, reservation):
        with self._lock:
            if reservation.settled:
                return None, False
            lease = getattr(reservation, "lease", None)
            reservation.lease = None
            return lease, True

    def settle(self, reservation, actual, ok=True):
        lease, live = self._take_lease(reservation)
        if not live:
            return ()
        trips = self.local.settle(reservation, actual, ok)
        if lease is not None:
            if lease[0]:
                trip = self.budget.settle(lease, actual)
                if trip is not None:
                    trips = (*trips, (self.budget.scope, trip))
            else:  # admitted while the store was down (fail_open): owed to the budget
                self.budget.owe_offline(lease[1], tuple(actual))
        return trips

    def release(self, reservation):
        lease, live = self._take_lease(reservation)
        if not live:
            return
        self.local.release(reservation)
        if lease is not None and lease[0]:
            self.budget.release(lease)

    def retry(self, reservation, seconds):
        refusal = self.local.retry(reservation, seconds)
        if refusal is not None:
            return refusal
        lease = getattr(reservation, "lease", None)
        if lease is None or not lease[0]:
            return None
        return self.budget.retry(lease, seconds)

    def throttled(self, reservation, limits, retry_after=None):
        return self.local.throttled(reservation, limits, retry_after)

    def reset(self, scope):
        self.local.reset(scope)

    def trip(self, scope, trip):
        return self.local.trip(scope, trip)

    def snapshot(self, scope):
        return self.local.snapshot(scope)


def budget_from(settings: dict) -> SharedBudget | None:
    """The shared budget the resolved settings name, or None."""
    name = settings["shared_budget"].value
    if name is None:
        return None
    limits = {limit: settings[limit].value for limit in SHARED_LIMITS}
    return SharedBudget(name, settings["store"].value, limits, settings["shared_window"].value,
                        settings["store_outage"].value, settings["shared_lease_s"].value)


class SharedSnapshot:
    """What ``runguard.current_shared()`` returns: the shared budget's current window."""

    __slots__ = ("scope", *COUNTERS, "in_flight", "limits", "tripped", "window_start")

    def __init__(self, budget: SharedBudget) -> None:
        from ._scopes import _as_exception

        start, self.in_flight, used, trip = budget.snapshot()  # in_flight: admitted, not yet settled
        self.scope = budget.scope.name
        for name, value in zip(COUNTERS, used):
            setattr(self, name, value)
        self.limits = {name: value for name, value in budget.limits.items()}
        self.tripped = None if trip is None else _as_exception(trip)
        self.window_start = start

    def __repr__(self) -> str:
        return (f"SharedSnapshot(scope={self.scope!r}, calls={self.calls}, cost_usd={self.cost_usd:.6g}, "
                f"tripped={self.tripped!r})")
