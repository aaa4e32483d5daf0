"""Deployments: deploy/prefect.yaml points at real flows with a valid schedule, and `nightread serve`
registers the three deployments on a local Prefect server it starts (and stops)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.services import free_port, stop_process, wait_until

ROOT = Path(__file__).resolve().parents[2]


def test_prefect_yaml_entrypoints_and_schedule():
    from prefect.flows import load_flow_from_entrypoint
    from prefect.schedules import Cron

    spec = yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert set(by_name) == {"nightly", "annotate-studies", "backfill", "reannotate"}
    for d in spec["deployments"]:
        flow = load_flow_from_entrypoint(str(ROOT / d["entrypoint"]))
        assert flow.name == d["name"]
        assert d["work_pool"]["name"] == "nightread"
    Cron(by_name["nightly"]["schedules"][0]["cron"], timezone="UTC")  # raises on an invalid cron


def test_prefect_yaml_and_nightread_deploy_create_the_same_deployments():
    """deploy/prefect.yaml (for `prefect deploy`) and flows/deployments.py (`nightread deploy`) agree:
    names, entrypoints, queues, schedules and concurrency limits; the queues are the dispatcher's."""
    from flows.deployments import DEPLOYMENTS
    from flows.dispatch import QUEUES

    spec = yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())
    in_yaml = {
        d["name"]: (
            d["entrypoint"],
            d["work_pool"]["work_queue_name"],
            d.get("schedules", [{}])[0].get("cron"),
            d.get("concurrency_limit"),
        )
        for d in spec["deployments"]
    }
    in_code = {d.name: (d.entrypoint, d.queue, d.cron, d.concurrency_limit) for d in DEPLOYMENTS}
    assert in_yaml == in_code
    assert {d.queue for d in DEPLOYMENTS} <= set(QUEUES)
    assert sorted(QUEUES, key=QUEUES.__getitem__) == ["urgent", "nightly", "backfill"]


@pytest.mark.slow
def test_serve_registers_the_deployments_on_a_local_server(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect"), "NIGHTREAD_DATA_DIR": str(tmp_path / "data")})
    log = tmp_path / "serve.log"
    nightread = str(Path(sys.executable).parent / "nightread")
    subprocess.run([nightread, "db", "upgrade"], env=env, capture_output=True, timeout=120, check=True)
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [nightread, "serve", "--server-port", str(port)],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    api = f"http://127.0.0.1:{port}/api"

    def deployments() -> set[str]:
        req = urllib.request.Request(
            f"{api}/deployments/filter", data=b"{}", headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            return {d["name"] for d in json.loads(r.read())}

    try:
        wait_until(
            lambda: deployments() == {"nightly", "backfill", "reannotate"},
            timeout=180,
            what="serve",
            proc=proc,
            log=log,
        )
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        stop_process(proc, timeout=30)
    with pytest.raises(urllib.error.URLError, match="refused"):  # the local server went with it
        urllib.request.urlopen(f"{api}/health", timeout=2)
