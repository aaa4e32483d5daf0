"""The fault harness, small and asserting (`make chaos` is the big one, tests/chaos.py): `nightread run`
on Postgres + Orthanc + S3 with the in-process tiny model, over 10 studies, is killed with SIGKILL,
stopped with SIGTERM, and run once through a fault proxy in front of Orthanc that aborts, resets
mid-PDU, stalls and drips associations. Then clean runs: every study annotated, once; nothing lost,
duplicated or stranded; no scratch or temporary file left."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos import (
    NIGHTREAD,
    PACS_FAULTS,
    Point,
    Setup,
    chaos_studies,
    clean_runs,
    exhausted_limits,
    run_once,
    run_stopped,
    s3_store,
    seed_orthanc,
    stop_live_runs,
    tally,
)
from tests.conftest import require_or_skip
from tests.fault_proxy import FaultProxy
from tests.services import DICOMWEB_PLUGIN, ORTHANC, Orthanc, S3Server

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]
STUDIES = 10


@pytest.fixture
def chaos_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Orthanc, set[str]]]:
    """An Orthanc of its own (the shared one stays as seeded) with 10 small studies."""
    if ORTHANC is None or not DICOMWEB_PLUGIN.exists():
        require_or_skip("Orthanc with the DICOMweb plugin (apt-get install orthanc orthanc-dicomweb)")
    folder = tmp_path_factory.mktemp("orthanc-chaos")
    server = Orthanc.on_free_ports(folder)
    server.start()
    try:
        yield server, seed_orthanc(server, chaos_studies(STUDIES))
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def pacs_proxy(chaos_orthanc: tuple[Orthanc, set[str]]) -> Iterator[FaultProxy]:
    orthanc, _ = chaos_orthanc
    with FaultProxy(target_port=orthanc.dicom_port, seed=7, stall_s=5.0, drip_s=2.0, drip_bytes=256) as proxy:
        yield proxy


def test_killed_stopped_and_faulted_nights_end_with_every_study_annotated_once(
    tmp_path: Path,
    postgres_url: str,
    s3_server: S3Server,
    s3_settings: dict[str, object],
    tiny_model: Path,
    chaos_orthanc: tuple[Orthanc, set[str]],
    pacs_proxy: FaultProxy,
) -> None:
    orthanc, uids = chaos_orthanc
    setup = Setup(
        name="chaos",
        work=tmp_path,
        database_url=postgres_url,
        s3_endpoint=s3_server.endpoint,
        bucket=str(s3_settings["bucket"]),
        pacs_port=pacs_proxy.port,
        orthanc=orthanc,
        inference={"NIGHTREAD_INFERENCE__MODEL": str(tiny_model)},
        max_attempts=10,
    )
    engine = setup.engine()
    try:
        killed = run_stopped(setup, engine, sig=signal.SIGKILL, point=Point("rendered", 0.2), timeout_s=120)
        assert killed.signal_sent == "SIGKILL", killed.tail()
        assert not killed.hung
        assert not exhausted_limits(setup), (
            f"the killed run left every slot of the PACS's association limit held {exhausted_limits(setup)}: "
            "every later run would wait for one forever"
        )

        stopped = run_stopped(setup, engine, sig=signal.SIGTERM, point=Point("done", 0.0, n=1), timeout_s=120)
        assert stopped.signal_sent == "SIGTERM", stopped.tail()
        assert not stopped.hung, "a SIGTERM ends a run within 90 s"
        assert stopped.returncode != 0
        assert "failed" not in tally(setup, expected_uids=uids).by_status, "a stop fails nothing"

        pacs_proxy.set_faults(PACS_FAULTS)
        faulted = run_once(setup, timeout_s=150)
        pacs_proxy.set_faults({})
        assert not faulted.hung, faulted.tail()
        assert pacs_proxy.faults > 0, f"the proxy injected no fault in {pacs_proxy.connections} associations"

        clean_runs(setup, uids=uids, at_most=2, timeout_s=150, say=lambda _: None)
    finally:
        engine.dispose()
        stop_live_runs()

    result = tally(setup, expected_uids=uids, store=s3_store(setup, s3_server.endpoint))
    assert result.by_status == {"done": STUDIES}
    assert result.lost == 0
    assert result.duplicated == dict.fromkeys(result.duplicated, 0)
    assert result.stranded == dict.fromkeys(result.stranded, 0)
    assert result.temp_left == []
    status = subprocess.run(
        [NIGHTREAD, "status", "--json"], env=setup.env(), capture_output=True, text=True, timeout=120, check=True
    )
    assert not any(json.loads(status.stdout)["stranded"].values())
