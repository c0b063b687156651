"""Artifact logging storms, against real tracking stores: a sqlite store with a local
artifact root, and a real ``mlflow server`` on 127.0.0.1 serving artifacts."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import zipfile

import mlflow
import pytest
from mlflow.tracking import MlflowClient

import runguard_autolog as runguard
from runguard_autolog import _artifacts

from ._servers import start_tracking_server


def downloaded(run_id: str, path: str, tmp_path) -> str:
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(tmp_path / "dl"))


def listed(run_id: str, path: str = "") -> list[str]:
    return sorted(item.path for item in MlflowClient().list_artifacts(run_id, path))


def consolidated(run_id: str, tmp_path, when: str = "final") -> dict:
    with open(downloaded(run_id, f"runguard/consolidated_{when}.json", tmp_path), encoding="utf-8") as file:
        return json.load(file)


def assert_every_text_kept(run_id: str, tmp_path, texts: dict[str, str]) -> None:
    """Every output is either an individual artifact or an entry of the consolidated JSON."""
    individual = {path for path in listed(run_id, "tools")}
    entries = {entry["artifact_path"]: entry for entry in consolidated(run_id, tmp_path)["entries"]}
    assert individual.isdisjoint(entries) and individual | set(entries) == set(texts)
    for path, entry in entries.items():
        assert entry["kind"] == "text" and entry["text"] == texts[path]
    for path in individual:
        with open(downloaded(run_id, path, tmp_path), encoding="utf-8") as file:
            assert file.read() == texts[path]


def storm(n: int) -> dict[str, str]:
    texts = {f"tools/out_{i:03d}.txt": f"tool output {i}: " + "x" * i for i in range(n)}
    for path, text in texts.items():
        mlflow.log_text(text, path)
    return texts


def test_100_log_text_calls_give_20_files_and_one_consolidated_json(tracking, tmp_path):
    runguard.autolog()  # max_artifact_writes defaults to 20
    with mlflow.start_run() as run:
        texts = storm(100)
    run_id = run.info.run_id
    assert len(listed(run_id, "tools")) == 20
    assert listed(run_id, "runguard") == ["runguard/consolidated_final.json"]
    document = consolidated(run_id, tmp_path)
    assert document["outputs"] == 80 and [e["order"] for e in document["entries"]] == list(range(21, 101))
    assert_every_text_kept(run_id, tmp_path, texts)
    data = MlflowClient().get_run(run_id).data
    assert "write budget" in data.tags["runguard.artifact_tripped"]
    assert data.metrics["runguard.artifact_writes_avoided"] == 80
    assert data.metrics["runguard.artifact_bytes_consolidated"] == sum(len(t) for t in list(texts.values())[20:])


def test_served_artifacts_on_a_real_mlflow_server(tmp_path, monkeypatch):
    process, port = start_tracking_server(tmp_path, serve_artifacts=True)
    try:
        mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
        mlflow.set_experiment("served")
        runguard.autolog()
        with mlflow.start_run() as run:
            texts = storm(100)
        assert mlflow.get_run(run.info.run_id).info.artifact_uri.startswith("mlflow-artifacts:")
        assert len(listed(run.info.run_id, "tools")) == 20
        assert listed(run.info.run_id, "runguard") == ["runguard/consolidated_final.json"]
        assert_every_text_kept(run.info.run_id, tmp_path, texts)
    finally:
        mlflow.set_tracking_uri(None)
        process.stop()


def test_an_exception_inside_the_run_still_consolidates(tracking, tmp_path):
    runguard.autolog(max_artifact_writes=3)
    with pytest.raises(ValueError):
        with mlflow.start_run() as run:
            texts = storm(10)
            raise ValueError("the agent crashed")
    assert MlflowClient().get_run(run.info.run_id).info.status == "FAILED"
    assert_every_text_kept(run.info.run_id, tmp_path, texts)


def test_end_run_consolidates(tracking, tmp_path):
    runguard.autolog(max_artifact_writes=3)
    run = mlflow.start_run()
    texts = storm(10)
    mlflow.end_run()
    assert_every_text_kept(run.info.run_id, tmp_path, texts)


def test_a_process_that_exits_without_ending_the_run(tracking, tmp_path):
    script = textwrap.dedent(f"""
        import mlflow, runguard_autolog as runguard
        mlflow.set_tracking_uri({tracking!r})
        mlflow.set_experiment("exit")
        runguard.autolog(max_artifact_writes=2)
        run = mlflow.start_run()
        print(run.info.run_id)
        for i in range(6):
            mlflow.log_text(f"tool output {{i}}", f"tools/out_{{i:03d}}.txt")
        # no end_run: the interpreter exits
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNGUARD_")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    run_id = done.stdout.strip().splitlines()[-1]
    texts = {f"tools/out_{i:03d}.txt": f"tool output {i}" for i in range(6)}
    assert_every_text_kept(run_id, tmp_path, texts)


def test_a_50_mb_payload_over_the_byte_budget(tracking, tmp_path):
    runguard.autolog()  # max_artifact_bytes defaults to 10 MiB
    payload = ("0123456789abcdef" * 65536 + "\n") * 50  # ~50 MB of text
    with mlflow.start_run() as run:
        mlflow.log_text("small", "tools/small.txt")
        mlflow.log_text(payload, "tools/big.txt")
    assert listed(run.info.run_id, "tools") == ["tools/small.txt"]
    (entry,) = consolidated(run.info.run_id, tmp_path)["entries"]
    assert entry["artifact_path"] == "tools/big.txt" and entry["size"] == len(payload.encode())
    assert entry["text"] == payload
    assert "byte budget" in MlflowClient().get_run(run.info.run_id).data.tags["runguard.artifact_tripped"]


def test_eight_threads_logging_into_one_run(tracking, tmp_path):
    runguard.autolog()
    client = MlflowClient()
    with mlflow.start_run() as run:
        texts = {f"tools/t{t}_{i:02d}.txt": f"thread {t} output {i}" for t in range(8) for i in range(25)}

        def log(thread: int) -> None:
            for i in range(25):
                path = f"tools/t{thread}_{i:02d}.txt"
                client.log_text(run.info.run_id, texts[path], path)

        threads = [threading.Thread(target=log, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(listed(run.info.run_id, "tools")) == 20
    assert len(consolidated(run.info.run_id, tmp_path)["entries"]) == 180
    assert_every_text_kept(run.info.run_id, tmp_path, texts)


def test_binary_files_and_text_that_is_not_utf8_go_to_one_archive(tracking, tmp_path):
    runguard.autolog(max_artifact_writes=1)
    image = tmp_path / "chart.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40)
    latin1 = tmp_path / "notes.txt"
    latin1.write_bytes("café crème".encode("latin-1"))
    with mlflow.start_run() as run:
        mlflow.log_text("first", "tools/first.txt")
        mlflow.log_artifact(str(image), "plots")
        mlflow.log_artifact(str(latin1), "tools")
        mlflow.log_dict({"a": 1}, "tools/state.json")
    run_id = run.info.run_id
    assert listed(run_id, "runguard") == ["runguard/consolidated_final.json", "runguard/consolidated_final.zip"]
    entries = {e["artifact_path"]: e for e in consolidated(run_id, tmp_path)["entries"]}
    assert entries["plots/chart.png"]["kind"] == "binary" and entries["tools/notes.txt"]["kind"] == "binary"
    assert json.loads(entries["tools/state.json"]["text"]) == {"a": 1}
    with zipfile.ZipFile(downloaded(run_id, "runguard/consolidated_final.zip", tmp_path)) as archive:
        assert sorted(archive.namelist()) == ["plots/chart.png", "tools/notes.txt"]
        for path, original in (("plots/chart.png", image), ("tools/notes.txt", latin1)):
            data = archive.read(path)
            assert data == original.read_bytes()
            assert hashlib.sha256(data).hexdigest() == entries[path]["sha256"]


def test_an_artifact_store_failure_keeps_the_spool(tracking, tmp_path, caplog):
    runguard.autolog(max_artifact_writes=2)
    with caplog.at_level("WARNING", logger="runguard_autolog"):
        with mlflow.start_run() as run:
            storm(5)
            # the store cannot create runguard/ any more: a file sits where the folder goes
            root = mlflow.get_artifact_uri().removeprefix("file://")
            with open(os.path.join(root, "runguard"), "w") as blocker:
                blocker.write("in the way")
    messages = [r.getMessage() for r in caplog.records if "kept in" in r.getMessage()]
    assert len(messages) == 1 and run.info.run_id in messages[0]
    spool = messages[0].rsplit("kept in ", 1)[1]
    with open(os.path.join(spool, "entries.jsonl"), encoding="utf-8") as index:
        kept = [json.loads(line) for line in index]
    assert [entry["artifact_path"] for entry in kept] == [f"tools/out_{i:03d}.txt" for i in range(2, 5)]
    for entry in kept:
        with open(entry["spooled"], encoding="utf-8") as file:
            assert file.read().startswith(f"tool output {entry['order'] - 1}")
    shutil.rmtree(spool)


def test_raise_mode_consolidates_at_the_trip_then_raises(tracking, tmp_path):
    runguard.autolog(max_artifact_writes=2, artifact_breach="raise")
    with mlflow.start_run() as run:
        mlflow.log_text("a", "tools/a.txt")
        mlflow.log_text("b", "tools/b.txt")
        with pytest.raises(runguard.RunGuardTripped) as caught:
            mlflow.log_text("c", "tools/c.txt")
        assert caught.value.limit == "max_artifact_writes"
        (entry,) = consolidated(run.info.run_id, tmp_path, "at_trip")["entries"]
        assert entry["artifact_path"] == "tools/c.txt" and entry["text"] == "c"
        spool = _artifacts._ledgers[run.info.run_id].spool
        assert os.path.isdir(spool)
    assert listed(run.info.run_id, "tools") == ["tools/a.txt", "tools/b.txt"]
    assert not os.path.exists(spool)  # nothing left behind on local disk once the run ended


def test_bad_artifact_breach_value_is_a_clear_error(monkeypatch):
    with pytest.raises(runguard.RunGuardConfigError, match="artifact_breach='explode'"):
        runguard.autolog(artifact_breach="explode")
    monkeypatch.setenv("RUNGUARD_ARTIFACT_BREACH", "sometimes")
    with pytest.raises(runguard.RunGuardConfigError, match="RUNGUARD_ARTIFACT_BREACH='sometimes'"):
        runguard.autolog()


def test_a_directory_counts_but_keeps_its_layout(tracking, tmp_path):
    """MLflow logs a model into a run as a directory: splitting it up would break the model."""
    runguard.autolog(max_artifact_writes=2)
    model = tmp_path / "model"
    model.mkdir()
    for name in ("MLmodel", "conda.yaml", "model.pkl"):
        (model / name).write_text(name)
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(model), "model")
        mlflow.log_text("after", "tools/after.txt")  # the budget is spent: consolidated
    assert listed(run.info.run_id, "model") == ["model/MLmodel", "model/conda.yaml", "model/model.pkl"]
    (entry,) = consolidated(run.info.run_id, tmp_path)["entries"]
    assert entry["artifact_path"] == "tools/after.txt" and entry["order"] == 4


def test_sigterm_in_the_middle_of_a_storm_keeps_every_output_and_ends_the_run_killed(tracking, tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys, mlflow, runguard_autolog as runguard
        mlflow.set_tracking_uri({tracking!r})
        mlflow.set_experiment("sigterm")
        runguard.autolog(max_artifact_writes=20)
        run = mlflow.start_run()
        print(run.info.run_id, flush=True)
        for i in range(1000):
            mlflow.log_text(f"tool output {{i}}", f"tools/out_{{i:04d}}.txt")
            if i == 200:
                os.kill(os.getpid(), signal.SIGTERM)  # a container stop, mid-storm
        print("not reached", flush=True)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNGUARD_")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == -15, done.stderr  # the signal took its course
    assert "not reached" not in done.stdout
    assert "spooled in" in done.stderr  # the spool's path was logged when it was made
    run_id = done.stdout.strip().splitlines()[0]
    assert mlflow.get_run(run_id).info.status == "KILLED"
    texts = {f"tools/out_{i:04d}.txt": f"tool output {i}" for i in range(201)}
    assert_every_text_kept(run_id, tmp_path, texts)


def _sigterm_handler_is_the_default() -> bool:
    import signal

    return signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_forked_child_gets_its_parents_own_sigterm_handler_back():
    """A pool stops its forked workers with SIGTERM: in them the default action, at once, not
    runguard's Python-level handler (which waits for the worker's main thread to run Python)."""
    import multiprocessing
    import signal

    runguard.autolog()
    assert signal.getsignal(signal.SIGTERM) is _artifacts._on_signal  # installed in this process
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(_sigterm_handler_is_the_default) is True
    assert signal.getsignal(signal.SIGTERM) is _artifacts._on_signal  # and kept here
    runguard.autolog(disable=True)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_path_mlflow_refuses_is_refused_past_the_budget_too(tracking, tmp_path):
    runguard.autolog(max_artifact_writes=1)
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"\x00\x01")
    with mlflow.start_run() as run:
        mlflow.log_text("first", "ok.txt")
        with pytest.raises(mlflow.exceptions.MlflowException, match="Invalid path"):
            mlflow.log_artifact(str(payload), "../../../../tmp/x")
        mlflow.log_text("second", "fine.txt")  # spooled
    names = zipfile.ZipFile(downloaded(run.info.run_id, "runguard/consolidated_final.zip", tmp_path)).namelist() \
        if "runguard/consolidated_final.zip" in listed(run.info.run_id, "runguard") else []
    assert not any(".." in name for name in names)
    assert [e["artifact_path"] for e in consolidated(run.info.run_id, tmp_path)["entries"]] == ["fine.txt"]
