"""flows/cli/rules.py: `nightread rules check`, `rules explain`, `render` and `inspect`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.unit.cli.invoke import nightread

ROOT = Path(__file__).resolve().parents[3]


def test_rules_check(tmp_path: Path) -> None:
    good = nightread("rules", "check", str(ROOT / "flows" / "rules" / "selection.yaml"))
    assert good.returncode == 0
    assert "8 rules, valid" in good.stdout
    bad_file = tmp_path / "rules.yaml"
    bad_file.write_text("rules: [{name: x, action: skip}]\n")
    bad = nightread("rules", "check", str(bad_file))
    assert bad.returncode == 2
    assert "needs a reason" in bad.stderr.replace("\n", " ")


def test_rules_explain_shows_what_a_study_would_send(tmp_path: Path, sample_pacs: Any) -> None:
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
        assert source.id is not None
        repo.register_studies(
            session=session,
            source_id=source.id,
            studies=[
                {"study_instance_uid": x.study_instance_uid, "number_of_instances": x.number_of_instances}
                for x in (ct, cr)
            ],
        )
        ct_id = repo.get_study(session=session, study_instance_uid=ct.study_instance_uid).id  # type: ignore[union-attr]
    engine.dispose()
    r = nightread("rules", "explain", ct.study_instance_uid, env=env)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "33 instances" in out
    assert out.count("send") == 3
    assert "localizer/scout" in out
    assert ct.study_instance_uid not in out, "instances are shown by hash"
    by_id = nightread("rules", "explain", str(ct_id), env=env)
    assert by_id.returncode == 0, by_id.stderr
    assert f"study {ct_id}: 33 instances" in by_id.stdout
    chest = nightread("rules", "explain", cr.study_instance_uid, env=env).stdout
    assert chest.count("selected (paired) (paired with") == 2, chest
    missing = nightread("rules", "explain", "999", env=env)
    assert missing.returncode == 1
    assert "no such study" in missing.stderr


def test_render_and_inspect_a_file_through_the_flows_pipeline(tmp_path: Path) -> None:
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    from integrations.imaging import png_to_array, render_version

    source = get_testdata_file("CT_small.dcm")
    assert isinstance(source, str)
    out = tmp_path / "ct.png"
    r = nightread("render", source, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"render version {render_version(512)}" in r.stdout.replace("\n", " ")
    assert "selected by rule 'ct-representative'" in r.stdout.replace("\n", " ")
    assert png_to_array(out.read_bytes()).shape == (128, 128, 3)
    name = str(dcmread(source).PatientName)
    shown = nightread("inspect", source)
    assert shown.returncode == 0
    assert "CT Image Storage" in shown.stdout
    assert name not in shown.stdout, "no identifiers by default"
    assert name in nightread("inspect", source, "--show-identifiers").stdout
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    bad = nightread("render", str(junk), "--out", str(tmp_path / "j.png"))
    assert bad.returncode == 1
    assert "failed" in bad.stderr


def test_render_without_a_frame_renders_the_flows_choice_not_frame_0(tmp_path: Path) -> None:
    """A multi-frame object: `render` without --frame gives the frame the flows would render."""
    from flows.rules.selection import load_rules, select_images
    from integrations.imaging import default_frame, png_to_array, read_instance_info
    from tests.unit.test_multiframe import enhanced_ct

    path = tmp_path / "multiframe.dcm"
    enhanced_ct([-80.0, -40.0, 0.0, 40.0, 80.0]).save_as(path, enforce_file_format=True)
    info = read_instance_info(path)
    (decision,) = select_images([info], load_rules())
    expected = default_frame(info.number_of_frames, decision.frames if decision.selected else ())
    assert expected != 0
    pixels = {}
    for name, args in (("default", []), ("expected", ["--frame", str(expected)]), ("first", ["--frame", "0"])):
        out = tmp_path / f"{name}.png"
        r = nightread("render", str(path), "--out", str(out), *args)
        assert r.returncode == 0, r.stderr
        pixels[name] = png_to_array(out.read_bytes())
    assert (pixels["default"] == pixels["expected"]).all()
    assert not (pixels["default"] == pixels["first"]).all()
