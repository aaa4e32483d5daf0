"""Shared fixtures: a Prefect test harness per session, a tiny offline model, a sample PACS, settings."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on a 2-core machine: two threads each (torch's default here), and every
    # process they start, would ask 4 threads of 2 cores, and OpenMP threads waiting for a busy core made
    # small kernels 40x slower (one FHIR test: 13 s alone, 74 s so). One thread a process; read by torch
    # when it starts, here and in the subprocesses (nightread, tritonserver's Python backend).
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REQUIRE_SERVICES = os.environ.get("NIGHTREAD_REQUIRE_SERVICES") == "1"


def require_or_skip(reason: str) -> None:
    """A missing server fails the run in CI (NIGHTREAD_REQUIRE_SERVICES=1) and skips elsewhere."""
    if REQUIRE_SERVICES:
        pytest.fail(f"required service missing: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from integrations.vlm.tiny import build_tiny

    return build_tiny("smolvlm", tmp_path_factory.mktemp("models") / "tiny-smolvlm")


@pytest.fixture
def sample_pacs() -> Iterator[object]:
    from integrations.sample_pacs import SamplePacs

    with SamplePacs(include_corrupt=True) as pacs:
        yield pacs


@pytest.fixture
def make_settings(tmp_path: Path, tiny_model: Path):  # type: ignore[no-untyped-def]
    """Settings on embedded defaults under tmp_path, the tiny model, no retry delays."""
    from flows.wiring.settings import NightreadSettings

    def make(**overrides: object) -> NightreadSettings:
        base: dict[str, object] = {
            "data_dir": tmp_path / "data",
            "inference": {"model": str(tiny_model)},
            "flow": {"retry_delay_s": 0, "retries": 1},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}  # type: ignore[dict-item]
            else:
                base[key] = value
        return NightreadSettings(**base)  # type: ignore[arg-type]

    return make


# --- real servers (integration) -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres() -> Iterator[object]:
    import shutil
    import tempfile

    from tests.services import Postgres, free_port, pg_bin

    binaries = pg_bin()
    if binaries is None:
        require_or_skip("PostgreSQL server binaries (apt-get install postgresql)")
    assert binaries is not None
    folder = Path(tempfile.mkdtemp(prefix="nightread-pg-"))  # not under pytest's 0700 tmp: postgres must enter
    folder.chmod(0o755)
    pg = Postgres(folder=folder, port=free_port(), bin=binaries)
    pg.start()
    try:
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres, request) -> str:  # type: ignore[no-untyped-def]
    """A fresh, empty database for one test."""
    import re

    name = "t_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:50]
    return str(postgres.create_database(name))


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Orthanc (Debian's package) with our config and the DICOMweb plugin, seeded with synthetic studies."""
    from integrations.sample_pacs import generate_studies
    from tests.services import DICOMWEB_PLUGIN, ORTHANC, Orthanc

    if ORTHANC is None or not DICOMWEB_PLUGIN.exists():
        require_or_skip("Orthanc with the DICOMweb plugin (apt-get install orthanc orthanc-dicomweb)")
    server = Orthanc.on_free_ports(tmp_path_factory.mktemp("orthanc"))
    server.start()
    try:
        studies = generate_studies(seed=11, include_corrupt=True, xr_size=512, ct_size=256)
        server.upload_datasets(ds for study in studies for ds in study.instances)
        server.studies = studies  # type: ignore[attr-defined]
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from tests.services import S3Server, free_port, moto_available

    if not moto_available():
        require_or_skip("moto server (pip install 'moto[s3]' flask flask-cors)")
    server = S3Server(folder=tmp_path_factory.mktemp("s3"), port=free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_settings(s3_server, request) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """Storage settings for a fresh bucket on the S3 server."""
    import re

    bucket = "t-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    return {
        "backend": "s3",
        "endpoint": s3_server.endpoint,
        "bucket": bucket,
        "access_key": "testing",
        "secret_key": "testing",
        "secure": False,
        "region": "us-east-1",
    }


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[object]:
    """tritonserver from the nvidia-pytriton wheel on deploy/triton/model_repository, serving the tiny model."""
    try:
        from integrations.triton_server import pytriton_dir

        pytriton_dir()
        import tritonclient.grpc  # noqa: F401
    except Exception as exc:
        require_or_skip(f"tritonserver (pip install 'nightread[triton]'): {exc}")
    from tests.services import triton_on_free_ports

    server = triton_on_free_ports(tmp_path_factory.mktemp("triton"), tiny_model)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Test files with a `slow` test first, each file's tests together and in their order: `make test`
    hands files to its workers in this order, so the long ones start early and short ones fill the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    first_seen = {path: i for i, path in reversed(list(enumerate(item.path for item in items)))}
    items.sort(key=lambda item: (item.path not in slow_files, first_seen[item.path]))
