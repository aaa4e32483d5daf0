"""`nightread serve`: the nightly, backfill and reannotate deployments served from one process, with a
local Prefect server started for users who have none (no work pool needed)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect.task_runners import ThreadPoolTaskRunner

from flows.backfill import backfill
from flows.nightly import nightly
from flows.reannotate import reannotate
from flows.wiring.settings import NightreadSettings
from integrations.processes import stop_with_parent


def build_deployments(settings: NightreadSettings, *, cron: str = "0 1 * * *", timezone: str = "UTC") -> list[Any]:
    """The three deployments (settings come from the serving process's environment, not parameters)."""
    from prefect.schedules import Cron

    runner: Any = ThreadPoolTaskRunner(max_workers=settings.flow.concurrency + settings.flow.annotating_studies)
    return [
        nightly.with_options(task_runner=runner).to_deployment(
            name="nightly",
            schedule=Cron(cron, timezone=timezone),
            concurrency_limit=1,
            description="Discover new studies in every enabled source and annotate them.",
            enforce_parameter_schema=False,
        ),
        backfill.with_options(task_runner=runner).to_deployment(
            name="backfill",
            concurrency_limit=1,
            description="Studies from start_date to end_date in one source, resumable.",
            enforce_parameter_schema=False,
        ),
        reannotate.to_deployment(
            name="reannotate",
            concurrency_limit=1,
            description="A model or question bank over stored images of a cohort, without the PACS.",
            enforce_parameter_schema=False,
        ),
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def local_prefect_server(port: int | None = None, timeout_s: float = 120.0) -> Iterator[str]:
    """`prefect server start` on loopback (its database under PREFECT_HOME), polled until healthy."""
    port = port or _free_port()
    prefect = shutil.which("prefect", path=os.path.dirname(sys.executable)) or "prefect"
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "true"}
    proc = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=stop_with_parent,  # a killed `nightread serve` leaves no Prefect server behind
    )
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the Prefect server exited with {proc.returncode} before it was ready")
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Prefect server on port {port} was not ready after {timeout_s:.0f} s")
            time.sleep(0.25)  # polling interval
        yield api
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
