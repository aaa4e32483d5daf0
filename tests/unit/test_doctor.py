"""`nightread doctor`: one actionable line per configured service, exit 1 when any fails."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from db.migrate import upgrade
from flows.doctor import run_checks

NIGHTREAD = str(Path(sys.executable).with_name("nightread"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def by_name(checks):  # type: ignore[no-untyped-def]
    return {c.name: c for c in checks}


def test_everything_answers(make_settings, sample_pacs) -> None:
    settings = make_settings(pacs={"port": sample_pacs.port, "called_ae": sample_pacs.ae_title})
    upgrade(settings.database_url)
    checks = by_name(run_checks(settings))
    assert all(c.ok for c in checks.values()), [c.line() for c in checks.values()]
    assert checks["PACS sample-pacs"].detail == "C-ECHO answered"
    assert "at revision" in checks["database"].detail
    assert set(checks) >= {"database", "object store", "PACS sample-pacs", "model", "review secret", "disk"}


def test_each_problem_is_named_with_what_to_do(make_settings, tmp_path) -> None:
    settings = make_settings(pacs={"port": free_port(), "called_ae": "NOBODY"})  # not migrated, nobody listening
    secret = settings.data_dir / "review-secret"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text("x" * 64)
    secret.chmod(0o644)
    checks = by_name(run_checks(settings))
    assert not checks["database"].ok
    assert "nightread db upgrade" in checks["database"].line()
    assert not checks["PACS sample-pacs"].ok
    assert "cannot" in checks["PACS sample-pacs"].detail
    assert "AE titles" in checks["PACS sample-pacs"].fix
    assert not checks["review secret"].ok
    assert checks["review secret"].fix == f"chmod 600 {secret}"
    assert checks["object store"].ok, "one failure does not hide the others"


def test_the_command_exits_1_on_a_problem_and_0_when_all_pass(tmp_path, sample_pacs) -> None:
    env = {**os.environ, "NIGHTREAD_DATA_DIR": str(tmp_path / "data"), "NIGHTREAD_PACS__PORT": str(sample_pacs.port)}
    before = subprocess.run([NIGHTREAD, "doctor"], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert before.returncode == 1
    assert "FAIL database" in before.stdout
    assert "checks failed" in before.stdout
    subprocess.run([NIGHTREAD, "db", "upgrade"], env=env, capture_output=True, timeout=120, check=True)
    after = subprocess.run([NIGHTREAD, "doctor"], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert after.returncode == 0, after.stdout + after.stderr
    assert "ok   PACS sample-pacs: C-ECHO answered" in after.stdout
