"""Shared budgets: one named budget that every process of a job charges, kept in Redis.

A batch of agents on many workers wants one ceiling for the whole job ("this nightly
eval may spend $100"); in-process counters cannot see the other processes. With
``autolog(store="redis://…", shared_budget="nightly-eval", shared_max_cost_usd=100)``
every call also charges the budget ``shared:nightly-eval`` as one more open scope, with
the same reserve-before / settle-after exactness as the in-memory store, across
processes and machines:

- **Atomic.** Reserve, settle and retry are Lua scripts: check-and-hold is one step in
  Redis, so 32 threads in 4 processes cannot overshoot a shared call ceiling. A call
  waits for one round trip, its reserve, which also carries this process's earlier
  settles (see ``SharedBudget``).
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
``r0..r6`` counters in ``_store.COUNTERS`` order, ``trip``, and ``cfg``: the window and limits
the last reserving process enforced, for ``runguard status``) and ``…:leases`` (a sorted
set of "<lease id>|<window start>|<index>=<held amount>|..." scored by expiry, ms). The
braces keep one budget's keys in one Redis Cluster slot.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import itertools
import json
import os
import re
import socket
import sys
import threading
import time
import weakref
from typing import Any, NamedTuple

from ._config import INF, SHARED_LIMITS, redact
from ._counters import COUNTER_OF_LIMIT, COUNTERS, LIMIT_OF_COUNTER, REQUESTS, SECONDS, CounterView, Trip, make_trip
from ._errors import RunGuardConfigError, RunGuardTripped
from ._redis import Transport
from ._runtime import RUNTIME, log_once, logger
from ._store import Refusal

CONNECT_TIMEOUT_S = 0.25
READ_TIMEOUT_S = 0.25
REPROBE_S = 1.0  # while the store is down, try it again at most this often
SETTLE_DELAY_S = 0.05  # a settle no call carries within this is sent on its own
RECLAIM_PER_CALL = 32  # expired leases a reservation reclaims (amortised O(1))
MAX_UNSETTLED = 10_000  # settles kept for reconciliation while the store is down
SETTLED_KEEP_S = 3600  # a settle re-sent within this long after the first is applied once

# -- Lua ---------------------------------------------------------------------------------------
# What a call waits for is one reserve: few arguments (each costs the client time to encode),
# a reply that is one integer when the call is admitted, and a script that reads the window's
# counters with one HMGET and writes what changed with one HSET (a script's cost on the server
# is mostly how many commands it runs).
# ARGV[1] is "<key prefix>|<window length, s; 0: none>|<lease, ms>"; KEYS[1] holds the leases, a
# sorted set of "<lease id>|<window start>|<index>=<amount>|..." scored by expiry (ms). Lists of
# checks and amounts travel as "<index>:<value>[:<value>],...".
_PRELUDE = """
local prefix, window, lease_ms = string.match(ARGV[1], '^([^|]*)|([^|]*)|([^|]*)$')
window, lease_ms = tonumber(window), tonumber(lease_ms)
local FIELDS = {'u0', 'u1', 'u2', 'u3', 'u4', 'u5', 'u6', 'r0', 'r1', 'r2', 'r3', 'r4', 'r5', 'r6', 'trip', 'cfg'}
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]), tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function window_start(seconds)
  if window > 0 then return tostring(seconds - (seconds % window)) end
  return '0'
end
-- KEYS[4]: the window's hash "<prefix>:w:<start>", chosen by the caller (every key a script
-- touches is declared, in the budget's one hash slot: Redis Cluster refuses any other)
local declared = string.match(KEYS[4] or '', ':w:(%d+)$')
-- v[1..7]: used counters, v[8..14]: reserved, in _store.COUNTERS order; v.trip
local function load(wkey)
  local s = redis.call('HMGET', wkey, unpack(FIELDS))
  local v = {trip = s[15], cfg = s[16]}
  for i = 1, 14 do v[i] = tonumber(s[i] or '0') end
  return v
end
local function save(wkey, start, v, dirty)
  local args = {}
  for i in pairs(dirty) do
    local x = v[i]
    args[#args + 1] = FIELDS[i]
    -- whole numbers (calls, tokens) print exactly and fast; fractions (USD, seconds) need 17 digits
    if x == math.floor(x) and x < 1e14 and x > -1e14 then args[#args + 1] = tostring(x)
    else args[#args + 1] = string.format('%.17g', x) end
  end
  if #args > 0 then redis.call('HSET', wkey, unpack(args)) end
  if window > 0 then redis.call('PEXPIREAT', wkey, (tonumber(start) + window) * 1000 + 2 * lease_ms) end
end
local function lease_parts(member)
  local start, rest = string.match(member, '^[^|]*|([^|]*)(.*)$')
  local held = {}
  for index, amount in string.gmatch(rest, '|(%d)=([^|]+)') do held[#held + 1] = {tonumber(index), tonumber(amount)} end
  return start, held
end
local function unhold(v, held, dirty)
  for _, h in ipairs(held) do
    v[h[1] + 8] = v[h[1] + 8] - h[2]
    dirty[h[1] + 8] = true
  end
end
-- one call's usage "<index>:<amount>,..." into counters v, its lease's holds dropped
local function settle_into(v, dirty, held, usage)
  if held then unhold(v, held, dirty) end
  for index, amount in string.gmatch(usage, '(%d):([^:,]+)') do
    index = tonumber(index)
    v[index + 1] = v[index + 1] + tonumber(amount)
    dirty[index + 1] = true
  end
end
local function lease_id(member) return string.match(member, '^([^|]*)') end
-- the lease's holds in the declared window, or nil when it is gone (reclaimed after its
-- expiry, or never made) or holds in another window (left to be reclaimed when it expires).
-- ``member`` may be '#<lease id>': a reservation whose reply never arrived.
local function take_lease(member)
  if member == '' then return nil end
  if string.sub(member, 1, 1) == '#' then
    member = redis.call('HGET', KEYS[2], string.sub(member, 2))
    if not member then return nil end
  end
  local start, held = lease_parts(member)
  if start ~= declared then return nil end
  if redis.call('ZREM', KEYS[1], member) == 1 then
    redis.call('HDEL', KEYS[2], lease_id(member))
    return held
  end
  return nil
end
-- true the first time a lease is settled (or released): a settle re-sent after a timeout
-- whose script did run is applied once
local function first_settle(member, now)
  local id = member
  if string.sub(id, 1, 1) == '#' then id = string.sub(id, 2) else id = lease_id(id) end
  if id == '' then return true end
  if redis.call('ZADD', KEYS[3], 'NX', now, id) == 0 then return false end
  redis.call('PEXPIRE', KEYS[3], SETTLED_KEEP_MS)
  return true
end
local function trip_of(index, threshold_text, observed, forecast, v)
  return cjson.encode({index, threshold_text, observed, forecast, {v[1], v[2], v[3], v[4], v[5], v[6], v[7]}})
end
-- why an amount does not fit; the trip is stored (sticky) when committed usage alone forbids it
local function refusal(wkey, v, index, threshold_text, wanted)
  local threshold = tonumber(threshold_text)
  local u, r = v[index + 1], v[index + 8]
  local sticky = u + wanted > threshold
  local observed, forecast = u, 0
  if u < threshold then
    forecast = 1
    if sticky then observed = u + wanted else observed = u + r + wanted end
  end
  local trip = trip_of(index, threshold_text, observed, forecast, v)
  if sticky then redis.call('HSET', wkey, 'trip', trip) end
  return trip, sticky and 1 or 0
end
"""

_PRELUDE = _PRELUDE.replace("SETTLED_KEEP_MS", str(SETTLED_KEEP_S * 1000))

# ARGV[2] lease id, ARGV[3] enforce (1/0), ARGV[4] checks "<index>:<threshold>:<forecast>,...",
# ARGV[5] settles of this process's earlier calls of this window carried by this round trip,
# "<lease>~<usage>;...". Reclaims expired leases, applies the settles, then checks and holds.
# Returns the window start (an integer) when admitted (the lease is then
# "<id>|<start>|<index>=<forecast>|..." for each check), else {status, start, lease or false,
# trip, sticky, opened}: status 0 tripped before (opened: n when the n-th carried settle tripped it),
# 2 refused (nothing held), 3 over a limit but held anyway (shadow mode); or {4, start} when
# KEYS[4] is not the window the store's clock is in (nothing done: sent again with that one).
_RESERVE = (
    _PRELUDE
    + """
-- the same reserve sent again (its reply was lost with the connection): admitted once
local held = redis.call('HGET', KEYS[2], ARGV[2])
if held then return tonumber((lease_parts(held))) end
local seconds, now = clock()
local start = window_start(seconds)
if start ~= declared then return {4, start} end
local wkey = KEYS[4]
local v = load(wkey)
local dirty = {}
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, RECLAIM_PER_CALL)
if #expired > 0 then
  redis.call('ZREM', KEYS[1], unpack(expired))
  for _, member in ipairs(expired) do
    redis.call('HDEL', KEYS[2], lease_id(member))
    local lease_start, held = lease_parts(member)
    -- a lease of an earlier window held only there: that window is over
    if lease_start == start then unhold(v, held, dirty) end
  end
end
local checks, limits = {}, {}
for index, threshold, amount in string.gmatch(ARGV[4], '(%d):([^:,]+):([^:,]+)') do
  checks[#checks + 1] = {tonumber(index), threshold, amount}
  limits[#limits + 1] = index .. ':' .. threshold
end
-- the limits and window this process enforces, for `runguard status` (written when they change)
local cfg = window .. '|' .. table.concat(limits, ',')
if v.cfg ~= cfg then redis.call('HSET', wkey, 'cfg', cfg) end
local opened = 0
if ARGV[5] ~= '' then
  local n = 0
  for member, usage in string.gmatch(ARGV[5], '([^~;]*)~([^~;]*)') do
    n = n + 1
    if first_settle(member, now) then settle_into(v, dirty, take_lease(member), usage) end
    if not v.trip then
      for _, c in ipairs(checks) do
        if v[c[1] + 1] >= tonumber(c[2]) then
          v.trip = trip_of(c[1], c[2], v[c[1] + 1], 0, v)
          redis.call('HSET', wkey, 'trip', v.trip)
          opened = n
          break
        end
      end
    end
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - SETTLED_KEEP_MS)
end
local status, trip, sticky = 1, false, 0
if v.trip then
  status, trip = 0, v.trip
else
  for _, c in ipairs(checks) do
    local wanted = tonumber(c[3])
    if v[c[1] + 1] + v[c[1] + 8] + wanted > tonumber(c[2]) then
      trip, sticky = refusal(wkey, v, c[1], c[2], wanted)
      status = 2
      break
    end
  end
end
if status ~= 1 and ARGV[3] == '1' then
  save(wkey, start, v, dirty)
  return {status, start, false, trip, sticky, opened}
end
local member = ARGV[2] .. '|' .. start
for _, c in ipairs(checks) do
  v[c[1] + 8] = v[c[1] + 8] + tonumber(c[3])
  dirty[c[1] + 8] = true
  member = member .. '|' .. c[1] .. '=' .. c[3]
end
save(wkey, start, v, dirty)
redis.call('ZADD', KEYS[1], now + lease_ms, member)
redis.call('HSET', KEYS[2], ARGV[2], member)
if status == 1 then return tonumber(start) end
if status == 2 then status = 3 end
return {status, start, member, trip, sticky, opened}
""".replace("RECLAIM_PER_CALL", str(RECLAIM_PER_CALL))
)

# KEYS[4] the call's window (where its lease holds, or where it started), ARGV[2] lease ('' for
# none), ARGV[3] checks "<index>:<threshold>,...", ARGV[4] usage "<index>:<amount>,...". Drops
# the lease's holds (unless it was reclaimed meanwhile), adds the usage, and trips a limit it
# reached. Returns {start, trip or false} (a trip this settle opened).
_SETTLE = (
    _PRELUDE
    + """
local _, now = clock()
if not first_settle(ARGV[2], now) then return {declared, false} end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - SETTLED_KEEP_MS)
local held = take_lease(ARGV[2])
local wkey = KEYS[4]
local v = load(wkey)
local dirty = {}
settle_into(v, dirty, held, ARGV[4])
save(wkey, declared, v, dirty)
if v.trip then return {declared, false} end
for index, threshold in string.gmatch(ARGV[3], '(%d):([^:,]+)') do
  index = tonumber(index)
  if v[index + 1] >= tonumber(threshold) then
    local trip = trip_of(index, threshold, v[index + 1], 0, v)
    redis.call('HSET', wkey, 'trip', trip)
    return {declared, trip}
  end
end
return {declared, false}
"""
)

_RESERVE = _RESERVE.replace("SETTLED_KEEP_MS", str(SETTLED_KEEP_S * 1000))
_SETTLE = _SETTLE.replace("SETTLED_KEEP_MS", str(SETTLED_KEEP_S * 1000))

# One more HTTP attempt of an admitted call. KEYS[4] its window, ARGV[2] seconds spent so far,
# ARGV[3] checks "<index>:<threshold>,...", ARGV[4] enforce (1/0), ARGV[5] the attempt's id (an
# attempt counted once: sent again after a lost reply, or owed after an outage, it is not counted
# twice). Returns {1} admitted (one more request used), {0, trip} tripped before, {2, trip,
# sticky} refused.
_RETRY = (
    _PRELUDE
    + """
if redis.call('ZSCORE', KEYS[3], ARGV[5]) then return {1} end
local start = declared
local wkey = KEYS[4]
local v = load(wkey)
local dirty = {[7] = true}
v[7] = v[7] + tonumber(ARGV[2])
local result = nil
if v.trip then
  result = {0, v.trip}
else
  for index, threshold in string.gmatch(ARGV[3], '(%d):([^:,]+)') do
    index = tonumber(index)
    if index == 6 and v[7] >= tonumber(threshold) then
      local trip = trip_of(6, threshold, v[7], 0, v)
      redis.call('HSET', wkey, 'trip', trip)
      result = {2, trip, 1}
      break
    end
    if index == 1 and v[2] + v[9] + 1 > tonumber(threshold) then
      local trip, sticky = refusal(wkey, v, 1, threshold, 1)
      result = {2, trip, sticky}
      break
    end
  end
end
-- admitted, or refused in shadow mode (ARGV[4] '0'): the attempt goes, and counts
if result == nil or ARGV[4] == '0' then
  v[2] = v[2] + 1
  dirty[2] = true
  local _, now = clock()
  redis.call('ZADD', KEYS[3], now, ARGV[5])
  redis.call('PEXPIRE', KEYS[3], SETTLED_KEEP_MS)
end
save(wkey, start, v, dirty)
return result or {1}
"""
)

# ARGV[2..]: leases of calls still running here; each is extended by a lease.
_RETRY = _RETRY.replace("SETTLED_KEEP_MS", str(SETTLED_KEEP_S * 1000))

_RENEW = (
    _PRELUDE
    + """
local _, now = clock()
local args = {'XX'}
for i = 2, #ARGV do
  args[#args + 1] = now + lease_ms
  args[#args + 1] = ARGV[i]
end
if #args > 1 then redis.call('ZADD', KEYS[1], unpack(args)) end
return #ARGV - 1
"""
)

# Returns {start, leases held, trip or false, u0..u6, "<window>|<index>:<limit>,..." or false} of
# the window KEYS[4].
_SNAPSHOT = (
    _PRELUDE
    + """
local s = redis.call('HMGET', KEYS[4], unpack(FIELDS))
return {declared, redis.call('ZCARD', KEYS[1]), s[15] or false, s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[16] or false}
"""
)


def _number(text: Any) -> float:
    value = float(text)
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


def _amount(value: float) -> str:
    """An amount as a script reads it back exactly (``repr`` of a float round-trips)."""
    return str(value) if type(value) is int else repr(float(value))


_PID = [os.getpid()]  # this process's id, kept without a system call per call
os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))
CARRY_MOST = 64  # settles one reserve carries


class SharedScope:
    """What a shared budget's trips and records name (``shared:<name>``)."""

    __slots__ = ("name",)

    def __init__(self, budget_name: str) -> None:
        self.name = f"shared:{budget_name}"

    def __repr__(self) -> str:
        return f"<runguard scope {self.name}>"


class Lease(NamedTuple):
    """What one call holds in one shared budget: ``member`` is the lease as the store keeps it
    ("<id>|<window start>|<index>=<amount>|..."), or "#<id>" for a call admitted while the store
    did not answer (fail_open), settled by id once it does."""

    budget: SharedBudget
    member: str
    start: str


def transport(store: Any) -> Transport:
    """How to reach the store (a URL or a redis-py client), with short timeouts: a dead store
    must never hang an agent."""
    try:
        import redis  # noqa: F401
    except ImportError:
        raise RunGuardConfigError(
            f"runguard: store={redact(store)!r} needs the redis package: pip install 'runguard-autolog[redis]'"
        ) from None
    return Transport(store, CONNECT_TIMEOUT_S, READ_TIMEOUT_S)


def _outage_errors() -> tuple:
    """Every error the store can answer is an outage (down, slow, out of memory, read-only,
    auth, a write not replicated): ``store_outage`` decides, never a silent admit."""
    import redis

    return (redis.exceptions.RedisError, OSError)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SharedClient:
    """One store's connection state, shared by every budget on it: the Redis client and its
    scripts, one connection per thread for reserves, one writer thread, the queues of settles
    and leases, and whether the store is down. A process keeps one per store URL, however many
    budgets it charges (one per tenant, say): a budget itself is a few strings.

    NB: a call waits for one round trip per budget, its reserve. Its settle is queued and carried
    by the next reserve of that budget in this process (the same script applies it first), or,
    when none follows within ``SETTLE_DELAY_S``, sent by the writer thread, pipelined with the
    others. Until a settle lands the call's hold stays reserved, so a late settle can only make
    the budget refuse sooner, never overshoot.
    """

    def __init__(self, url: Any, lease_s: float = 30.0) -> None:
        self.url = url  # a store URL, or a redis-py client the application built
        self.shown_url = redact(url)
        self.lease_s = lease_s
        self._transport = transport(url)
        self._outage_error_types = _outage_errors()
        self._shas = {
            name: self._transport.script(source)
            for name, source in (
                ("reserve", _RESERVE),
                ("settle", _SETTLE),
                ("retry", _RETRY),
                ("renew", _RENEW),
                ("snapshot", _SNAPSHOT),
            )
        }
        self._reserve_sha = self._shas["reserve"]
        self._ids = itertools.count(1)
        self._host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:64]
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._sent = threading.Condition(self._lock)
        # budgets by configuration; a budget lives while a scope, a queued settle or a lease needs it
        self._budgets: weakref.WeakValueDictionary[tuple, SharedBudget] = weakref.WeakValueDictionary()
        self._live: dict[str, SharedBudget] = {}  # leases of calls running here (renewed by the writer)
        self._pending: dict[SharedBudget, list] = {}  # settles not yet sent, per budget: (lease, actual, where)
        self._sending = 0  # settles taken from _pending whose reply has not arrived
        self._unsettled: list[tuple[Lease, tuple]] = []  # settles the store did not receive
        # usage owed past MAX_UNSETTLED, by (budget name, head, checks, window start): no budget kept alive
        self._overflow: dict[tuple[str, str, str, str], tuple] = {}
        self._wake = threading.Event()
        self._writer_parked = True  # waiting for work (woken by a settle), not polling
        self._stopping = False
        self._writer_pid: int | None = None
        RUNTIME.at_fork(self, "_after_fork")

    def _after_fork(self) -> None:
        """A forked child gets fresh locks (another thread may hold the parent's), and none of
        the parent's queued settles, leases or owed usage: the parent sends those itself."""
        self._lock = threading.Lock()
        self._sent = threading.Condition(self._lock)
        self._pending = {}
        self._live = {}
        self._unsettled = []
        self._overflow = {}
        self._sending = 0
        self._writer_parked = True
        self._wake = threading.Event()

    def budget(
        self, name: str, limits: dict[str, float], window: int | None = None, outage: str = "fail_closed"
    ) -> SharedBudget:
        """The budget ``name`` with these limits, window and outage policy (one object while in use)."""
        key = (name, tuple(sorted(limits.items())), window or 0, outage)
        budget = self._budgets.get(key)
        if budget is None:
            budget = self._budgets[key] = SharedBudget(self, name, limits, window, outage)
        return budget

    # -- store calls ---------------------------------------------------------------------
    def run(self, budget: SharedBudget, script: str, start: str, args: list) -> Any:
        """A script on ``budget``'s keys and the window starting at ``start``; an error answer raises."""
        window_key = budget.window_key(start)
        keys = (*budget.keys, window_key)
        command = ("EVALSHA", self._shas[script], 4, *keys, budget.head, *args)
        return self._transport.call(window_key, *command, write=script != "snapshot")

    def reserve(self, budget: SharedBudget, window_key: str, args: list) -> Any:
        """The reserve script: the round trip a call waits for, over a connection this thread
        keeps to the node that owns the budget (see ``_redis.Transport``)."""
        reply = self._transport.one(
            window_key, ("EVALSHA", self._reserve_sha, 4, *budget.keys, window_key, budget.head, *args)
        )
        if isinstance(reply, Exception):
            raise reply
        return reply

    def settle_command(self, lease: Lease, actual: tuple) -> tuple[str, tuple]:
        budget = lease.budget
        window_key = budget.window_key(lease.start)
        command = (
            "EVALSHA",
            self._shas["settle"],
            4,
            *budget.keys,
            window_key,
            budget.head,
            *_settle_args(lease, actual),
        )
        return window_key, command

    def new_id(self) -> str:
        return f"{self._host}:{_PID[0]}:{next(self._ids)}"

    # -- settles in flight -------------------------------------------------------------------
    def queue(self, lease: Lease, actual: tuple, where: Any = None) -> None:
        """Queue a settle (``actual`` empty: a release) for the next reserve or the writer."""
        self._live.pop(lease.member, None)
        entry = (lease, actual, where)
        with self._lock:
            queued = self._pending.get(lease.budget)
            if queued is None:
                self._pending[lease.budget] = [entry]
            else:
                queued.append(entry)
        if self._writer_parked or self._writer_pid != _PID[0]:
            self._start_writer()
            self._wake.set()

    def carry(self, budget: SharedBudget, start: str) -> list:
        """Take up to ``CARRY_MOST`` of ``budget``'s queued settles of the window ``start`` for its
        next reserve to carry (the writer sends the others: calls that began in another window)."""
        with self._lock:
            taken = self._pending.pop(budget, None)
            if not taken:
                return []
            if len(taken) > CARRY_MOST:
                self._pending[budget] = taken[CARRY_MOST:]
                taken = taken[:CARRY_MOST]
            if any(entry[0].start != start or entry[0].member[0] == "#" for entry in taken):
                others = [entry for entry in taken if entry[0].start != start or entry[0].member[0] == "#"]
                taken = [entry for entry in taken if entry[0].start == start and entry[0].member[0] != "#"]
                self._pending[budget] = [*others, *self._pending.get(budget, ())]
            self._sending += len(taken)
        return taken

    def uncarry(self, budget: SharedBudget, taken: list) -> None:
        """Queue again settles a reserve carried but the store did not apply (another window)."""
        with self._lock:
            self._pending[budget] = [*taken, *self._pending.get(budget, ())]

    def _take_all(self) -> list:
        with self._lock:
            pending, self._pending = self._pending, {}
            taken = [entry for entries in pending.values() for entry in entries]
            self._sending += len(taken)
        return taken

    def done_sending(self, count: int) -> None:
        with self._sent:
            self._sending -= count
            self._sent.notify_all()

    def _send(self, settles: list) -> None:
        """Settle a batch (of any budgets) in one pipelined round trip per node; trips they open
        are recorded."""
        try:
            try:
                replies = self._transport.batch([self.settle_command(lease, actual) for lease, actual, _ in settles])
            except self._outage_error_types as error:
                self.mark_down(error)
                for lease, actual, _ in settles:
                    self.owe(lease, actual)
                return
            for reply, (lease, actual, where) in zip(replies, settles):
                if isinstance(reply, Exception):  # kept and sent again: settles are applied once
                    self.mark_down(reply)
                    self.owe(lease, actual)
                    continue
                if reply[1]:
                    RUNTIME.events.tripped(lease.budget.trip(reply[1]), lease.budget.scope, where)
        finally:
            self.done_sending(len(settles))

    def flush(self, timeout: float = 5.0) -> bool:
        """Send the queued settles now and wait for those already on their way (bounded)."""
        deadline = time.monotonic() + timeout
        if self._pending:
            self._send(self._take_all())
        if (self._unsettled or self._overflow) and (not self._down_until or time.monotonic() >= self._down_until):
            self._reconcile()
        with self._sent:
            while self._sending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._sent.wait(left)
        return not (self._pending or self._unsettled or self._overflow)

    # -- outage ------------------------------------------------------------------------------
    def down(self) -> bool:
        """The store did not answer lately: calls skip it until it is probed again."""
        return bool(self._down_until) and time.monotonic() < self._down_until

    def mark_down(self, error: BaseException) -> None:
        self._down_until = time.monotonic() + REPROBE_S
        log_once(
            ("store-down", self.url),
            "runguard: the shared budgets' store %s is unreachable (%s: %s); calls follow store_outage. Logged once.",
            self.shown_url,
            type(error).__name__,
            error,
        )

    def owe(self, lease: Lease, actual: tuple) -> None:
        """Keep a settle the store did not receive, to send when it answers again."""
        with self._lock:
            if len(self._unsettled) < MAX_UNSETTLED:
                self._unsettled.append((lease, actual))
                return
            # past the bound: usage is summed per budget and window; the dropped lease expires on its own
            key = (lease.budget.name, lease.budget.head, lease.budget.check_text, lease.start)
            owed = self._overflow.get(key)
            if owed is None and len(self._overflow) >= MAX_UNSETTLED:
                log_once(
                    ("owed-dropped", self.url),
                    "runguard: more than %d budgets owe usage to the store %s while it is down; the usage of "
                    "further ones is not added when it answers. Logged once.",
                    MAX_UNSETTLED,
                    self.shown_url,
                )
                return
            owed = owed or (0,) * len(COUNTERS)
            self._overflow[key] = tuple(a + b for a, b in zip(owed, actual or (0,) * len(COUNTERS)))

    def back_up(self) -> None:
        """The store answers again: what calls used while it was down is sent now, by the call
        that found it back (one pipelined round trip), so later calls are checked against it."""
        self._down_until = 0.0
        if self._unsettled or self._overflow:
            self._reconcile()

    def _reconcile(self) -> None:
        """Send the owed settles, pipelined; those the store still does not take stay owed."""
        with self._lock:
            owed, self._unsettled = self._unsettled, []
            overflow, self._overflow = self._overflow, {}
            if not owed and not overflow:
                return
            self._sending += len(owed) + len(overflow)
        settles = [(lease, actual, None) for lease, actual in owed]
        for (budget_name, head, check_text, start), usage in overflow.items():
            budget = self._overflow_budget(budget_name, head, check_text)
            settles.append((Lease(budget, f"#{self.new_id()}", start), usage, None))
        logger.warning(
            "runguard: the shared budgets' store %s answers again; reconciling %d call(s)",
            self.shown_url,
            len(settles),
        )
        self._send(settles)

    def _overflow_budget(self, name: str, head: str, check_text: str) -> SharedBudget:
        """A budget object for usage folded past the bound (its keys and checks, as recorded)."""
        budget = SharedBudget(self, name, {})
        budget.head, budget.check_text = head, check_text
        return budget

    # -- the writer thread ---------------------------------------------------------------------
    def _start_writer(self) -> None:
        """One writer per store and process (a forked child starts its own)."""
        if self._writer_pid != _PID[0]:
            with self._lock:
                if self._writer_pid != _PID[0]:
                    self._writer_pid = _PID[0]
                    self._writer_parked = True
                    threading.Thread(target=self._write, name="runguard-shared-budget", daemon=True).start()

    def _write(self) -> None:
        """Send settles no call carried within ``SETTLE_DELAY_S``
        and renew the leases of calls still running. While settles keep coming it polls every
        ``SETTLE_DELAY_S`` (a settle never wakes a thread); idle, it parks until one does."""
        renew_every = self.lease_s / 3
        next_renewal = time.monotonic() + renew_every
        while not self._stopping:
            if self._writer_parked:
                self._wake.wait(max(0.0, next_renewal - time.monotonic()))
                self._wake.clear()
                self._writer_parked = False
            time.sleep(SETTLE_DELAY_S)  # meanwhile, the next call usually carries the settles
            try:
                if self._pending:
                    self._send(self._take_all())
                elif not self._live:
                    self._writer_parked = True
                    if self._pending:  # a settle that came as it parked
                        self._writer_parked = False
                if time.monotonic() >= next_renewal:
                    next_renewal = time.monotonic() + renew_every
                    self._renew()
            except Exception as error:  # never let the writer die
                log_once(
                    ("writer", self.url, type(error).__name__),
                    "runguard: shared-budget writer error (%s: %s). Logged once.",
                    type(error).__name__,
                    error,
                    exc_info=error,
                )

    def _renew(self) -> None:
        """Extend the leases of calls still running: one script per budget, one round trip."""
        by_budget: dict[SharedBudget, list[str]] = {}
        for member, budget in list(self._live.items()):
            by_budget.setdefault(budget, []).append(member)
        if not by_budget:
            return
        sha = self._shas["renew"]
        try:
            replies = self._transport.batch(
                [
                    (budget.keys[0], ("EVALSHA", sha, 3, *budget.keys, budget.head, *members))
                    for budget, members in by_budget.items()
                ]
            )
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
        except Exception as error:  # the next reserve sees an outage; leases may lapse meanwhile
            log_once(
                ("renew", self.url, type(error).__name__),
                "runguard: could not renew shared-budget leases (%s: %s). Logged once.",
                type(error).__name__,
                error,
            )

    def close(self) -> None:
        """Send what is queued (bounded wait), stop the writer, close the connections."""
        try:
            self.flush(2.0)
        except Exception:
            pass
        self._stopping = True
        self._wake.set()
        try:
            self._transport.close()
        except Exception:
            pass


class SharedBudget:
    """One named budget in Redis, as this process charges it: its name, limits, window and outage
    policy, and the keys its scripts touch. Reserve/settle/release/retry go through its store's
    ``SharedClient``; the object itself holds no connection, thread or queue."""

    __slots__ = (
        "__weakref__",
        "_current",
        "_hint",
        "check_text",
        "checks",
        "client",
        "head",
        "keys",
        "limits",
        "name",
        "outage",
        "prefix",
        "scope",
        "window",
    )

    def __init__(
        self,
        client: SharedClient,
        name: str,
        limits: dict[str, float],
        window: int | None = None,
        outage: str = "fail_closed",
    ) -> None:
        self.client = client
        self.name = name
        self.scope = SharedScope(name)
        self.limits = dict(limits)
        self.checks = tuple(
            (COUNTER_OF_LIMIT[limit[len("shared_") :]], _amount(value))
            for limit, value in limits.items()
            if value != INF
        )
        self.check_text = ",".join(f"{index}:{threshold}" for index, threshold in self.checks)
        self.window = window or 0
        self.outage = outage
        self.prefix = prefix = f"runguard:{{{name}}}"
        self.keys = (f"{prefix}:leases", f"{prefix}:ids", f"{prefix}:settled")
        self.head = f"{prefix}|{self.window}|{int(client.lease_s * 1000)}"
        self._current = ("0", f"{prefix}:w:0")  # the window this process last charged, and its key
        self._hint: tuple[int, str] | None = None  # (this clock's window start, the store's) near a boundary

    def window_key(self, start: str) -> str:
        return f"{self.prefix}:w:{start}"

    def current(self) -> tuple[str, str]:
        """The window a call is in now, and its key. The store's clock decides (one clock for
        every machine): this process's clock guesses, and the store corrects a guess a skew makes
        wrong near a boundary (see ``_RESERVE``)."""
        window = self.window
        if not window:
            return self._current
        now = int(time.time())
        local = now - now % window
        hint = self._hint
        start = hint[1] if hint is not None and hint[0] == local else str(local)
        current = self._current
        if current[0] != start:
            current = self._current = (start, f"{self.prefix}:w:{start}")
        return current

    def retry_after(self) -> float | None:
        """Seconds until the current window rolls over (``None``: not windowed), for a refusal's
        ``details["retry_after"]`` and a web response's ``Retry-After``."""
        if not self.window:
            return None
        return max(0.0, int(self.current()[0]) + self.window - time.time())

    def corrected(self, start: str) -> None:
        """The store's clock is in window ``start`` while this one guessed another."""
        now = int(time.time())
        self._hint = (now - now % self.window if self.window else 0, start)

    @property
    def url(self) -> str:
        return self.client.url

    @property
    def lease_s(self) -> float:
        return self.client.lease_s

    def __repr__(self) -> str:
        return f"<runguard shared budget {self.name!r} on {self.client.shown_url}>"

    def reserve(self, forecast: tuple, enforce: bool) -> tuple[Refusal | None, Lease | None]:
        """Hold this call's forecast in the budget, or say why it is refused; the lease to settle."""
        client = self.client
        if client.down():
            return self.outage_refusal(None)
        holds = [(index, threshold, _amount(forecast[index])) for index, threshold in self.checks]
        lease_id = client.new_id()
        checks = ",".join(f"{index}:{threshold}:{amount}" for index, threshold, amount in holds)
        if client._writer_pid != _PID[0]:
            client._start_writer()
        start, window_key = self.current()
        for _ in range(3):  # sent again only when the store's clock is in another window
            carried = client.carry(self, start) if client._pending else ()
            try:
                reply = client.reserve(
                    self,
                    window_key,
                    [
                        lease_id,
                        "1" if enforce else "0",
                        checks,
                        ";".join(f"{lease.member}~{_usage(actual)}" for lease, actual, _ in carried),
                    ],
                )
            except client._outage_error_types as error:
                for lease, actual, _ in carried:
                    client.owe(lease, actual)
                return self.outage_refusal(error, lease_id, start)
            finally:
                if carried:
                    client.done_sending(len(carried))
            if type(reply) is int or reply[0] != 4:
                break
            if carried:
                client.uncarry(self, carried)
            self.corrected(_text(reply[1]))
            start, window_key = self.current()
        else:
            return self.outage_refusal(RuntimeError("the store's window kept moving"), lease_id, start)
        if client._down_until:
            client.back_up()
        if type(reply) is int:  # admitted: the lease is what the script recorded
            start = str(reply)
            member = f"{lease_id}|{start}" + "".join(f"|{index}={amount}" for index, _, amount in holds)
            status = 1
        else:
            status, start, member, trip, sticky, opened = reply
            start, member = _text(start), member and _text(member)
        lease = None
        if member:
            lease = Lease(self, member, start)
            client._live[member] = self  # renewed by the writer while the call runs
        if status == 1:
            return None, lease
        if status == 0:
            tripped = self.trip(trip)
            if opened and 0 < opened <= len(carried):  # an earlier call's usage, carried here, tripped it
                RUNTIME.events.tripped(tripped, self.scope, carried[opened - 1][2] or False)  # on its run
                return Refusal(self.scope, tripped, True, False), lease
            return Refusal(self.scope, tripped, True, bool(opened)), lease
        return Refusal(self.scope, self.trip(trip), bool(sticky), bool(sticky)), lease

    def settle(self, lease: Lease, actual: tuple, where: Any = None) -> None:
        """Drop the lease's holds and charge what the call used (queued: see ``SharedClient``; a
        trip it opens is recorded on the MLflow run ``where`` names). A call admitted while the
        store did not answer is owed to the budget, applied once when it does."""
        if lease.member.startswith("#"):
            self.client.owe(lease, tuple(actual))
        else:
            self.client.queue(lease, tuple(actual), where)

    def release(self, lease: Lease) -> None:
        """The call never left the process: drop its holds (queued like a settle)."""
        self.settle(lease, ())

    def unretry(self, lease: Lease) -> None:
        """Take back the request ``retry`` counted for an attempt that was not sent after all
        (another budget refused it); applied once, by id."""
        taken_back = tuple(-1 if index == REQUESTS else 0 for index in range(len(COUNTERS)))
        self.client.queue(Lease(self, f"#{self.client.new_id()}", lease.start), taken_back)

    def retry(self, lease: Lease, seconds: float, enforce: bool = True) -> Refusal | None:
        """One more HTTP attempt of the call holding ``lease``: admitted as one more request, or refused."""
        client = self.client
        attempt = client.new_id()
        if lease.member.startswith("#") or client.down():
            return self._retry_outage(lease.start, seconds, None, attempt)
        try:
            args = [_amount(seconds), self.check_text, "1" if enforce else "0", attempt]
            reply = client.run(self, "retry", lease.start, args)
        except client._outage_error_types as error:
            return self._retry_outage(lease.start, seconds, error, attempt)
        if reply[0] == 1:
            return None
        trip = self.trip(reply[1])
        if reply[0] == 0:
            return Refusal(self.scope, trip, True, False)
        return Refusal(self.scope, trip, bool(reply[2]), bool(reply[2]))

    def _window_keys(self) -> list[bytes]:
        return self.client._transport.scan(self.keys[0], f"{self.prefix}:w:*")

    def snapshot(self, window_known: bool = True) -> BudgetState:
        """The budget's current window as the store keeps it. A process that does not know the
        budget's window (``runguard status``, ``current_shared(name)``) reads the latest window
        there is."""
        if window_known:
            start = self.current()[0]
        else:
            starts = [int(_text(key).rsplit(":", 1)[1]) for key in self._window_keys()]
            start = str(max(starts, default=0))
        reply = self.client.run(self, "snapshot", start, [])
        used = [_number(value or 0) for value in reply[3:10]]
        trip = self.trip(reply[2]) if reply[2] else None
        window, limits = _configuration(reply[10] if len(reply) > 10 else None)
        return BudgetState(int(reply[0]), int(reply[1]), used, trip, limits, window)

    def reset(self) -> None:
        """Zero the counters of every window, drop every lease and close the circuit (whatever
        window length the budget's processes use)."""
        self.client._transport.call(self.keys[0], "DEL", *self._window_keys(), *self.keys)

    def flush(self, timeout: float = 5.0) -> bool:
        return self.client.flush(timeout)

    # -- trips -----------------------------------------------------------------------------
    def trip(self, raw: Any) -> Trip:
        index, threshold, observed, forecast, used = json.loads(raw)
        limit = "shared_" + LIMIT_OF_COUNTER[index]
        return make_trip(
            self.scope.name,
            index,
            _number(threshold),
            _number(observed),
            [_number(value) for value in used],
            forecast=bool(forecast),
            limit=limit,
            prefix=f"shared budget {self.name!r}: ",
        )

    # -- outage ------------------------------------------------------------------------------
    def outage_refusal(
        self, error: BaseException | None, lease_id: str = "", start: str | None = None
    ) -> tuple[Refusal | None, Lease | None]:
        """The store did not answer a reserve. ``lease_id``: the reserve that was sent (in the
        window ``start``), whose script may still have run: its holds are released once the
        store answers again."""
        client = self.client
        if error is not None:
            client.mark_down(error)
        if start is None:
            start = self.current()[0]
        if self.outage == "fail_open":
            # settled into the budget later, by id: applied once (a reply lost on the way back
            # does not count it twice), releasing the late lease if the reserve did run
            return None, Lease(self, f"#{lease_id or client.new_id()}", start)
        if lease_id:  # a reserve was sent: release whatever it held, once the store answers
            client.owe(Lease(self, f"#{lease_id}", start), ())
        return self.closed(), None

    def closed(self) -> Refusal:
        """The refusal of a call (or a retry) while the store cannot be reached (fail_closed)."""
        trip = Trip(
            self.scope.name,
            "store_outage",
            None,
            None,
            f"shared budget {self.name!r}: its store {self.client.shown_url} is unreachable; calls are refused "
            "while it is down (store_outage='fail_closed')",
        )
        return Refusal(self.scope, trip, False, False)

    def _retry_outage(self, start: str, seconds: float, error: BaseException | None, attempt: str) -> Refusal | None:
        """A retry the store could not admit: refused under fail_closed; under fail_open it goes,
        and its request (and the seconds before it) is owed to the budget, applied once: by the
        attempt's id, so a retry script that did run before its reply was lost is not counted twice.
        (Under fail_closed such a script's request stays counted, though the attempt is not sent:
        the budget errs toward refusing sooner.)"""
        if error is not None:
            self.client.mark_down(error)
        if self.outage == "fail_open":
            actual = tuple(
                1 if index == REQUESTS else seconds if index == SECONDS else 0 for index in range(len(COUNTERS))
            )
            self.client.owe(Lease(self, f"#{attempt}", start), actual)
            return None
        return self.closed()


class BudgetState(NamedTuple):
    """A shared budget's current window as the store keeps it."""

    window_start: int
    in_flight: int  # calls admitted and not yet settled (leases held), every process
    used: list
    trip: Trip | None
    limits: dict[str, float]  # as the last process to reserve enforced them ({}: none seen)
    window: int | None  # seconds (None: no window, or none seen)


def _configuration(raw: Any) -> tuple[int | None, dict[str, float]]:
    """The window and limits a reserve recorded: "<window s>|<index>:<limit>,..."."""
    if not raw:
        return None, {}
    window, _, checks = (raw.decode() if isinstance(raw, bytes) else str(raw)).partition("|")
    limits = {}
    for check in filter(None, checks.split(",")):
        index, _, threshold = check.partition(":")
        limits["shared_" + LIMIT_OF_COUNTER[int(index)]] = _number(threshold)
    return (int(window) or None) if window.isdigit() else None, limits


def _usage(actual: tuple) -> str:
    """A call's usage as scripts read it: "<index>:<amount>,..." for each non-zero counter."""
    return ",".join(f"{index}:{_amount(amount)}" for index, amount in enumerate(actual) if amount)


def _settle_args(lease: Lease, actual: tuple) -> list:
    if not actual:  # a release: drop the holds, charge nothing, check nothing
        return [lease.member, "", ""]
    return [lease.member, lease.budget.check_text, _usage(actual)]


_CLIENTS: dict[tuple[Any, float], SharedClient] = {}  # the stores this process charges, by URL
_CLIENTS_LOCK = threading.Lock()
RUNTIME.fork_safe(sys.modules[__name__], "_CLIENTS_LOCK", threading.Lock)  # a fork while it is held


def shared_client(url: Any, lease_s: float = 30.0) -> SharedClient:
    """This process's client for the store at ``url`` (one per URL, whatever the budgets)."""
    with _CLIENTS_LOCK:
        client = _CLIENTS.get((url, lease_s))
        if client is None:
            client = _CLIENTS[(url, lease_s)] = SharedClient(url, lease_s)
        return client


def drop_client(client: SharedClient) -> None:
    """Flush and close a client no configuration uses any more."""
    with _CLIENTS_LOCK:
        if _CLIENTS.get((client.url, client.lease_s)) is client:
            del _CLIENTS[(client.url, client.lease_s)]
    client.close()


def flush_all(timeout: float = 5.0) -> bool:
    """Send every store's queued settles (bounded)."""
    deadline = time.monotonic() + timeout
    done = True
    for client in list(_CLIENTS.values()):
        done = client.flush(max(0.0, deadline - time.monotonic())) and done
    return done


@atexit.register
def _flush_at_exit() -> None:
    """Send this process's last settles before it exits (bounded: a dead store cannot hold it)."""
    try:
        flush_all(2.0)
    except Exception:
        pass


def _merged(client: SharedClient, budgets: list[SharedBudget], outage: str) -> list[SharedBudget]:
    """One budget per name: nested scopes naming the same budget charge it once, under the
    lowest of their limits (and the outermost's window)."""
    by_name: dict[str, SharedBudget] = {}
    for budget in budgets:
        first = by_name.get(budget.name)
        if first is None:
            by_name[budget.name] = budget
            continue
        limits = dict(first.limits)
        for limit, value in budget.limits.items():
            limits[limit] = min(value, limits.get(limit, INF))
        by_name[budget.name] = client.budget(budget.name, limits, first.window, outage)
    return list(by_name.values())


class SharedStore:
    """The in-memory store for this process's scopes, plus the shared budgets a call charges:
    the process-wide one ``autolog()`` names, and those of the open sessions (one per tenant,
    say). Same contract as ``MemoryStore``; local scopes are checked first, so a call refused
    locally never costs a round trip; ``reservation.lease`` is the tuple of its leases."""

    def __init__(self, local, client: SharedClient, budget: SharedBudget | None, outage: str = "fail_closed") -> None:
        self.local = local
        self.client = client
        self.budget = budget
        self.outage = outage
        self._solo: tuple[SharedBudget, ...] = (budget,) if budget is not None else ()
        self._lock = local._lock

    def budgets(self, charges) -> tuple[SharedBudget, ...] | list[SharedBudget]:
        """The shared budgets a call with these charges is held in, outermost first."""
        budgets: tuple[SharedBudget, ...] | list[SharedBudget] = self._solo
        for scope, _ in charges:
            spec = scope.shared
            if spec is None:
                continue
            budget = scope.shared_budget
            if budget is None or budget.client is not self.client or budget.outage != self.outage:
                budget = scope.shared_budget = self.client.budget(spec.name, spec.limits, spec.window, self.outage)
            budgets = [*budgets, budget]
        if len(budgets) > 1 and len({budget.name for budget in budgets}) < len(budgets):
            budgets = _merged(self.client, list(budgets), self.outage)
        return budgets

    remote = True  # reserves wait for the store: async calls await them off the event loop

    def _reserve_here(self, reservation, enforce):
        """The local scopes first: (their refusal, the shared budgets still to ask: none when the
        local answer decides). runguard's own failure after the local hold releases it: the
        caller goes unguarded, holding nothing."""
        reservation.lease = None
        refusal = self.local.reserve(reservation, enforce)
        if refusal is not None and enforce:
            return refusal, None
        try:
            return refusal, self.budgets(reservation.charges) or None
        except Exception:
            self.local.release(reservation)
            raise

    def reserve(self, reservation, enforce=True):
        refusal, budgets = self._reserve_here(reservation, enforce)
        return refusal if budgets is None else self._reserve_shared(reservation, enforce, refusal, budgets)

    async def areserve(self, reservation, enforce=True):
        """:meth:`reserve` for an async call: the store's round trip runs on an I/O thread, so the
        event loop serves other tasks meanwhile. A task cancelled while it waits holds nothing."""
        refusal, budgets = self._reserve_here(reservation, enforce)
        if budgets is None:
            return refusal
        try:
            return await _off_loop(
                self._reserve_shared,
                (reservation, enforce, refusal, budgets),
                lambda done: self._reserve_cancelled(reservation, done),
            )
        except Exception:
            self.release(reservation)
            raise

    def _reserve_cancelled(self, reservation, done) -> None:
        """A reserve whose task was cancelled: nothing is sent, so whatever it holds goes back."""
        try:
            if done.cancelled():  # it never ran: only the local hold
                self.local.release(reservation)
            else:  # what it holds (a refusal released it already: settled, a no-op)
                self.release(reservation)
        except Exception as error:
            log_once(
                ("cancelled-reserve", type(error).__name__),
                "runguard: could not release a cancelled call (%s)",
                type(error).__name__,
            )

    def _reserve_shared(self, reservation, enforce, refusal, budgets):
        leases: list[Lease] = []
        for budget in budgets:
            try:
                shared, lease = budget.reserve(reservation.forecast, enforce)
            except Exception as error:  # runguard's own failure here is an outage too: never an admit
                shared, lease = budget.outage_refusal(error)
            if lease is not None:
                leases.append(lease)
            if shared is not None:
                if enforce:
                    for held in leases:
                        held.budget.release(held)
                    self.local.release(reservation)
                    return shared
                refusal = refusal or shared
        reservation.lease = tuple(leases)
        return refusal

    def _take_leases(self, reservation):
        with self._lock:
            if reservation.settled:
                return None, False
            leases = getattr(reservation, "lease", None)
            reservation.lease = None
            return leases, True

    def settle(self, reservation, actual, ok=True):
        leases, live = self._take_leases(reservation)
        if not live:
            return ()
        trips = self.local.settle(reservation, actual, ok)
        if leases:
            where = RUNTIME.events.run_info()  # a shared trip is recorded by the writer, on this thread's run
            for lease in leases:
                lease.budget.settle(lease, actual, where)
        return trips

    def release(self, reservation):
        leases, live = self._take_leases(reservation)
        if not live:
            return
        self.local.release(reservation)
        for lease in leases or ():
            lease.budget.release(lease)

    def _retry_here(self, reservation, seconds, enforce):
        """The local scopes first: (their refusal, the leases whose budgets are still to ask:
        none when the local answer decides)."""
        refusal = self.local.retry(reservation, seconds, enforce)
        if refusal is not None and enforce:
            return refusal, None
        return refusal, getattr(reservation, "lease", None) or None

    def retry(self, reservation, seconds, enforce=True):
        refusal, leases = self._retry_here(reservation, seconds, enforce)
        return refusal if leases is None else self._retry_shared(reservation, seconds, enforce, refusal, leases)

    async def aretry(self, reservation, seconds, enforce=True):
        """:meth:`retry` for an async call (off the event loop, like :meth:`areserve`)."""
        refusal, leases = self._retry_here(reservation, seconds, enforce)
        if leases is None:
            return refusal
        return await _off_loop(
            self._retry_shared,
            (reservation, seconds, enforce, refusal, leases),
            lambda done: self._retry_cancelled(reservation, leases, enforce, done),
        )

    def _retry_cancelled(self, reservation, leases, enforce, done) -> None:
        """A retry whose task was cancelled is not sent: the request it counted is taken back."""
        try:
            if done.cancelled():
                self.local.unretry(reservation)
            elif done.exception() is None and (done.result() is None or not enforce):
                self.local.unretry(reservation)
                for lease in leases:
                    lease.budget.unretry(lease)
        except Exception as error:
            log_once(
                ("cancelled-retry", type(error).__name__),
                "runguard: could not take back a cancelled retry (%s)",
                type(error).__name__,
            )

    def _retry_shared(self, reservation, seconds, enforce, refusal, leases):
        admitted: list[Lease] = []
        for lease in leases:
            shared = lease.budget.retry(lease, seconds, enforce)
            if shared is not None and enforce:
                self.local.unretry(reservation)  # counted, but not sent after all
                for counted in admitted:
                    counted.budget.unretry(counted)
                return shared
            admitted.append(lease)
            refusal = refusal or shared
        return refusal

    def throttled(self, reservation, limits, retry_after=None):
        return self.local.throttled(reservation, limits, retry_after)

    def reset(self, scope):
        self.local.reset(scope)

    def roll(self, scope, now, window_end):
        self.local.roll(scope, now, window_end)

    def trip(self, scope, trip):
        return self.local.trip(scope, trip)

    def snapshot(self, scope):
        return self.local.snapshot(scope)


_IO: list = [None, 0]  # the I/O threads async calls reserve through, and the process they belong to
IO_THREADS = 2  # one connection to the store each; a reserve is one short round trip


def _io_pool() -> concurrent.futures.ThreadPoolExecutor:
    """This process's store I/O threads (a forked child makes its own)."""
    pool, pid = _IO
    if pool is None or pid != _PID[0]:
        with _CLIENTS_LOCK:
            pool, pid = _IO
            if pool is None or pid != _PID[0]:
                pool = concurrent.futures.ThreadPoolExecutor(IO_THREADS, thread_name_prefix="runguard-store-io")
                _IO[:] = [pool, _PID[0]]
    return pool


async def _off_loop(work: Any, args: tuple, undo: Any) -> Any:
    """Await ``work(*args)`` run on the store's I/O threads: the event loop serves other tasks
    meanwhile. A task cancelled while it waits has ``undo(done)`` called once the work ends (at
    once if it never started). Not asyncio's loop (trio), or the interpreter exiting (no new
    threads): ``work`` runs here."""
    try:
        loop = asyncio.get_running_loop()
        future = _io_pool().submit(work, *args)
    except RuntimeError:
        return work(*args)
    try:
        return await asyncio.wrap_future(future, loop=loop)
    except asyncio.CancelledError:
        future.add_done_callback(undo)
        raise


def use_shared(settings: dict | None) -> None:
    """Install the store the resolved settings name: shared (a Redis URL) or in-memory only."""
    previous = getattr(RUNTIME.store, "client", None)
    store = None if settings is None else settings["store"].value
    if store is None or store == "memory":
        RUNTIME.store = RUNTIME.local
        client = None
    else:
        assert settings is not None
        client = shared_client(store, settings["shared_lease_s"].value)
        outage = settings["store_outage"].value
        RUNTIME.store = SharedStore(RUNTIME.local, client, budget_from(client, settings), outage)
    if previous is not None and previous is not client:
        drop_client(previous)


def budget_from(client: SharedClient, settings: dict) -> SharedBudget | None:
    """The process-wide shared budget the resolved settings name, or None."""
    name = settings["shared_budget"].value
    if name is None:
        return None
    limits = {limit: settings[limit].value for limit in SHARED_LIMITS}
    return client.budget(name, limits, settings["shared_window"].value, settings["store_outage"].value)


class SharedSnapshot(CounterView):
    """What ``runguard.current_shared()`` returns: the shared budget's current window."""

    __slots__ = ("in_flight", "limits", "scope", "tripped", "window", "window_start")
    scope: str
    in_flight: int
    limits: dict[str, Any]
    tripped: RunGuardTripped | None
    window: int | None
    window_start: Any

    def __init__(self, budget: SharedBudget, window_known: bool = True) -> None:
        state = budget.snapshot(window_known)
        self.in_flight = state.in_flight  # admitted, not yet settled
        self.scope = budget.scope.name
        self._show(state.used)
        # this process's own limits for the budget it configures; else what its processes enforce
        self.limits = dict(budget.limits) if window_known else state.limits
        self.window = (budget.window or None) if window_known else state.window
        self.tripped = None if state.trip is None else RunGuardTripped.from_trip(state.trip)
        self.window_start = state.window_start

    def __repr__(self) -> str:
        return (
            f"SharedSnapshot(scope={self.scope!r}, calls={self.calls}, cost_usd={self.cost_usd:.6g}, "
            f"tripped={self.tripped!r})"
        )
