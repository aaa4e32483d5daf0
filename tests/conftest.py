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
    from flows.settings import NightreadSettings

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
