"""What nightread writes is its user's alone: files 0600, folders 0700. Through the CLI (its umask covers
the data dir, the SQLite database, objects, the inbox, exports and Prefect's home and database), and
through the library (a Prefect worker imports the flows without the CLI: the database file and the
object store set their own modes)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import free_port, stop_process, wait_until

NIGHTREAD = str(Path(sys.executable).parent / "nightread")


def group_or_world_access(*roots: Path) -> list[str]:
    """Every file or folder under `roots` (themselves included) that anyone but its owner may use."""
    loose = []
    for root in roots:
        for path in [root, *root.rglob("*")]:
            mode = path.lstat().st_mode
            if not stat.S_ISLNK(mode) and mode & 0o077:
                loose.append(f"{stat.filemode(mode)} {path}")
    return loose


def nightread(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """A command run with umask 022 (the usual default): the modes checked are the CLI's own doing."""
    return subprocess.run(
        [NIGHTREAD, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False, umask=0o022
    )


@pytest.mark.slow
def test_cli_creates_everything_private(tmp_path, tiny_model):
    data, prefect_home, exports = tmp_path / "data", tmp_path / "prefect-home", tmp_path / "exports"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "PREFECT_SERVER_DATABASE"))},
        "NIGHTREAD_DATA_DIR": str(data),
        "NIGHTREAD_INFERENCE__MODEL": str(tiny_model),
        "HF_HUB_OFFLINE": "1",
        "PREFECT_HOME": str(prefect_home),  # nightread starts Prefect's API: its home and database are new
    }
    demo = nightread("demo", env=env)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert (data / "nightread.db").is_file()
    assert any((data / "objects").rglob("*.png"))
    assert (prefect_home / "prefect.db").is_file()

    export = nightread(
        "cohort",
        "--per",
        "image",
        "--out",
        str(exports / "cohort.parquet"),
        "--finetune",
        str(exports / "finetune"),
        "--answers",
        "model",
        env=env,
    )
    assert export.returncode == 0, export.stderr[-3000:]
    assert any((exports / "finetune").rglob("*.png"))

    port = free_port()
    log = tmp_path / "listen.log"
    with log.open("wb") as fh:
        listener = subprocess.Popen(
            [NIGHTREAD, "listen", "--port", str(port), "--allow", "MODALITY1"],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            umask=0o022,
        )
    try:
        wait_until(
            lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() is None,
            timeout=120,
            what="nightread listen",
            proc=listener,
            log=log,
        )
    finally:
        stop_process(listener)
    assert (data / "inbox").is_dir()

    assert group_or_world_access(data, prefect_home, exports) == []


def test_library_creates_a_private_database_and_object_store(tmp_path):
    from db.migrate import upgrade
    from db.session import make_engine
    from integrations.storage import LocalObjectStore

    old = os.umask(0o022)  # the usual default, whatever this process runs with
    try:
        data = tmp_path / "data"
        url = f"sqlite:///{data / 'nightread.db'}"
        upgrade(url)
        engine = make_engine(url)
        with engine.connect() as conn:  # an open connection in WAL mode: -wal and -shm files exist
            conn.exec_driver_sql("SELECT count(*) FROM study").one()
            assert (data / "nightread.db-wal").exists()
            store = LocalObjectStore(data / "objects")
            store.put("images/abc/def/f0-r1.png", b"\x89PNG")
            assert group_or_world_access(data) == []
        engine.dispose()
    finally:
        os.umask(old)
    assert stat.S_IMODE((data / "nightread.db").stat().st_mode) == 0o600
    assert stat.S_IMODE((data / "objects" / "images" / "abc").stat().st_mode) == 0o700
