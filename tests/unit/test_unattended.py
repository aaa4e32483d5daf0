"""Unattended nights, as an operator meets them: `nightread demo` stopped with SIGTERM in the middle of
its studies, and killed with SIGKILL, then run again. A stop fails nothing and counts no attempt for
work it abandoned; a crash leaves work that `status` names and the next run recovers; the last run
finishes every study; no scratch folder full of DICOM files stays behind."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
NIGHTREAD = str(Path(sys.executable).with_name("nightread"))


def environment(tmp_path: Path, tiny_model: Path) -> dict[str, str]:
    return {
        **os.environ,
        "NIGHTREAD_DATA_DIR": str(tmp_path / "data"),
        "NIGHTREAD_INFERENCE__MODEL": str(tiny_model),
        "NIGHTREAD_FLOW__CONCURRENCY": "1",
        "NIGHTREAD_FLOW__RETRY_DELAY_S": "0",
        "PREFECT_HOME": str(tmp_path / "prefect"),
    }


def rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        try:
            return conn.execute(sql).fetchall()
        except sqlite3.OperationalError:  # the schema is not there yet
            return []


def start_demo(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([NIGHTREAD, "demo"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_for(db: Path, sql: str, proc: subprocess.Popen[bytes], what: str, timeout_s: float = 240) -> None:
    """Poll the database until `sql` returns a row (the demo must still be running)."""
    deadline = time.monotonic() + timeout_s
    while not rows(db, sql):
        assert proc.poll() is None, f"the demo ended before {what}: {proc.stdout.read().decode()[-2000:]}"  # type: ignore[union-attr]
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.05)


def finish(proc: subprocess.Popen[bytes], timeout_s: float = 120) -> str:
    out, _ = proc.communicate(timeout=timeout_s)
    return out.decode(errors="replace")


def study_states(db: Path) -> dict[str, tuple[str, int]]:
    return {
        str(uid): (str(status), int(attempts))
        for uid, status, attempts in rows(db, "SELECT study_instance_uid, status, attempts FROM study")
    }


def work_files(data: Path) -> list[Path]:
    return [p for p in (data / "work").rglob("*") if p.is_file()] if (data / "work").exists() else []


def test_sigterm_stops_a_night_without_failing_anything_and_the_next_run_finishes_it(tmp_path, tiny_model) -> None:
    env = environment(tmp_path, tiny_model)
    db = tmp_path / "data" / "nightread.db"
    proc = start_demo(env)
    wait_for(db, "SELECT 1 FROM study WHERE status = 'done'", proc, "a study done")
    proc.send_signal(signal.SIGTERM)
    output = finish(proc)
    assert proc.returncode != 0, output
    states = study_states(db)
    assert len(states) == 5
    assert not [s for s in states.values() if s[0] == "failed"], states
    assert [s for s in states.values() if s[0] != "done"], "stopped in the middle: some studies were left"
    assert all(attempts == 0 for status, attempts in states.values() if status != "done"), states
    assert rows(db, "SELECT status FROM run ORDER BY id DESC LIMIT 1") == [("interrupted",)]
    assert rows(db, "SELECT count(*) FROM failure WHERE stage = 'study'") == [(0,)]
    assert work_files(tmp_path / "data") == []

    again = subprocess.run([NIGHTREAD, "demo"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stdout + again.stderr
    assert {s for s, _ in study_states(db).values()} == {"done"}
    assert rows(db, "SELECT count(*) FROM failure WHERE stage = 'study' AND resolved = 0") == [(0,)]


def test_a_killed_night_is_named_by_status_and_recovered_by_the_next_run(tmp_path, tiny_model) -> None:
    env = environment(tmp_path, tiny_model)
    db = tmp_path / "data" / "nightread.db"
    proc = start_demo(env)
    wait_for(db, "SELECT 1 FROM study WHERE status = 'retrieving'", proc, "a study retrieving")
    proc.kill()
    finish(proc)
    killed_pid = str(proc.pid)
    status = subprocess.run(
        [NIGHTREAD, "status", "--json"], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    stranded = json.loads(status.stdout)["stranded"]
    assert stranded["dead_runs"] == 1
    assert stranded["studies_retrieving_without_a_run"] == 1

    again = subprocess.run([NIGHTREAD, "demo"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stdout + again.stderr
    states = study_states(db)
    assert {s for s, _ in states.values()} == {"done"}, states
    assert sorted(a for _, a in states.values()) == [1, 1, 1, 1, 2], "the killed attempt was real: it counts once"
    assert rows(db, "SELECT status FROM run ORDER BY id") == [("interrupted",), ("completed",)]
    assert not (tmp_path / "data" / "work" / killed_pid).exists(), "the dead process's scratch folder is gone"
    after = subprocess.run(
        [NIGHTREAD, "status", "--json"], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    assert not any(json.loads(after.stdout)["stranded"].values())
