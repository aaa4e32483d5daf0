from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from flows.wiring.settings import NightreadSettings, mask_url


def test_embedded_defaults_live_under_one_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("NIGHTREAD_DATABASE__URL", raising=False)
    s = NightreadSettings(data_dir=tmp_path)
    assert s.database_url == f"sqlite:///{tmp_path / 'nightread.db'}"
    assert s.storage_root == tmp_path / "objects"
    assert s.inference.backend == "local"
    assert s.inference.model == "HuggingFaceTB/SmolVLM-256M-Instruct"


def test_nested_environment_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("NIGHTREAD_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("NIGHTREAD_PACS__PORT", "4242")
    monkeypatch.setenv("NIGHTREAD_PACS__RETRIEVE", "move")
    monkeypatch.setenv("NIGHTREAD_PACS__MODALITIES", '["CR","DX"]')
    monkeypatch.setenv("NIGHTREAD_RENDER__MAX_LONG_EDGE", "256")
    s = NightreadSettings()
    assert (s.pacs.port, s.pacs.retrieve, s.pacs.modalities) == (4242, "move", ["CR", "DX"])
    assert s.render.max_long_edge == 256
    assert s.data_dir == tmp_path


def test_bad_value_names_the_field(monkeypatch):
    monkeypatch.setenv("NIGHTREAD_PACS__RETRIEVE", "teleport")
    with pytest.raises(ValidationError, match="retrieve"):
        NightreadSettings()


def test_ae_title_is_validated():
    with pytest.raises(ValidationError, match="AE title"):
        NightreadSettings(pacs={"calling_ae": "THIS-IS-FAR-TOO-LONG-FOR-DICOM"})


def test_masked_hides_secrets_and_passwords(tmp_path):
    s = NightreadSettings(
        data_dir=tmp_path,
        database={"url": "postgresql+psycopg://reader:hunter2@db.example/nightread"},
        storage={"backend": "s3", "secret_key": "s3cr3t", "access_key": "AK"},
    )
    text = str(s.masked())
    assert "hunter2" not in text
    assert "s3cr3t" not in text
    assert "reader:***@db.example" in text


def test_mask_url_leaves_urls_without_password():
    assert mask_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    assert mask_url("postgresql://u@h/db") == "postgresql://u@h/db"


def test_mask_url_hides_every_form_of_password():
    assert mask_url("postgresql://u:pa/ss@h:5432/db?sslmode=require") == "postgresql://u:***@h:5432/db?sslmode=require"
    assert mask_url("postgresql://u:p@ss@h/db") == "postgresql://u:***@h/db"  # an unencoded @ in the password
    assert mask_url("postgresql://u@h/db?sslmode=x&password=hunter2") == "postgresql://u@h/db?sslmode=x&password=***"
    assert mask_url("postgresql://:hunter2@h/db") == "postgresql://:***@h/db"


def test_database_url_is_secret_everywhere_but_the_engine(monkeypatch, tmp_path):
    """Settings are Prefect flow-run parameters: Prefect stores them as FastAPI's jsonable_encoder
    makes them, and they are printed in reprs, logs and errors."""
    from fastapi.encoders import jsonable_encoder

    url = "postgresql+psycopg://reader:hunter2@db.example/nightread"
    monkeypatch.setenv("NIGHTREAD_DATABASE__URL", url)
    s = NightreadSettings(data_dir=tmp_path)
    assert s.database_url == url
    for shown in (repr(s), str(s), s.model_dump_json(), json.dumps(jsonable_encoder(s)), str(s.masked())):
        assert "hunter2" not in shown
    assert s.masked()["database"]["url"] == "postgresql+psycopg://reader:***@db.example/nightread"


def test_validation_errors_do_not_echo_the_settings(monkeypatch):
    monkeypatch.setenv("NIGHTREAD_DATABASE__URL", "postgresql+psycopg://u:hunter2@h/db")
    monkeypatch.setenv("NIGHTREAD_STORAGE__SECRET_KEY", "s3cr3t")
    for bad in (
        {"sources": [{"name": "a"}, {"name": "a"}]},
        {"pacs": {"name": "a", "kind": "dicomweb", "token": "hunter2"}},  # short: its repr would not be cut
    ):
        with pytest.raises(ValidationError) as info:
            NightreadSettings(**bad)  # type: ignore[arg-type]
        assert "hunter2" not in str(info.value)
        assert "s3cr3t" not in str(info.value)


def test_ct_windows_setting(monkeypatch):
    monkeypatch.setenv("NIGHTREAD_RENDER__CT_WINDOWS", "[[-600,1500],[40,400],[400,1800]]")
    assert NightreadSettings().render.ct_windows == [(-600, 1500), (40, 400), (400, 1800)]
    monkeypatch.setenv("NIGHTREAD_RENDER__CT_WINDOWS", "[[-600,1500]]")
    assert NightreadSettings().render.ct_windows == [(-600, 1500)]
    for bad in ("[[-600,1500],[40,400]]", "[[40,0]]"):
        monkeypatch.setenv("NIGHTREAD_RENDER__CT_WINDOWS", bad)
        with pytest.raises(ValidationError, match="one \\[center, width\\] pair or three"):
            NightreadSettings()
