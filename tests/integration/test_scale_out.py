"""Studies spread over Prefect workers, for real: a Prefect server (`prefect server start`, its database on
the test Postgres), the `nightread` process work pool with its queues, and two workers with data dirs of
their own run a nightly over 20 studies from Orthanc on Postgres + S3 (`flow.dispatch = work_pool`). One
worker is killed (with the flow run it was working on) while it holds a study: that study goes to the
other worker once its lease runs out, every study is annotated exactly once, and both workers did work."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from tests.chaos import NIGHTREAD, Setup, chaos_studies, s3_store, seed_orthanc, tally
from tests.conftest import require_or_skip
from tests.services import DICOMWEB_PLUGIN, ORTHANC, PREFECT, Orthanc, S3Server, wait_until
from tests.services import prefect_server as services_prefect_server

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]
STUDIES = 20
LEASE_S = 8


@pytest.fixture
def scale_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Orthanc, set[str]]]:
    if ORTHANC is None or not DICOMWEB_PLUGIN.exists():
        require_or_skip("Orthanc with the DICOMweb plugin (apt-get install orthanc orthanc-dicomweb)")
    folder = tmp_path_factory.mktemp("orthanc-scale")
    server = Orthanc.on_free_ports(folder)
    server.start()
    try:
        yield server, seed_orthanc(server, chaos_studies(STUDIES, first_seed=401))
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def prefect_server(postgres: Any, tmp_path: Path) -> Iterator[str]:
    """`prefect server start` on loopback with its database on the test Postgres; its API URL."""
    with services_prefect_server(postgres, tmp_path / "prefect-server", database="prefect_scale") as api:
        yield api


def _start_worker(name: str, env: dict[str, str], folder: Path) -> subprocess.Popen[bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    log = (folder / "worker.log").open("wb")
    return subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "nightread", "--type", "process", "--name", name],
        env={**env, "NIGHTREAD_DATA_DIR": str(folder / "data"), "TMPDIR": str(folder / "tmp")},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_two_workers_share_a_night_and_a_killed_workers_study_goes_to_the_other(
    tmp_path: Path,
    postgres_url: str,
    s3_server: S3Server,
    s3_settings: dict[str, object],
    tiny_model: Path,
    scale_orthanc: tuple[Orthanc, set[str]],
    prefect_server: str,
) -> None:
    orthanc, uids = scale_orthanc
    setup = Setup(
        name="scale",
        work=tmp_path / "nightly",
        database_url=postgres_url,
        s3_endpoint=s3_server.endpoint,
        bucket=str(s3_settings["bucket"]),
        pacs_port=orthanc.dicom_port,
        orthanc=orthanc,
        inference={"NIGHTREAD_INFERENCE__MODEL": str(tiny_model)},
        max_attempts=3,
        timeout_s=10.0,
    )
    env = {
        **setup.env(),
        "PREFECT_API_URL": prefect_server,
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "2",
        "NIGHTREAD_FLOW__DISPATCH": "work_pool",
        "NIGHTREAD_FLOW__LEASE_S": str(LEASE_S),
        "NIGHTREAD_FLOW__STUDIES_PER_RUN": "2",
        "NIGHTREAD_FLOW__RUNS_IN_FLIGHT": "4",
        "NIGHTREAD_PACS__RETRIEVE_DEADLINE_S": "120",
    }
    subprocess.run([NIGHTREAD, "db", "upgrade"], env=env, check=True, capture_output=True, timeout=300)
    deployed = subprocess.run(
        [NIGHTREAD, "deploy"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert deployed.returncode == 0, deployed.stderr[-2000:]
    workers = {name: _start_worker(name, env, tmp_path / name) for name in ("w1", "w2")}
    engine = setup.engine()
    victim: dict[str, Any] = {}
    try:
        nightly = subprocess.Popen(
            [NIGHTREAD, "run"], env=env, stdout=(tmp_path / "nightly.log").open("wb"), stderr=subprocess.STDOUT
        )

        def w1_holds_a_study_after_finishing_a_share() -> bool:
            with engine.connect() as conn:
                w1_done = conn.execute(
                    text(
                        "SELECT count(*) FROM run WHERE kind = 'annotate-studies' AND status = 'completed' "
                        "AND CAST(parameters AS TEXT) LIKE :w1"
                    ),
                    {"w1": f"%{tmp_path / 'w1'}%"},
                ).scalar_one()
                held = conn.execute(
                    text("SELECT id, lease_owner FROM study WHERE status = 'retrieving' AND lease_owner IS NOT NULL")
                ).all()
            for study_id, owner in held:
                pid = int(str(owner).rsplit(":", 1)[1])
                if w1_done and _parent_of(pid) == workers["w1"].pid:
                    victim.update(study=int(study_id), pid=pid)
                    return True
            return False

        wait_until(w1_holds_a_study_after_finishing_a_share, timeout=400, what="worker 1 holding a study")
        os.kill(victim["pid"], signal.SIGKILL)  # the flow run at work, and its worker: a machine gone
        os.killpg(workers["w1"].pid, signal.SIGKILL)
        workers["w1"].wait(timeout=30)
        assert nightly.wait(timeout=600) == 0, (tmp_path / "nightly.log").read_text()[-3000:]
    finally:
        for proc in workers.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
    with engine.connect() as conn:
        shares = conn.execute(text("SELECT parameters, status, counts FROM run WHERE kind = 'annotate-studies'")).all()
        victim_row = conn.execute(
            text("SELECT status, attempts FROM study WHERE id = :id"), {"id": victim["study"]}
        ).one()
    engine.dispose()
    done_by = {"w1": 0, "w2": 0}
    for parameters, status, counts in shares:
        who = "w1" if f"{tmp_path / 'w1'}" in str(parameters) else "w2"
        if status == "completed" and counts:
            done_by[who] += int((counts if isinstance(counts, dict) else {}).get("studies_done", 0))
    assert done_by["w1"] > 0, f"worker 1 finished studies before it was killed: {done_by}"
    assert done_by["w2"] > 0, f"worker 2 did work: {done_by}"
    assert victim_row[0] == "done", "the killed worker's study was finished by the other one"
    assert victim_row[1] >= 2, "its killed attempt counted, and a second one finished it"
    result = tally(setup, expected_uids=uids, store=s3_store(setup, s3_server.endpoint))
    assert result.lost == 0, result
    assert result.duplicates == 0, result.duplicated
    assert result.by_status == {"done": STUDIES}, result.by_status


def test_a_worker_takes_urgent_work_before_the_nightly_and_the_nightly_before_backfill(
    tmp_path: Path, prefect_server: str
) -> None:
    """Runs waiting in the backfill, nightly and urgent queues of the pool (as flows/deployments.py makes
    them): one worker taking one run at a time starts them urgent first, backfill last."""
    from prefect import Flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deployments import ensure_pool

    # the test process's Prefect settings were read when prefect was imported: point them at this server
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        with get_client(sync_client=True) as client:
            ensure_pool(client, "nightread")
        source = Path(__file__).resolve().parent / "prefect_probe"
        # _sync: Prefect's async_dispatch would hand back a coroutine when an event loop runs in this thread
        probe: Any = Flow.from_source(source=str(source), entrypoint="probe.py:probe", _sync=True)  # type: ignore[call-arg]
        probe.deploy(
            name="probe",
            work_pool_name="nightread",
            build=False,
            push=False,
            print_next_steps=False,
            ignore_warnings=True,
            _sync=True,
        )
        # the sync client, not run_deployment: that dispatches to its async twin inside a running event loop
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("probe/probe")
            runs = {
                label: client.create_flow_run_from_deployment(
                    deployment.id, parameters={"label": label}, work_queue_name=queue
                ).id
                for label, queue in (("b1", "backfill"), ("n1", "nightly"), ("u1", "urgent"), ("b2", "backfill"))
            }
        worker = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", "nightread", "--type", "process", "--limit", "1"],
            env={
                **os.environ,
                "PREFECT_API_URL": prefect_server,
                "PREFECT_HOME": str(tmp_path / "prefect"),
                "PREFECT_WORKER_QUERY_SECONDS": "1",
            },
            stdout=(tmp_path / "worker.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            with get_client(sync_client=True) as client:

                def all_done() -> bool:
                    return all(client.read_flow_run(i).state_type.value == "COMPLETED" for i in runs.values())

                wait_until(all_done, timeout=600, what="the four probe runs", log=tmp_path / "worker.log")
                started = {label: client.read_flow_run(i).start_time for label, i in runs.items()}
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=30)
    order = sorted(started, key=lambda label: started[label])
    assert order[0] == "u1", order
    assert order[1] == "n1", order
    assert set(order[2:]) == {"b1", "b2"}, order
