"""The CLI as a user runs it: a real subprocess of the installed `nightread` script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from db.migrate import head_revision

NIGHTREAD = str(Path(sys.executable).parent / "nightread")


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [NIGHTREAD, *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        check=False,
        input=stdin if stdin is not None else "",
    )


def test_help_lists_the_commands():
    out = run("--help").stdout
    for command in ("demo", "run", "config", "db", "status", "sample-pacs", "model"):
        assert command in out


def test_config_masks_secrets(tmp_path):
    r = run(
        "config",
        env={
            "NIGHTREAD_DATA_DIR": str(tmp_path),
            "NIGHTREAD_STORAGE__SECRET_KEY": "topsecret",
            "NIGHTREAD_DATABASE__URL": "postgresql+psycopg://u:pw123@h/db",
        },
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["storage"]["secret_key"] == "**********"
    assert data["database"]["url"] == "postgresql+psycopg://u:***@h/db"
    assert "topsecret" not in r.stdout
    assert "pw123" not in r.stdout


def test_invalid_setting_is_named(tmp_path):
    r = run("config", env={"NIGHTREAD_PACS__RETRIEVE": "teleport"})
    assert r.returncode == 2
    assert "NIGHTREAD_PACS__RETRIEVE" in r.stderr


def test_status_needs_a_migrated_database_then_reports_json(tmp_path):
    env = {"NIGHTREAD_DATA_DIR": str(tmp_path)}
    r = run("status", env=env)
    assert r.returncode == 1
    assert "nightread db upgrade" in r.stderr
    r = run("db", "upgrade", env=env)
    assert r.returncode == 0, r.stderr
    assert f"at revision {head_revision()}" in r.stdout
    assert run("db", "upgrade", env=env).returncode == 0  # up to date: a no-op
    data = json.loads(run("status", "--json", env=env).stdout)
    assert data["studies"] == {"total": 0}
    assert data["last_run"] is None


@pytest.mark.slow
def test_demo_runs_end_to_end_and_twice(tmp_path, tiny_model):
    env = {"NIGHTREAD_INFERENCE__MODEL": str(tiny_model), "HF_HUB_OFFLINE": "1"}
    first = run("demo", "--data-dir", str(tmp_path / "d"), env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    for label in ("studies found", "images rendered", "captions", "findings", "flags", "failures", "wall time"):
        assert label in first.stdout
    assert str(tmp_path / "d" / "objects") in first.stdout.replace("\n", "")
    status = json.loads(run("status", "--json", env={**env, "NIGHTREAD_DATA_DIR": str(tmp_path / "d")}).stdout)
    assert status["studies"]["done"] == 5
    assert (status["captions"], status["images"]) == (12, 18)  # CT slices in 3 windows, one caption each
    second = run("demo", "--data-dir", str(tmp_path / "d"), env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads(run("status", "--json", env={**env, "NIGHTREAD_DATA_DIR": str(tmp_path / "d")}).stdout)
    assert {k: again[k] for k in ("images", "captions", "findings")} == {
        k: status[k] for k in ("images", "captions", "findings")
    }


def test_model_tiny_builds_a_loadable_checkpoint(tmp_path):
    r = run("model", "tiny", "--family", "smolvlm", "--out", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m" / "config.json").is_file()
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    bad = run("model", "tiny", "--family", "nope", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2
    assert "unknown family" in bad.stderr


def test_sources_add_list_disable(tmp_path):
    env = {"NIGHTREAD_DATA_DIR": str(tmp_path)}
    r = run(
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
    r = run(
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
    rows = {row["name"]: row for row in json.loads(run("sources", "list", "--json", env=env).stdout)}
    assert set(rows) == {"sample-pacs", "west", "east"}  # the configured one is listed too
    assert rows["east"]["address"] == "EASTPACS@10.0.0.5:104"
    assert rows["east"]["retrieve"] == "move"
    assert rows["east"]["receiver"] == "pynetdicom"
    assert rows["sample-pacs"]["receiver"] == "direct"
    assert rows["west"]["kind"] == "dicomweb"
    assert run("sources", "disable", "west", env=env).returncode == 0
    assert run("sources", "disable", "sample-pacs", env=env).returncode == 0
    rows = {row["name"]: row for row in json.loads(run("sources", "list", "--json", env=env).stdout)}
    assert rows["west"]["enabled"] is False
    assert rows["sample-pacs"]["enabled"] is False, "listing (which syncs settings) keeps it disabled"
    missing = run("sources", "disable", "nowhere", env=env)
    assert missing.returncode == 1
    assert "no source named" in missing.stderr
    bad = run("sources", "add", "x", "--kind", "dicomweb", env=env)
    assert bad.returncode == 2
    assert "needs a url" in bad.stderr
    bad = run("sources", "add", "y", "--retrieve", "teleport", env=env)
    assert bad.returncode == 2
    assert "retrieve" in bad.stderr
    bad = run("sources", "add", "z", "--dimse-receiver", "fast", env=env)
    assert bad.returncode == 2
    assert "dimse_receiver" in bad.stderr


def _serve(args: list[str], env: dict[str, str], ready, timeout: float = 120.0) -> None:
    """Start a long-running `nightread` command, poll `ready()` until it answers, then stop it with Ctrl-C."""
    import signal
    import time

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
        proc.wait(timeout=60)
    assert proc.returncode == 0


def test_sample_pacs_command_answers_echo_and_find(tmp_path):
    from integrations.pacs import DimseStudySource
    from tests.services import free_port

    port = free_port()
    src = DimseStudySource(name="s", host="127.0.0.1", port=port, called_ae="SAMPLEPACS", timeout_s=2)
    found = []

    def ready() -> bool:
        src.echo()
        found.extend(src.find_studies(since=None))
        return True

    _serve(["sample-pacs", "--port", str(port)], {}, ready)
    assert len(found) == 5


@pytest.mark.integration
def test_triton_serve_command(tmp_path, tiny_model):
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
            return r.status == 200

    _serve(["triton", "serve", "--model", str(tiny_model)], env, ready, timeout=300)


def test_render_and_inspect_a_file_through_the_flows_pipeline(tmp_path):
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    from integrations.imaging import png_to_array

    source = get_testdata_file("CT_small.dcm")
    out = tmp_path / "ct.png"
    r = run("render", source, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "render version r1-512" in r.stdout.replace("\n", " ")
    assert "selected by rule 'ct-representative'" in r.stdout.replace("\n", " ")
    assert png_to_array(out.read_bytes()).shape == (128, 128, 3)
    name = str(dcmread(source).PatientName)
    shown = run("inspect", source)
    assert shown.returncode == 0
    assert "CT Image Storage" in shown.stdout
    assert name not in shown.stdout, "no identifiers by default"
    assert name in run("inspect", source, "--show-identifiers").stdout
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    bad = run("render", str(junk), "--out", str(tmp_path / "j.png"))
    assert bad.returncode == 1
    assert "failed" in bad.stderr


def test_rules_check(tmp_path):
    good = run("rules", "check", str(Path(__file__).resolve().parents[2] / "flows" / "rules" / "selection.yaml"))
    assert good.returncode == 0
    assert "8 rules, valid" in good.stdout
    bad_file = tmp_path / "rules.yaml"
    bad_file.write_text("rules: [{name: x, action: skip}]\n")
    bad = run("rules", "check", str(bad_file))
    assert bad.returncode == 2
    assert "needs a reason" in bad.stderr.replace("\n", " ")


def test_rules_explain_shows_what_a_study_would_send(tmp_path, sample_pacs):
    import datetime as dt

    from db import repository as repo
    from db.migrate import upgrade
    from db.session import make_engine, session_scope
    from flows.wiring.runtime import source_row
    from flows.wiring.settings import NightreadSettings
    from integrations.pacs import DimseStudySource

    env = {"NIGHTREAD_DATA_DIR": str(tmp_path), "NIGHTREAD_PACS__PORT": str(sample_pacs.port), "COLUMNS": "250"}
    settings = NightreadSettings(data_dir=tmp_path, pacs={"port": sample_pacs.port})
    upgrade(settings.database_url)
    src = DimseStudySource(name="s", host="127.0.0.1", port=sample_pacs.port, called_ae="SAMPLEPACS")
    found = src.find_studies(since=dt.datetime(2000, 1, 1))
    ct = next(r for r in found if r.modalities == ("CT",))
    cr = next(r for r in found if r.modalities == ("CR",))
    engine = make_engine(settings.database_url)
    with session_scope(engine) as session:
        source = repo.upsert_source(session=session, **source_row(settings.pacs))
        repo.register_studies(
            session=session,
            source_id=source.id,
            studies=[
                {"study_instance_uid": x.study_instance_uid, "number_of_instances": x.number_of_instances}
                for x in (ct, cr)
            ],
        )
    engine.dispose()
    r = run("rules", "explain", ct.study_instance_uid, env=env)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "33 instances" in out
    assert out.count("send") == 3
    assert "localizer/scout" in out
    assert ct.study_instance_uid not in out, "instances are shown by hash"
    chest = run("rules", "explain", cr.study_instance_uid, env=env).stdout
    assert chest.count("selected (paired) (paired with") == 2, chest
    assert run("rules", "explain", "999", env=env).returncode == 1


def test_users_and_audit_export(tmp_path):
    import csv

    from db import reviews
    from db.session import make_engine, session_scope
    from review.auth import verify_password

    env = {"NIGHTREAD_DATA_DIR": str(tmp_path)}
    ok = run("users", "add", "rita", "--role", "reviewer", "--password-stdin", env=env, stdin="s3cret-enough\n")
    assert ok.returncode == 0, ok.stderr
    assert run("users", "add", "rita", "--password-stdin", env=env, stdin="another-one\n").returncode == 2
    short = run("users", "add", "bob", "--password-stdin", env=env, stdin="short\n")
    assert short.returncode == 2
    assert "at least 8" in short.stderr
    bad_role = run("users", "add", "bob", "--role", "boss", "--password-stdin", env=env, stdin="long enough\n")
    assert bad_role.returncode == 2
    assert "unknown role" in bad_role.stderr
    listed = json.loads(run("users", "list", "--json", env=env).stdout)
    assert [(u["name"], u["role"], u["disabled"]) for u in listed] == [("rita", "reviewer", False)]
    assert "s3cret" not in run("users", "list", env=env).stdout
    engine = make_engine(f"sqlite:///{tmp_path / 'nightread.db'}")
    with session_scope(engine) as session:
        user = reviews.get_user(session=session, name="rita")
        assert user is not None
        assert verify_password("s3cret-enough", user.password_hash)
        assert user.password_hash.startswith("$argon2id$")
    assert run("users", "disable", "rita", env=env).returncode == 0
    assert json.loads(run("users", "list", "--json", env=env).stdout)[0]["disabled"] is True
    assert run("users", "disable", "nobody", env=env).returncode == 2
    engine.dispose()
    out = tmp_path / "audit.csv"
    assert run("audit", "export", "--out", str(out), env=env).returncode == 0
    with out.open() as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames is not None
        assert "from_answer" in reader.fieldnames
        assert list(reader) == []


def test_cohort_export_from_the_cli(tmp_path):
    import pyarrow.parquet as pq

    from db.migrate import upgrade
    from db.session import make_engine
    from integrations.storage import LocalObjectStore
    from tests.review_seed import seed

    upgrade(f"sqlite:///{tmp_path / 'nightread.db'}")
    engine = make_engine(f"sqlite:///{tmp_path / 'nightread.db'}")
    seed(engine, LocalObjectStore(tmp_path / "objects"))
    engine.dispose()
    env = {"NIGHTREAD_DATA_DIR": str(tmp_path)}
    out = tmp_path / "x" / "cohort.parquet"
    r = run(
        "cohort",
        "--where",
        "pleural_effusion >= 0.8",
        "--per",
        "image",
        "--out",
        str(out),
        "--finetune",
        str(tmp_path / "ft"),
        "--answers",
        "model",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert "1 image(s) match" in r.stdout
    assert len((tmp_path / "ft" / "train.jsonl").read_text().splitlines()) == 1
    assert pq.read_table(out).num_rows == 1
    assert (tmp_path / "x" / "cohort.parquet.manifest.json").exists()
    import sqlite3

    with sqlite3.connect(tmp_path / "nightread.db") as conn:  # the export is in the audit log
        (detail,) = conn.execute("SELECT detail FROM audit_event WHERE action = 'cohort_exported'").fetchone()
    assert detail.startswith("1 image row(s); table=True finetune=True deid=False; where: pleural_effusion")
    bad = run("cohort", "--where", "pleural_effusion >= maybe", env=env)
    assert bad.returncode == 2
    assert "cohort expression" in bad.stderr


def test_backfill_models_and_validate_commands_refuse_bad_input_clearly(tmp_path):
    env = {"NIGHTREAD_DATA_DIR": str(tmp_path)}
    bad_date = run("backfill", "--from", "2024-02-30", "--to", "2024-03-01", env=env)
    assert bad_date.returncode == 2
    assert "YYYY-MM-DD" in bad_date.stderr
    backwards = run("backfill", "--from", "2024-03-02", "--to", "2024-03-01", env=env)
    assert backwards.returncode == 2
    assert "before its start" in backwards.stderr
    assert json.loads(run("models", "list", "--json", env=env).stdout) == []
    missing = run("models", "promote", "7", env=env)
    assert missing.returncode == 2
    assert "no model version 7" in missing.stderr
    no_set = run("validate", "--dataset", str(tmp_path / "nowhere"), env=env)
    assert no_set.returncode == 2
    assert "not a folder" in no_set.stderr
    assert run("deid", "reidentify", "NRP0000", env=env).returncode == 1
    bad_where = run("reannotate", "--where", "pneumothorax >=", env=env)
    assert bad_where.returncode == 2
    assert "ends too early" in bad_where.stderr


def test_every_command_is_registered_under_python_dash_m_too() -> None:
    """`python -m flows.cli` must see the same commands as `nightread` (the __main__ guard sits last)."""
    import subprocess
    import sys

    from flows.cli import app

    names = sorted(c.name or c.callback.__name__ for c in app.registered_commands)  # type: ignore[union-attr]
    groups = sorted(g.name for g in app.registered_groups if g.name)
    shown = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert len(names) + len(groups) >= 20
    missing = [n.replace("_", "-") for n in names + groups if n.replace("_", "-") not in shown and n not in shown]
    assert missing == []
    nested = subprocess.run(
        [sys.executable, "-m", "flows.cli", "users", "list", "--help"], capture_output=True, text=True, timeout=60
    )
    assert nested.returncode == 0, nested.stdout + nested.stderr
