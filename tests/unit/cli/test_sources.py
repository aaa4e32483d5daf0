"""flows/cli/sources.py: `nightread sources …`, `sample-pacs` and `listen`."""

from __future__ import annotations

import json
from pathlib import Path

from tests.unit.cli.invoke import db_upgrade, nightread, serve_until_ready


def test_sources_add_list_disable(tmp_path: Path) -> None:
    env = {"NIGHTREAD_DATA_DIR": str(tmp_path)}
    db_upgrade(env)
    r = nightread(
        "sources",
        "add",
        "west",
        "--kind",
        "dicomweb",
        "--url",
        "http://pacs-west:8042/dicom-web",
        "--modalities",
        "cr,dx",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    r = nightread(
        "sources",
        "add",
        "east",
        "--host",
        "10.0.0.5",
        "--port",
        "104",
        "--called-ae",
        "EASTPACS",
        "--retrieve",
        "move",
        "--move-port",
        "11113",
        "--dimse-receiver",
        "pynetdicom",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(nightread("sources", "list", "--json", env=env).stdout)}
    assert set(rows) == {"sample-pacs", "west", "east"}  # the configured one is listed too
    assert rows["east"]["address"] == "EASTPACS@10.0.0.5:104"
    assert rows["east"]["retrieve"] == "move"
    assert rows["east"]["receiver"] == "pynetdicom"
    assert rows["sample-pacs"]["receiver"] == "direct"
    assert rows["west"]["kind"] == "dicomweb"
    assert nightread("sources", "disable", "west", env=env).returncode == 0
    assert nightread("sources", "disable", "sample-pacs", env=env).returncode == 0
    rows = {row["name"]: row for row in json.loads(nightread("sources", "list", "--json", env=env).stdout)}
    assert rows["west"]["enabled"] is False
    assert rows["sample-pacs"]["enabled"] is False, "listing (which syncs settings) keeps it disabled"
    assert nightread("sources", "enable", "west", env=env).returncode == 0
    table = nightread("sources", "list", env={**env, "COLUMNS": "200"})
    assert "http://pacs-west:8042/dicom-web" in table.stdout
    missing = nightread("sources", "disable", "nowhere", env=env)
    assert missing.returncode == 1
    assert "no source named" in missing.stderr
    bad = nightread("sources", "add", "x", "--kind", "dicomweb", env=env)
    assert bad.returncode == 2
    assert "needs a url" in bad.stderr
    bad = nightread("sources", "add", "y", "--retrieve", "teleport", env=env)
    assert bad.returncode == 2
    assert "retrieve" in bad.stderr
    bad = nightread("sources", "add", "z", "--dimse-receiver", "fast", env=env)
    assert bad.returncode == 2
    assert "dimse_receiver" in bad.stderr


def test_sample_pacs_command_answers_echo_and_find() -> None:
    from integrations.pacs import DimseStudySource
    from tests.services import free_port

    port = free_port()
    src = DimseStudySource(name="s", host="127.0.0.1", port=port, called_ae="SAMPLEPACS", timeout_s=2)
    found = []

    def ready() -> bool:
        src.echo()
        found.extend(src.find_studies(since=None))
        return True

    serve_until_ready(["sample-pacs", "--port", str(port)], {}, ready)
    assert len(found) == 5


def test_listen_needs_an_allow_list_then_receives_until_stopped(tmp_path: Path) -> None:
    from integrations.pacs import DimseStudySource
    from tests.services import free_port

    env = {"NIGHTREAD_DATA_DIR": str(tmp_path)}
    db_upgrade(env)
    port = free_port()
    refused = nightread("listen", "--port", str(port), env=env)
    assert refused.returncode == 2
    assert "--allow" in refused.stderr

    modality = DimseStudySource(
        name="m", host="127.0.0.1", port=port, called_ae="NIGHTREAD", calling_ae="MODALITY1", timeout_s=2
    )

    def ready() -> bool:  # an allowed peer's C-ECHO is answered
        modality.echo()
        return True

    serve_until_ready(["listen", "--port", str(port), "--allow", "MODALITY1"], env, ready)
