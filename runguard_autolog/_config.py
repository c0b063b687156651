"""Limits: one table of keywords drives defaults, ``RUNGUARD_*`` variables and validation.

Precedence: explicit keyword > environment variable > built-in default.
``None`` means "not given here"; ``math.inf`` or the string ``"none"``/``"off"``
lifts a limit. A malformed value is a :class:`RunGuardConfigError` naming the
keyword or variable and the value.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from ._errors import RunGuardConfigError

INF = math.inf

# name -> (kind, default). kinds: "count" int >= 0, "count1" int >= 1, "count2" int >= 2,
# "bytes" int >= 0 (units: 10MiB, 512KB), "amount" float >= 0, "seconds" float >= 0 (units:
# 30s, 5m, 2h, 1d, 250ms), "fraction" float in (0, 1].
LIMITS: dict[str, tuple[str, float]] = {
    "max_calls": ("count", 50),
    "max_input_tokens": ("count", 500_000),
    "max_output_tokens": ("count", 100_000),
    "max_total_tokens": ("count", INF),
    "max_cost_usd": ("amount", INF),
    "max_requests": ("count", INF),
    "max_consecutive_429s": ("count1", 5),
    "max_request_latency_s": ("seconds", INF),
    "max_artifact_writes": ("count", 20),
    "max_artifact_bytes": ("bytes", 10 * 1024 * 1024),
    "max_eval_llm_calls": ("count", 500),
    "loop_repeats": ("count2", 3),
    "loop_identical_requests": ("count2", INF),
    "max_context_fraction": ("fraction", 0.95),
}
# limits of a shared budget (see _shared): the counters, each prefixed ``shared_``; none by default
SHARED_LIMITS: dict[str, tuple[str, float]] = {
    "shared_" + name: (LIMITS[name][0], INF)
    for name in (
        "max_calls",
        "max_requests",
        "max_input_tokens",
        "max_output_tokens",
        "max_total_tokens",
        "max_cost_usd",
        "max_request_latency_s",
    )
}
# fixed windows of a shared budget, in seconds (a whole number of seconds is accepted too)
WINDOWS = {"minute": 60, "hour": 3600, "day": 86400}
MAX_WINDOW_S = 366 * 86400  # a year: a longer window is no window
STORE_OUTAGE_CHOICES = ("fail_closed", "fail_open")
DEFAULT_LEASE_S = 30.0
_BUDGET_NAME = re.compile(r"[A-Za-z0-9._:/@+=-]{1,200}")
ON_TRIP_CHOICES = ("raise", "warn")
UNPRICED_CHOICES = ("allow", "refuse")  # a call to a model with no known price, under a cost limit
ARTIFACT_BREACH_CHOICES = ("consolidate", "raise")  # past the artifact budget: spool only, or also raise
_OFF_WORDS = ("none", "off")
_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("", "0", "false", "no", "off")


def env_name(keyword: str) -> str:
    return "RUNGUARD_" + keyword.upper()


def _bad(where: str, value: Any, why: str) -> RunGuardConfigError:
    shown = repr(value)
    if len(shown) > 60:
        shown = f"{shown[:40]}...({len(shown)} characters)"
    return RunGuardConfigError(f"runguard: {where}={shown} is not valid: {why}")


_BYTE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
}
_SECOND_UNITS = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
_WITH_UNIT = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]+)\s*")


def _with_unit(kind: str, text: str, where: str) -> float | None:
    """``10MiB``, ``30s``, ``2h`` for a byte or second limit; ``None`` when ``text`` has no unit."""
    if kind not in ("bytes", "seconds"):
        return None
    match = _WITH_UNIT.fullmatch(text)
    if match is None:
        return None
    units = _BYTE_UNITS if kind == "bytes" else _SECOND_UNITS
    unit = match.group(2).lower()
    if unit not in units:
        known = "B, KB, MB, GB, KiB, MiB, GiB" if kind == "bytes" else "ms, s, m, h, d"
        raise _bad(where, text, f"unknown unit {match.group(2)!r} (use {known})")
    return float(match.group(1)) * units[unit]


def _check_number(kind: str, number: float, where: str, raw: Any) -> float:
    try:
        return _checked(kind, number, where, raw)
    except OverflowError:
        raise _bad(where, raw, "is too large (use 'none' to lift the limit)") from None


def _checked(kind: str, number: float, where: str, raw: Any) -> float:
    if isinstance(number, int) and not isinstance(number, bool) and number.bit_length() > 64:
        raise OverflowError
    if math.isnan(number):
        raise _bad(where, raw, "not a number")
    if number == INF:
        return INF
    if math.isinf(number):
        raise _bad(where, raw, "must be a finite non-negative number (use 'none' to lift the limit)")
    if kind.startswith("count") or kind == "bytes":
        if number != int(number):
            raise _bad(where, raw, "must be a whole number")
        number = int(number)
        least = {"count": 0, "count1": 1, "count2": 2, "bytes": 0}[kind]
        if number < least:
            raise _bad(where, raw, f"must be a whole number >= {least} (or 'none')")
        return number
    if kind == "fraction":
        if not 0 < number <= 1:
            raise _bad(where, raw, "must be a fraction in (0, 1] (or 'none')")
        return float(number)
    if number < 0:
        raise _bad(where, raw, "must be a non-negative number (or 'none')")
    return float(number)


def _kind(name: str) -> str:
    return (LIMITS.get(name) or SHARED_LIMITS[name])[0]


def parse_keyword(name: str, value: Any) -> float:
    """Validate a limit given in code (``None`` is handled by the caller)."""
    kind = _kind(name)
    if isinstance(value, str):
        if value.strip().lower() in _OFF_WORDS:
            return INF
        number = _with_unit(kind, value, name)
        if number is not None:
            return _check_number(kind, number, name, value)
        raise _bad(name, value, "pass a number, math.inf or 'none'")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(name, value, "pass a number, math.inf or 'none'")
    return _check_number(kind, float(value) if isinstance(value, float) else value, name, value)


def parse_env_value(name: str, raw: str) -> float:
    """Parse the text of ``RUNGUARD_<NAME>``; '1e999', 'abc', '-3' are errors."""
    kind = _kind(name)
    where = env_name(name)
    text = raw.strip().lower()
    if text in _OFF_WORDS:
        return INF
    number: float
    try:
        number = float(text)
    except ValueError:
        with_unit = _with_unit(kind, raw.strip(), where)
        if with_unit is None:
            raise _bad(where, raw, "not a number (use 'none' or 'off' to lift the limit)") from None
        number = with_unit
    else:
        if kind.startswith("count") or kind == "bytes":
            try:
                number = int(text)  # exact, however many digits
            except ValueError:
                if math.isfinite(number) and number != int(number):
                    raise _bad(where, raw, "must be a whole number") from None
    if isinstance(number, float) and math.isinf(number):
        raise _bad(where, raw, "must be finite (use 'none' or 'off' to lift the limit)")
    return _check_number(kind, number, where, raw)


def parse_on_trip(value: Any, where: str = "on_trip") -> str | Callable[..., Any]:
    if callable(value):
        return value
    if isinstance(value, str) and value.strip().lower() in ON_TRIP_CHOICES:
        return value.strip().lower()
    raise _bad(where, value, "use 'raise', 'warn' or a callable")


def parse_unpriced(value: Any, where: str = "unpriced") -> str:
    if isinstance(value, str) and value.strip().lower() in UNPRICED_CHOICES:
        return value.strip().lower()
    raise _bad(where, value, "use 'allow' or 'refuse'")


_AGENT_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,250}")


def parse_agent(value: Any, where: str = "agent") -> str:
    """The agent's name for the trip report (run tag ``runguard.agent``): 1-250 printable characters."""
    if isinstance(value, str) and _AGENT_NAME.fullmatch(value.strip()):
        return value.strip()
    raise _bad(where, value, "use a name of 1-250 printable characters")


def parse_prices(value: Any, where: str = "prices") -> dict[str, dict[str, Any]]:
    """A JSON file of prices: ``{model: {"input_usd_per_mtok": ..., "output_usd_per_mtok": ...,
    "cached_input_usd_per_mtok": ...} | {"same_as": model}}`` (checked here; registered by autolog())."""
    if not isinstance(value, str) or not value.strip():
        raise _bad(where, value, "name a JSON file of prices")
    try:
        with open(value, encoding="utf-8") as file:
            table = json.load(file)
    except OSError as error:
        raise _bad(where, value, f"cannot be read ({type(error).__name__})") from None
    except ValueError:
        raise _bad(where, value, "is not a JSON file") from None
    fields = {"input_usd_per_mtok", "output_usd_per_mtok", "cached_input_usd_per_mtok", "same_as"}
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise _bad(where, value, 'must hold {"model": {"input_usd_per_mtok": ..., "output_usd_per_mtok": ...}}')
    for model, entry in table.items():
        unknown = set(entry) - fields
        if unknown:
            raise _bad(where, value, f"model {model!r} has unknown field(s) {', '.join(sorted(unknown))}")
    return table


def parse_artifact_breach(value: Any, where: str = "artifact_breach") -> str:
    if isinstance(value, str) and value.strip().lower() in ARTIFACT_BREACH_CHOICES:
        return value.strip().lower()
    raise _bad(where, value, "use 'consolidate' or 'raise'")


def redact(url: Any) -> str:
    """A store URL safe to print: any password replaced by ``***`` (a client object: its type).

    The credentials are whatever comes before the *last* ``@`` of the URL (a password may hold
    ``@``, ``/``, ``?`` or ``#``), so nothing of a password survives, whatever the URL form."""
    if not isinstance(url, str):
        return f"<{type(url).__module__}.{type(url).__qualname__} client>"
    scheme, sep, rest = url.partition("://")
    at = rest.rfind("@")
    if sep and at > 0 and not rest.startswith("/"):  # sqlite:////path has no credentials
        credentials, host = rest[:at], rest[at + 1 :]
        user, colon, _ = credentials.partition(":")
        if colon:
            credentials = f"{user}:***"
        elif any(mark in credentials for mark in "/?#&="):
            credentials = "***"
        url = f"{scheme}://{credentials}@{host}"
    # redis-py also takes ?password=... (and a TLS key path may carry one)
    return re.sub(
        r"([?&][^=&]*(?:password|passwd|pwd|secret|token|key)[^=&]*=)[^&]*", r"\1***", url, flags=re.IGNORECASE
    )


STORE_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster", "redis+sentinel", "rediss+sentinel")


class StoreAddress(NamedTuple):
    """Where a shared store lives, as a store URL gives it (parsed without importing redis)."""

    kind: str  # "node" (redis://, rediss://, unix://), "cluster" or "sentinel"
    url: str  # "node": the URL for redis-py, without runguard's own parameters
    hosts: tuple[tuple[str, int], ...]  # cluster: any reachable nodes; sentinel: the sentinels
    username: str | None
    password: str | None
    service: str | None  # sentinel: the primary's service name
    db: int
    tls: bool
    min_replicas: int  # replicas a write must reach before it counts (0: the primary's word)
    timeouts: dict[str, float]  # cluster, sentinel: socket_timeout / socket_connect_timeout from the URL


def store_address(text: str, where: str = "store") -> StoreAddress:
    """Parse a store URL; a malformed one is an error naming ``where`` (never echoing a password).

    ``redis://``/``rediss://``/``unix://`` (one node), ``redis+cluster://h1:p1,h2:p2`` (Redis
    Cluster), ``redis+sentinel://h1:p1,h2:p2/<service>/<db>`` (a Sentinel-managed primary).
    ``?min_replicas=N`` (any of them): a reservation or settle counts only once N replicas
    have it (Redis ``WAIT``), so a failover cannot lose it."""
    shown = redact(text)

    def bad(why: str) -> RunGuardConfigError:
        return RunGuardConfigError(f"runguard: {where}={shown!r} is not valid: {why}")

    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in STORE_SCHEMES:
        return_error = "use 'memory' or a redis://, rediss://, unix://, redis+cluster:// or redis+sentinel:// URL"
        raise bad(return_error if sep else "not a URL")
    credentials = ""
    if "+" in scheme and "@" in rest:  # a password may hold '?', '/' or '@': the last '@' ends it
        credentials, _, rest = rest.rpartition("@")
    rest, _, query = rest.partition("?")
    options = [pair.partition("=") for pair in query.split("&") if pair]
    replicas = [value for name, _, value in options if name == "min_replicas"]
    if replicas and not (replicas[-1].isdigit() and int(replicas[-1]) < 100):
        raise bad("min_replicas must be a whole number of replicas (0-99)")
    min_replicas = int(replicas[-1]) if replicas else 0
    kept = "&".join(f"{name}={value}" if eq else name for name, eq, value in options if name != "min_replicas")
    timeouts: dict[str, float] = {}
    if "+" in scheme:  # redis-py reads a node URL's own options; these two are read here
        for name, _, value in options:
            if name == "min_replicas":
                continue
            if name not in ("socket_timeout", "socket_connect_timeout"):
                raise bad(f"unknown option {name!r} (use socket_timeout, socket_connect_timeout or min_replicas)")
            try:
                timeouts[name] = float(value)
            except ValueError:
                raise bad(f"{name} must be a number of seconds") from None
            if not 0 < timeouts[name] < 3600:
                raise bad(f"{name} must be a number of seconds") from None
    if "+" not in scheme:
        url = f"{scheme}://{rest}" + (f"?{kept}" if kept else "")
        try:
            parts = urlsplit(url)
            port = parts.port  # raises ValueError when malformed
        except ValueError:
            raise bad("not a URL") from None
        if scheme == "unix":
            if not parts.path:
                raise bad("a unix:// URL needs a socket path")
        else:
            if not parts.hostname:
                raise bad("no host")
            database = parts.path.strip("/")
            if database and not database.isdigit():
                raise bad("the database must be a number")
            if port is not None and not 0 < port < 65536:
                raise bad("bad port")
        return StoreAddress("node", url, (), None, None, None, 0, scheme == "rediss", min_replicas, {})
    host_list, _, path = rest.partition("/")
    username = password = None
    if credentials:
        user, colon, secret = credentials.partition(":")
        username, password = (user or None), (secret if colon else None)
    hosts = []
    for host_port in host_list.split(","):
        host, colon, port_text = host_port.strip().rpartition(":")
        if not colon or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise bad(f"each host must be host:port, got {host_port.strip()!r}")
        hosts.append((host.strip("[]"), int(port_text)))
    kind = scheme.split("+")[1]
    segments = [segment for segment in path.split("/") if segment]
    service = None
    if kind == "sentinel":
        if not segments:
            raise bad("a redis+sentinel:// URL names the primary: redis+sentinel://h1:p1,h2:p2/<service>/<db>")
        service, segments = segments[0], segments[1:]
    if len(segments) > 1 or (segments and not segments[0].isdigit()):
        raise bad("the database must be a number")
    db = int(segments[0]) if segments else 0
    if kind == "cluster" and db:
        raise bad("Redis Cluster has only database 0")
    return StoreAddress(
        kind, text, tuple(hosts), username, password, service, db, scheme.startswith("rediss"), min_replicas, timeouts
    )


def parse_store(value: Any, where: str = "store") -> Any:
    """``"memory"``, a store URL (see :func:`store_address`), or a redis-py client (``Redis``,
    ``RedisCluster``, or ``Sentinel.master_for(...)``) built by the application."""
    if hasattr(value, "connection_pool") or hasattr(value, "nodes_manager"):
        return value  # a redis-py client: its own configuration
    if not isinstance(value, str) or not value.strip():
        raise _bad(where, value, "use 'memory', a Redis URL such as redis://127.0.0.1:6379/0, or a redis-py client")
    text = value.strip()
    if text.lower() == "memory":
        return "memory"
    store_address(text, where)
    return text


def parse_budget_name(value: Any, where: str = "shared_budget") -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and _BUDGET_NAME.fullmatch(value.strip()):
        return value.strip()
    raise _bad(where, value, "use 1-200 letters, digits or . _ : / @ + = - (no spaces or braces)")


def parse_window(value: Any, where: str = "shared_window") -> int | None:
    """``None``/``"none"``, ``"minute"``, ``"hour"``, ``"day"``, or a whole number of seconds."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _OFF_WORDS:
            return None
        if text in WINDOWS:
            return WINDOWS[text]
        if text.isascii() and text.isdigit() and 0 < int(text) <= MAX_WINDOW_S:
            return int(text)
    elif isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_WINDOW_S:
        return value
    raise _bad(where, value, f"use 'minute', 'hour', 'day', a whole number of seconds up to {MAX_WINDOW_S}, or 'none'")


def parse_outage(value: Any, where: str = "store_outage") -> str:
    if isinstance(value, str) and value.strip().lower() in STORE_OUTAGE_CHOICES:
        return value.strip().lower()
    raise _bad(where, value, "use 'fail_closed' or 'fail_open'")


def parse_lease(value: Any, where: str = "shared_lease_s") -> float:
    try:
        with_unit = _with_unit("seconds", value, where) if isinstance(value, str) else None
        number = float(value) if with_unit is None else with_unit
    except (TypeError, ValueError):
        raise _bad(where, value, "must be a number of seconds") from None
    if isinstance(value, bool) or not 1 <= number <= 86400:
        raise _bad(where, value, "must be between 1 and 86400 seconds")
    return number


def env_flag(variable: str, environ: Mapping[str, str] | None = None) -> bool:
    raw = (os.environ if environ is None else environ).get(variable)
    if raw is None:
        return False
    text = raw.strip().lower()
    if text in _TRUE_WORDS:
        return True
    if text in _FALSE_WORDS:
        return False
    raise _bad(variable, raw, "use 1/true/yes/on or 0/false/no/off")


@dataclass(frozen=True)
class Setting:
    value: Any
    source: str  # "keyword" | "environment" | "default"


# variables that are flags rather than settings with a keyword
FLAGS = ("RUNGUARD_AUTOLOG", "RUNGUARD_DISABLE")
# what ``disabled_integrations`` (RUNGUARD_DISABLED_INTEGRATIONS) may name, as OpenTelemetry's
# OTEL_PYTHON_DISABLED_INSTRUMENTATIONS does: the integrations runguard patches
INTEGRATION_NAMES = (
    "openai",
    "anthropic",
    "litellm",
    "langchain",
    "deployments",
    "evaluation",
    "artifacts",
    "runs",
    "serving",
)


def parse_integrations(value: Any, where: str = "disabled_integrations") -> frozenset[str]:
    """A comma-separated text or a list of integration names; an unknown name is an error."""
    if isinstance(value, str):
        names = [part.strip().lower() for part in value.split(",")]
    elif isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(part, str) for part in value):
        names = [part.strip().lower() for part in value]
    else:
        raise _bad(where, value, f"use a list of integration names ({', '.join(INTEGRATION_NAMES)})")
    if names in (["none"], ["off"]):  # as runguard config shows an empty list
        names = []
    for name in names:
        if name and name not in INTEGRATION_NAMES:
            close = difflib.get_close_matches(name, INTEGRATION_NAMES, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise _bad(where, value, f"{name!r} is not an integration; {hint}use {', '.join(INTEGRATION_NAMES)}")
    return frozenset(name for name in names if name)


def known_variables() -> list[str]:
    """Every ``RUNGUARD_*`` name runguard reads: one per setting ``runguard config`` shows, and the flags."""
    return [*(env_name(name) for name in SHOWN_SETTINGS), *FLAGS]


def check_variables(environ: Mapping[str, str]) -> None:
    """A ``RUNGUARD_*`` name runguard does not know is a typo until proven otherwise: the
    program must not run with the defaults it did not mean."""
    known = known_variables()
    for name in environ:
        if name.startswith("RUNGUARD_") and name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else f"; runguard reads: {', '.join(known)}"
            raise RunGuardConfigError(f"runguard: {name} is not a runguard variable{hint}")


def resolve(keywords: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> dict[str, Setting]:
    """Every limit plus ``on_trip`` with where its value came from."""
    environ = os.environ if environ is None else environ
    check_variables(environ)
    settings: dict[str, Setting] = {}
    for name, (_, default) in LIMITS.items():
        _pick(keywords, environ, settings, name, _parse_limit, default)
    _pick(keywords, environ, settings, "on_trip", parse_on_trip, "raise")
    _pick(keywords, environ, settings, "artifact_breach", parse_artifact_breach, "consolidate")
    _pick(keywords, environ, settings, "disabled_integrations", parse_integrations, frozenset())
    _pick(keywords, environ, settings, "unpriced", parse_unpriced, "allow")
    _pick(keywords, environ, settings, "window", parse_window, None)
    _pick(keywords, environ, settings, "prices", parse_prices, None)
    _pick(keywords, environ, settings, "agent", parse_agent, None)
    _resolve_shared(keywords, environ, settings)
    return settings


def _parse_limit(value: Any, where: str) -> float:
    """A limit from a keyword (``where`` is its name) or from its variable's text."""
    if where.startswith("RUNGUARD_"):
        return parse_env_value(where[len("RUNGUARD_") :].lower(), value)
    return parse_keyword(where, value)


def _pick(keywords, environ, settings, name: str, parse: Callable[[Any, str], Any], default: Any) -> None:
    """keyword > RUNGUARD_<NAME> > default, validated by ``parse(value, where)``."""
    if keywords.get(name) is not None:
        settings[name] = Setting(parse(keywords[name], name), "keyword")
    elif env_name(name) in environ:
        settings[name] = Setting(parse(environ[env_name(name)], env_name(name)), "environment")
    else:
        settings[name] = Setting(default, "default")


def _resolve_shared(keywords, environ, settings: dict[str, Setting]) -> None:
    """The shared-budget settings (store, budget name, its limits, window, outage policy)."""
    _pick(keywords, environ, settings, "store", parse_store, "memory")
    _pick(keywords, environ, settings, "shared_budget", parse_budget_name, None)
    for name, (_, default) in SHARED_LIMITS.items():
        _pick(keywords, environ, settings, name, _parse_limit, default)
    _pick(keywords, environ, settings, "shared_window", parse_window, None)
    _pick(keywords, environ, settings, "store_outage", parse_outage, "fail_closed")
    _pick(keywords, environ, settings, "shared_lease_s", parse_lease, DEFAULT_LEASE_S)
    budget = settings["shared_budget"]
    if budget.value is None:
        given = [name for name in SHARED_LIMITS if settings[name].source != "default"]
        if given:
            where = given[0] if settings[given[0]].source == "keyword" else env_name(given[0])
            raise RunGuardConfigError(
                f"runguard: {where} is set but no shared budget is named: set shared_budget= "
                "(RUNGUARD_SHARED_BUDGET) to the name every process of the job uses"
            )
    elif settings["store"].value == "memory":
        where = "shared_budget" if budget.source == "keyword" else "RUNGUARD_SHARED_BUDGET"
        raise RunGuardConfigError(
            f"runguard: {where}={budget.value!r} needs a shared store: set store='redis://host:6379/0' "
            "(RUNGUARD_STORE); the in-memory store cannot be seen by other processes"
        )


class SharedSpec(NamedTuple):
    """A shared budget a session charges: its name, its own ``shared_max_*`` limits, its window."""

    name: str
    limits: dict[str, float]
    window: int | None


def session_shared(keywords: dict[str, Any]) -> SharedSpec | None:
    """Take a session's ``shared_budget``, ``shared_window`` and ``shared_max_*`` keywords out of
    ``keywords`` and validate them: the budget this session charges beside the process-wide one."""
    name = parse_budget_name(keywords.pop("shared_budget", None))
    window = parse_window(keywords.pop("shared_window", None))
    limits = {
        limit: parse_keyword(limit, keywords.pop(limit))
        for limit in SHARED_LIMITS
        if limit in keywords and keywords[limit] is not None
    }
    for limit in SHARED_LIMITS:
        keywords.pop(limit, None)
    if name is None:
        if limits or window is not None:
            given = next(iter(limits), "shared_window")
            raise RunGuardConfigError(
                f"runguard: {given} is set but no shared budget is named: pass shared_budget='<name>'"
            )
        return None
    return SharedSpec(name, {limit: limits.get(limit, INF) for limit in SHARED_LIMITS}, window)


def explicit_limits(keywords: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the limits a session was given in code (its own, enforced even when outer)."""
    unknown = set(keywords) - set(LIMITS) - {"on_trip"}
    if unknown:
        raise RunGuardConfigError(f"runguard: unknown limit keyword(s): {', '.join(sorted(unknown))}")
    limits: dict[str, Any] = {}
    for name, value in keywords.items():
        if value is None:
            continue
        limits[name] = parse_on_trip(value) if name == "on_trip" else parse_keyword(name, value)
    return limits


SHARED_SETTINGS = ("store", "shared_budget", *SHARED_LIMITS, "shared_window", "store_outage", "shared_lease_s")


# what ``runguard config`` shows, in order
SHOWN_SETTINGS = (
    *LIMITS,
    "on_trip",
    "artifact_breach",
    "disabled_integrations",
    "unpriced",
    "prices",
    "window",
    "agent",
    *SHARED_SETTINGS,
)


# what each setting means: the one table the configuration reference (docs) is generated from
MEANINGS: dict[str, str] = {
    "max_calls": "LLM calls (chat, completions, responses, embeddings, Anthropic messages)",
    "max_input_tokens": "prompt tokens",
    "max_output_tokens": "completion tokens",
    "max_total_tokens": "input + output tokens",
    "max_cost_usd": "USD, priced by genai-prices or `runguard.register_price()`",
    "max_requests": "HTTP attempts to LLM endpoints, SDK retries included",
    "max_consecutive_429s": "429 (and Anthropic's 529) responses in a row; any success resets it",
    "max_request_latency_s": "seconds spent inside LLM HTTP attempts",
    "max_artifact_writes": "artifact files written per MLflow run",
    "max_artifact_bytes": "artifact bytes written per MLflow run (`10MiB`, `512KB`)",
    "max_eval_llm_calls": "judge + agent calls of one evaluation",
    "loop_repeats": "the same tool call seen N times in the recent window",
    "loop_identical_requests": "the identical request (model + messages) seen N times",
    "max_context_fraction": "forecast prompt share of the model's context window",
    "on_trip": "`raise`, `warn` (shadow mode: record, send anyway) or a callable",
    "artifact_breach": "past the artifact budget: `consolidate`, or `raise` too",
    "disabled_integrations": "integrations left unpatched, comma-separated: " + ", ".join(INTEGRATION_NAMES),
    "unpriced": "a call to a model with no known price while a cost limit is set: `allow` or `refuse`",
    "prices": "a JSON file of prices: `{model: {input_usd_per_mtok, output_usd_per_mtok, ...} | {same_as}}`",
    "window": "fixed windows of the process and run scopes: `minute`, `hour`, `day` or seconds",
    "agent": "the agent's name: the `runguard.agent` tag on its runs, grouped by in the report",
    "store": "where shared budgets live: `memory`, a Redis URL or a redis-py client",
    "shared_budget": "the name of the budget every process of a job charges",
    **{
        name: f"the shared budget's {MEANINGS_OF_SHARED}"
        for name, MEANINGS_OF_SHARED in (
            ("shared_max_calls", "calls"),
            ("shared_max_requests", "HTTP attempts"),
            ("shared_max_input_tokens", "prompt tokens"),
            ("shared_max_output_tokens", "completion tokens"),
            ("shared_max_total_tokens", "input + output tokens"),
            ("shared_max_cost_usd", "USD"),
            ("shared_max_request_latency_s", "seconds inside LLM HTTP attempts"),
        )
    },
    "shared_window": "fixed windows of the shared budget: `minute`, `hour`, `day` or seconds",
    "store_outage": "what a call does while the store cannot be reached: `fail_closed` or `fail_open`",
    "shared_lease_s": "seconds a dead process's reservations can block the budget",
}
KEYWORDLESS = frozenset({"prices"})  # set by its environment variable only


def reference() -> list[dict[str, str]]:
    """The configuration reference: each setting's keyword, variable, default and meaning."""
    defaults = resolve({}, {})
    rows = []
    for name in SHOWN_SETTINGS:
        value = shown_value(name, defaults[name].value)
        if isinstance(value, list):
            value = ", ".join(value) or None
        default = "none" if value is None else f"{value:,}" if isinstance(value, int) else str(value)
        rows.append(
            {
                "keyword": "" if name in KEYWORDLESS else name,
                "variable": env_name(name),
                "default": default,
                "meaning": MEANINGS[name],
            }
        )
    return rows


def shown_value(name: str, value: Any) -> Any:
    """A setting's value as ``runguard config`` shows it (JSON-safe; no password)."""
    if name == "prices" and isinstance(value, dict):
        return sorted(value)
    if name == "store":
        return redact(value)
    if value is None or value == float("inf"):
        return None
    if callable(value):
        return getattr(value, "__qualname__", repr(value))
    if isinstance(value, frozenset):
        return sorted(value)
    return value


def describe_json(settings: Mapping[str, Setting], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What ``runguard config --json`` prints: each setting's value (``null``: none) and source."""
    environ = os.environ if environ is None else environ
    return {
        "settings": {
            name: {"value": shown_value(name, settings[name].value), "source": settings[name].source}
            for name in SHOWN_SETTINGS
        },
        "autolog": env_flag("RUNGUARD_AUTOLOG", environ),
        "disable": env_flag("RUNGUARD_DISABLE", environ),
    }


def describe(settings: Mapping[str, Setting], environ: Mapping[str, str] | None = None) -> str:
    """The effective limits and where each came from, as a table."""
    environ = os.environ if environ is None else environ
    rows = [("limit", "value", "source")]
    for name in SHOWN_SETTINGS:
        setting = settings[name]
        value = setting.value
        if name == "store":
            shown = redact(value)
        elif value is None or value == float("inf"):
            shown = "none"
        elif callable(value):
            shown = getattr(value, "__qualname__", repr(value))
        elif isinstance(value, frozenset):
            shown = ",".join(sorted(value)) or "none"
        elif isinstance(value, dict):  # prices: the models the file prices
            shown = ",".join(sorted(value))
        else:
            shown = str(value)
        source = setting.source
        if source == "environment":
            raw = environ.get(env_name(name), "")
            source = f"environment ({env_name(name)}={redact(raw) if name == 'store' else raw})"
        rows.append((name, shown, source))
    width = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [f"{a:<{width[0]}}  {b:<{width[1]}}  {c}" for a, b, c in rows]
    autolog = "on" if env_flag("RUNGUARD_AUTOLOG", environ) else "off"  # a bad value raises
    disabled = "on" if env_flag("RUNGUARD_DISABLE", environ) else "off"
    lines += ["", f"RUNGUARD_AUTOLOG (enable at start-up): {autolog}", f"RUNGUARD_DISABLE (kill switch): {disabled}"]
    return "\n".join(lines)
