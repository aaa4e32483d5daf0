"""flows/cli/models.py: `nightread models …` (and the old `model tiny`), `validate` and `triton serve`
(`score` has tests/unit/test_validation.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.cli.invoke import db_upgrade, nightread, serve_until_ready


def test_models_tiny_builds_a_loadable_checkpoint(tmp_path: Path) -> None:
    r = nightread("models", "tiny", "--family", "smolvlm", "--out", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m" / "config.json").is_file()
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    bad = nightread("models", "tiny", "--family", "nope", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2
    assert "unknown family" in bad.stderr


def test_model_tiny_still_works_and_says_it_is_deprecated(tmp_path: Path) -> None:
    bad = nightread("model", "tiny", "--family", "nope", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2
    assert "use `nightread models tiny`" in bad.stderr
    assert "unknown family" in bad.stderr


def test_models_and_validate_refuse_bad_input_clearly(tmp_path: Path) -> None:
    env = {"NIGHTREAD_DATA_DIR": str(tmp_path)}
    db_upgrade(env)
    assert json.loads(nightread("models", "list", "--json", env=env).stdout) == []
    missing = nightread("models", "promote", "7", env=env)
    assert missing.returncode == 2
    assert "no model version 7" in missing.stderr
    no_set = nightread("validate", "--dataset", str(tmp_path / "nowhere"), env=env)
    assert no_set.returncode == 2
    assert "not a folder" in no_set.stderr


@pytest.mark.integration
def test_triton_serve_command(tmp_path: Path, tiny_model: Path) -> None:
    pytest.importorskip("pytriton")
    import urllib.request

    from tests.services import REPO, free_port

    http, grpc, metrics = free_port(), free_port(), free_port()
    env = {
        "NIGHTREAD_DATA_DIR": str(tmp_path),
        "NIGHTREAD_TRITON__HTTP_PORT": str(http),
        "NIGHTREAD_TRITON__GRPC_PORT": str(grpc),
        "NIGHTREAD_TRITON__METRICS_PORT": str(metrics),
        "NIGHTREAD_TRITON__REPOSITORY": str(REPO / "deploy" / "triton" / "model_repository"),
    }

    def ready() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/nightread_vlm/ready", timeout=2) as r:
            return bool(r.status == 200)

    serve_until_ready(["triton", "serve", "--model", str(tiny_model)], env, ready, timeout=300)
