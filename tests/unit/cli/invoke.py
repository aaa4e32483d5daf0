"""The CLI as a user runs it: the installed `nightread` script (or `python -m flows.cli`) in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

NIGHTREAD = str(Path(sys.executable).parent / "nightread")
PYTHON_M = (sys.executable, "-m", "flows.cli")
ENTRY_POINTS = {"nightread": (NIGHTREAD,), "python -m flows.cli": PYTHON_M}


def nightread(
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    stdin: str | None = None,
    entry: Sequence[str] = (NIGHTREAD,),
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*entry, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        check=False,
        input=stdin if stdin is not None else "",
    )


def one_line(text: str) -> str:
    """Console output with rich's line wrapping undone."""
    return " ".join(text.split())


def db_upgrade(env: dict[str, str], *revision: str) -> None:
    """`nightread db upgrade`: the step every command but `demo` needs on a new database."""
    r = nightread("db", "upgrade", *revision, env=env)
    assert r.returncode == 0, r.stderr


def serve_until_ready(args: list[str], env: dict[str, str], ready: Callable[[], bool], timeout: float = 120.0) -> None:
    """Start a long-running `nightread` command, poll `ready()` until it answers, then stop it with Ctrl-C."""
    proc = subprocess.Popen(
        [NIGHTREAD, *args], env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                if ready():
                    break
            except Exception:
                pass
            time.sleep(0.1)  # polling interval
        else:
            pytest.fail(f"{args} never became ready")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"{args} did not stop on Ctrl-C: {proc.communicate()[0].decode(errors='replace')[-3000:]}")
    assert proc.returncode == 0, proc.communicate()[0].decode(errors="replace")[-3000:]
