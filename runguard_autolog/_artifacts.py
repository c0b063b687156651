"""Artifact logging storms: a per-run write and byte budget; past it, outputs are spooled
and written as ONE consolidated JSON artifact (plus one archive for binary files).

Agents that call ``mlflow.log_text`` / ``log_artifact`` once per tool output write
thousands of objects per run (each a PUT on S3/GCS, each an object to LIST later).
``mlflow.log_text``, ``log_dict``, ``log_table``, ``log_image``, ``log_artifact``,
``log_artifacts`` and their ``MlflowClient`` methods all meet in
``MlflowClient.log_artifact`` / ``log_artifacts`` (the text-like ones write a temp file
and log it), so those two are patched: each file is one write. A directory (how MLflow
logs a model into a run) counts, but is always written as it is: its layout matters.

Within the budget (``max_artifact_writes``, ``max_artifact_bytes``) a file is written as
usual. Past it, the file is copied into the run's spool directory on local disk (memory
holds only a small record per file) and nothing is sent. The spool becomes
``runguard/consolidated_final.json`` when the run ends (normally, by an exception inside
``with mlflow.start_run()``, by ``mlflow.end_run()``, or at interpreter exit), holding in
order every output's original artifact path and its text in full; files that are not
UTF-8 text are listed by path, size and sha256, their bytes packed in
``runguard/consolidated_final.zip``. With ``artifact_breach="raise"`` the breach also
raises ``RunGuardTripped``, after writing what is spooled as ``consolidated_at_trip``.
If writing the consolidated files fails, the spool stays on disk and its path is logged.
"""

from __future__ import annotations

import atexit
import codecs
import contextvars
import hashlib
import json
import os
import posixpath
import shutil
import signal
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass, field
from typing import Any

from . import _recording
from ._counters import fmt as _fmt
from ._errors import RunGuardTripped
from ._runtime import RUNTIME, internal_error, log_once, logger

TAG_TRIPPED = "runguard.artifact_tripped"
METRIC_AVOIDED = "runguard.artifact_writes_avoided"
METRIC_BYTES = "runguard.artifact_bytes_consolidated"
FOLDER = "runguard"
_CHUNK = 1 << 20

# set while runguard itself writes (the consolidated files), and while a patched call runs
# (MLflow's log_artifacts may call log_artifact): such writes pass straight through
_WRITING: contextvars.ContextVar[bool] = contextvars.ContextVar("runguard_artifact_writing", default=False)


@dataclass
class _Entry:
    order: int
    artifact_path: str
    size: int
    sha256: str
    text: bool
    spooled: str  # the copy in the spool directory


@dataclass
class _Ledger:
    """One run's artifact writes."""

    run_id: str
    writes: int = 0
    bytes: int = 0
    avoided: int = 0
    consolidated_bytes: int = 0
    tripped: str | None = None
    limit: str | None = None  # the budget that tripped: max_artifact_writes or max_artifact_bytes
    spool: str | None = None
    entries: list = field(default_factory=list)
    order: int = 0


_ledgers: dict[str, _Ledger] = {}
RUNTIME.on_reset(_ledgers.clear)
_lock = threading.Lock()
RUNTIME.fork_safe(sys.modules[__name__], "_lock", threading.Lock)


def _limits() -> tuple[float, float, str]:
    settings = RUNTIME.settings
    return (
        settings["max_artifact_writes"].value,
        settings["max_artifact_bytes"].value,
        settings["artifact_breach"].value,
    )


def _files(local_path: str, artifact_path: str | None) -> list[tuple[str, str]]:
    """(local file, run-relative artifact path) of each file a log_artifact(s) call writes."""
    base = artifact_path or ""
    if os.path.isdir(local_path):
        found = []
        for folder, _, names in sorted(os.walk(local_path)):
            for name in sorted(names):
                full = os.path.join(folder, name)
                relative = os.path.relpath(full, local_path).replace(os.sep, "/")
                found.append((full, posixpath.join(base, relative) if base else relative))
        return found
    name = os.path.basename(local_path)
    return [(local_path, posixpath.join(base, name) if base else name)]


def _ledger(run_id: str) -> _Ledger:
    """The run's ledger, created on its first write (call under ``_lock``)."""
    ledger = _ledgers.get(run_id)
    if ledger is None:
        ledger = _ledgers[run_id] = _Ledger(run_id)
    return ledger


def _admit(run_id: str, files: list[tuple[str, str]]) -> tuple[list, list, _Ledger, str | None]:
    """Split files into those written now and those spooled; the breach reason if new."""
    max_writes, max_bytes, _ = _limits()
    sizes = [os.path.getsize(path) for path, _ in files]
    written, spooled, reason = [], [], None
    with _lock:
        ledger = _ledger(run_id)
        for (path, artifact), size in zip(files, sizes):
            ledger.order += 1  # every output of the run, written or spooled
            if ledger.tripped is None and ledger.writes + 1 <= max_writes and ledger.bytes + size <= max_bytes:
                ledger.writes += 1
                ledger.bytes += size
                written.append((path, artifact))
                continue
            if ledger.tripped is None:
                if ledger.writes + 1 > max_writes:
                    ledger.limit = "max_artifact_writes"
                    ledger.tripped = reason = (
                        f"artifact write budget reached ({ledger.writes}/{_fmt(max_writes)} "
                        "writes); further outputs are consolidated"
                    )
                else:
                    ledger.limit = "max_artifact_bytes"
                    ledger.tripped = reason = (
                        f"artifact byte budget reached ({ledger.bytes + size} > "
                        f"{_fmt(max_bytes)} bytes); further outputs are consolidated"
                    )
            spooled.append((ledger.order, path, artifact, size))
    return written, spooled, ledger, reason


def _count(run_id: str, files: list[tuple[str, str]]) -> None:
    sizes = sum(os.path.getsize(path) for path, _ in files)
    with _lock:
        ledger = _ledger(run_id)
        ledger.writes += len(files)
        ledger.bytes += sizes
        ledger.order += len(files)


def _spool(ledger: _Ledger, order: int, path: str, artifact: str, size: int) -> None:
    """Copy one output into the run's spool directory (streamed: no whole file in memory)."""
    with _lock:
        created = ledger.spool is None
        if created:
            ledger.spool = tempfile.mkdtemp(prefix=f"runguard-spool-{ledger.run_id}-")
        spool: str = ledger.spool  # type: ignore[assignment]  # set just above
    if created:  # logged now, so even a process killed before the run ends leaves a findable spool
        logger.warning(
            "runguard: run %s is past its artifact budget; its further outputs are spooled in %s until the run ends",
            ledger.run_id,
            spool,
        )
    target = os.path.join(spool, f"{order:08d}")
    digest, decoder, text = hashlib.sha256(), codecs.getincrementaldecoder("utf-8")(), True
    with open(path, "rb") as source, open(target, "wb") as copy:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            copy.write(chunk)
            if text:
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError:
                    text = False
    if text:
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            text = False
    entry = _Entry(order, artifact, size, digest.hexdigest(), text, target)
    with open(os.path.join(spool, "entries.jsonl"), "a", encoding="utf-8") as index:  # a readable spool
        index.write(json.dumps(entry.__dict__) + "\n")
    with _lock:
        ledger.entries.append(entry)
        ledger.avoided += 1
        ledger.consolidated_bytes += size


def guard_log_artifacts(wrapped, instance, args, kwargs):
    """``MlflowClient.log_artifact(run_id, local_path, artifact_path=None)`` and
    ``log_artifacts(run_id, local_dir, artifact_path=None)``: one wrapper for both."""
    if not RUNTIME.enabled or _WRITING.get():
        return wrapped(*args, **kwargs)
    try:
        named = dict(zip(("run_id", "local_path", "artifact_path"), args))
        named.update(kwargs)
        run_id = named["run_id"]
        local_path = named.get("local_path", named.get("local_dir"))
        files = _files(local_path, named.get("artifact_path"))
        unsafe = _unsafe(files)
        if os.path.isdir(local_path):  # a directory keeps its layout (it may be a model): counted, written
            _count(run_id, files)
            return _through(wrapped, args, kwargs)
        written, spooled, ledger, reason = _admit(run_id, files)
    except Exception as error:
        internal_error("artifact budget", error)
        return wrapped(*args, **kwargs)
    if spooled and unsafe is not None:  # refused past the budget exactly as MLflow refuses it within
        raise unsafe
    if not spooled:
        return _through(wrapped, args, kwargs)
    token = _WRITING.set(True)
    try:
        for path, artifact in written:  # the part of a log_artifacts call still within budget
            instance.log_artifact(run_id, path, posixpath.dirname(artifact) or None)
    finally:
        _WRITING.reset(token)
    try:
        for order, path, artifact, size in spooled:
            _spool(ledger, order, path, artifact, size)
    except Exception as error:  # cannot spool: write it after all rather than lose it
        internal_error("artifact spool", error)
        return _through(wrapped, args, kwargs)
    if reason is not None:
        _record_trip(run_id, reason)
        if _limits()[2] == "raise":
            flush_run(run_id, "at_trip")
            limit = ledger.limit or "max_artifact_writes"
            raise RunGuardTripped(
                reason,
                limit=limit,
                threshold=_limits()[0 if limit == "max_artifact_writes" else 1],
                observed=ledger.writes if limit == "max_artifact_writes" else ledger.bytes,
                scope=f"run:{run_id}",
            )
    return None


def _unsafe(files: list[tuple[str, str]]) -> Exception | None:
    """MLflow's own error for an artifact path it refuses (``..``, absolute), else ``None``."""
    from mlflow.utils.uri import validate_path_is_safe

    for _, artifact in files:
        try:
            validate_path_is_safe(artifact)
        except Exception as error:
            return error
    return None


def _through(wrapped, args, kwargs):
    token = _WRITING.set(True)
    try:
        return wrapped(*args, **kwargs)
    finally:
        _WRITING.reset(token)


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def _tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def _record_trip(run_id: str, reason: str) -> None:
    logger.warning("runguard: run %s: %s", run_id, reason)
    try:
        _recording.write_run(run_id, _tracking_uri(), {}, {TAG_TRIPPED: reason})
    except Exception as error:
        log_once(("artifact-tag", type(error).__name__), "runguard: could not tag run %s (%s)", run_id, error)


def flush_run(run_id: str, when: str = "final") -> None:
    """Write the run's spooled outputs as one consolidated JSON (+ one archive); never raises."""
    with _lock:
        ledger = _ledgers.get(run_id)
        if ledger is None or not ledger.entries:
            if when == "final" and ledger is not None:
                _ledgers.pop(run_id, None)
                if ledger.spool is not None:  # everything was written at the trip
                    shutil.rmtree(ledger.spool, ignore_errors=True)
            return
        entries, ledger.entries = ledger.entries, []
        spool = ledger.spool
        assert spool is not None  # entries are only spooled once the spool exists
    try:
        paths = _consolidate(spool, entries, when, run_id)
        token = _WRITING.set(True)
        try:
            client = _client()
            for path in paths:
                client.log_artifact(run_id, path, FOLDER)
            _recording.write_run(
                run_id, _tracking_uri(), {METRIC_AVOIDED: ledger.avoided, METRIC_BYTES: ledger.consolidated_bytes}, {}
            )
        finally:
            _WRITING.reset(token)
    except Exception as error:
        with _lock:
            ledger.entries[:0] = entries  # nothing lost: a later flush may succeed
        logger.warning(
            "runguard: could not write the consolidated artifacts of run %s (%s: %s); the outputs are kept in %s",
            run_id,
            type(error).__name__,
            error,
            spool,
        )
        return
    for entry in entries:
        _remove(entry.spooled)
    if when == "final":
        with _lock:
            _ledgers.pop(run_id, None)
        shutil.rmtree(spool, ignore_errors=True)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _consolidate(spool: str, entries: list, when: str, run_id: str) -> list[str]:
    """Build consolidated_<when>.json (and .zip for binary files) in the spool directory."""
    entries = sorted(entries, key=lambda e: e.order)
    json_path = os.path.join(spool, f"consolidated_{when}.json")
    zip_path = os.path.join(spool, f"consolidated_{when}.zip")
    binaries = [e for e in entries if not e.text]
    with open(json_path, "w", encoding="utf-8") as out:
        out.write(
            json.dumps(
                {
                    "run_id": run_id,
                    "outputs": len(entries),
                    "archive": f"{FOLDER}/consolidated_{when}.zip" if binaries else None,
                }
            )[:-1]
        )
        out.write(', "entries": [')
        for position, entry in enumerate(entries):
            head = {
                "order": entry.order,
                "artifact_path": entry.artifact_path,
                "size": entry.size,
                "sha256": entry.sha256,
                "kind": "text" if entry.text else "binary",
            }
            out.write(("," if position else "") + json.dumps(head)[:-1])
            if entry.text:
                out.write(', "text": "')
                with open(entry.spooled, encoding="utf-8") as source:
                    while chunk := source.read(_CHUNK):
                        out.write(json.dumps(chunk)[1:-1])
                out.write('"}')
            else:
                out.write(f', "archive_member": {json.dumps(entry.artifact_path)}}}')
        out.write("]}")
    if not binaries:
        return [json_path]
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
        for entry in binaries:
            archive.write(entry.spooled, arcname=entry.artifact_path)
    return [json_path, zip_path]


def flush_all() -> None:
    """At interpreter exit: runs that never ended still get their consolidated artifacts."""
    for run_id in list(_ledgers):
        try:
            flush_run(run_id)
        except Exception as error:
            internal_error("artifact flush at exit", error)


atexit.register(flush_all)

_SIGNALS = ("SIGTERM", "SIGINT")
_previous: dict[int, Any] = {}


def install_signal_handlers() -> None:
    """Flush spooled outputs on SIGTERM (a container stop) and SIGINT, then let the signal take
    its course: the handler already installed runs next, and a SIGTERM left to its default
    ends the runs as KILLED and the process as the signal would. Main thread only (Python's
    rule); a program that installs its own handler later replaces this one."""
    if threading.current_thread() is not threading.main_thread():
        return
    for name in _SIGNALS:
        number = getattr(signal, name, None)
        if number is None or number in _previous:
            continue
        try:
            _previous[number] = signal.signal(number, _on_signal)
        except (ValueError, OSError):
            continue


def uninstall_signal_handlers() -> None:
    for number, previous in list(_previous.items()):
        try:
            if signal.getsignal(number) is _on_signal:
                signal.signal(number, previous)
        except (ValueError, OSError):
            pass
        _previous.pop(number, None)


def _restore_signal_handlers_in_child() -> None:
    """A forked child (a multiprocessing pool worker) gets back the handlers its parent had before
    runguard's: SIGTERM is how a pool stops its workers, at once, and a Python-level handler only
    runs when the main thread next runs Python, which a worker waiting in C may never do."""
    try:
        uninstall_signal_handlers()
    except Exception:  # never break a fork
        pass


os.register_at_fork(after_in_child=_restore_signal_handlers_in_child)


def _on_signal(number: int, frame: Any) -> None:
    previous = _previous.get(number, signal.SIG_DFL)
    try:
        if any(ledger.entries for ledger in list(_ledgers.values())):
            logger.warning(
                "runguard: %s received; writing the spooled artifact outputs first", signal.Signals(number).name
            )
        flush_all()
        if number == signal.SIGTERM and previous in (signal.SIG_DFL, None):
            _end_runs_killed()
    except Exception as error:
        log_once(
            ("signal-flush", type(error).__name__), "runguard: could not flush on a signal (%s)", type(error).__name__
        )
    if callable(previous):
        previous(number, frame)
        return
    if previous == signal.SIG_IGN:
        return
    signal.signal(number, signal.SIG_DFL)  # the default action: the process ends as the signal says
    os.kill(os.getpid(), number)


def _end_runs_killed() -> None:
    """The default SIGTERM action ends the process without Python's clean-up: end the active
    runs as KILLED first, so they do not stay RUNNING."""
    fluent = sys.modules.get("mlflow.tracking.fluent")
    if fluent is None:
        return
    while fluent.active_run() is not None:
        fluent.end_run("KILLED")
