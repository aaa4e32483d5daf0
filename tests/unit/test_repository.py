"""Repository upserts on a migrated SQLite database: every re-run writes nothing twice."""

from __future__ import annotations

import pytest
from sqlmodel import func, select

from db import repository as repo
from db.migrate import current_revision, head_revision, upgrade
from db.models import Caption, Failure, Finding, Image, ModelVersion, PacsSource, Study, utcnow
from db.session import make_engine, session_scope


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def engine(request, tmp_path):
    """The same repository tests on SQLite and on a real Postgres."""
    url = (
        f"sqlite:///{tmp_path / 'db.sqlite'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    )
    upgrade(url)
    eng = make_engine(url)
    yield eng
    eng.dispose()


def count(session, model) -> int:
    return session.exec(select(func.count()).select_from(model)).one()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def test_migrations_reach_head_and_rerun_cleanly(tmp_path, backend, request):
    url = f"sqlite:///{tmp_path / 'x.sqlite'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    upgrade(url)
    upgrade(url)  # already at head: a no-op
    eng = make_engine(url)
    assert current_revision(eng) == head_revision()
    eng.dispose()


def _seed(session):
    src = repo.upsert_source(session=session, name="pacs", kind="dimse", ae_title="P", host="h", port=1)
    new = repo.register_studies(
        session=session,
        source_id=src.id,
        studies=[
            {
                "study_instance_uid": "1.2.3",
                "study_date": "20260101",
                "study_time": "101500",
                "accession_number": "ACC1",
                "modalities": ("CR",),
                "number_of_instances": 2,
            },
        ],
    )
    study = session.exec(select(Study)).one()
    return src, new, study


def test_register_studies_is_idempotent_and_hashes_accession(engine):
    with session_scope(engine) as s:
        src, new, study = _seed(s)
        assert new == 1
        assert study.accession_hash
        assert "ACC1" not in study.accession_hash
        again = repo.register_studies(session=s, source_id=src.id, studies=[{"study_instance_uid": "1.2.3"}])
        assert again == 0
        assert count(s, Study) == 1


def test_cursor_only_moves_forward(engine):
    with session_scope(engine) as s:
        src, _, _ = _seed(s)
        repo.move_cursor(session=s, source_id=src.id, date="20260105", time="080000")
        repo.move_cursor(session=s, source_id=src.id, date="20260101", time="235959")
        got = s.get(PacsSource, src.id)
        assert (got.cursor_date, got.cursor_time) == ("20260105", "080000")


def test_source_upsert_updates_connection_not_cursor(engine):
    with session_scope(engine) as s:
        src, _, _ = _seed(s)
        repo.move_cursor(session=s, source_id=src.id, date="20260105", time="080000")
    with session_scope(engine) as s:
        again = repo.upsert_source(session=s, name="pacs", kind="dimse", ae_title="P2", host="h2", port=2)
        assert again.id == src.id
        assert again.host == "h2"
        assert again.cursor_date == "20260105"
        assert count(s, PacsSource) == 1


def test_images_captions_findings_write_nothing_twice(engine):
    with session_scope(engine) as s:
        _, _, study = _seed(s)
        values = {
            "study_id": study.id,
            "sop_instance_uid": "1.2.3.4",
            "series_instance_uid": "1.2.3.5",
            "modality": "CR",
            "frame": 0,
            "render_version": "r1-512",
            "object_key": "images/a/b/f0.png",
            "sha256": "0" * 64,
            "width": 10,
            "height": 10,
            "created_at": utcnow(),
        }
        image_id = repo.upsert_image(session=s, values=values)
        assert repo.upsert_image(session=s, values=values) == image_id
        mv = repo.upsert_model_version(session=s, name="m", revision="r", backend="local", options={"dtype": "f32"})
        assert (
            repo.upsert_model_version(session=s, name="m", revision="r", backend="local", options={"dtype": "f32"}).id
            == mv.id
        )
        cap = {
            "image_id": image_id,
            "model_version_id": mv.id,
            "prompt_version": "p1",
            "render_version": "r1-512",
            "text": "a chest",
            "latency_ms": 1.0,
            "created_at": utcnow(),
        }
        finding = {
            "study_id": study.id,
            "image_id": image_id,
            "model_version_id": mv.id,
            "question_id": "q1",
            "bank_version": "b1",
            "prompt_version": "p1",
            "render_version": "r1-512",
            "kind": "closed",
            "answer": "yes",
            "probability": 0.9,
            "flagged": True,
            "flag_reason": "x",
            "created_at": utcnow(),
        }
        assert repo.insert_captions(session=s, rows=[cap]) == 1
        assert repo.insert_findings(session=s, rows=[finding]) == 1
        assert repo.insert_captions(session=s, rows=[cap]) == 0
        assert repo.insert_findings(session=s, rows=[finding, finding]) == 0
        state = repo.annotation_state(session=s, image_ids=[image_id], model_version_id=mv.id, bank_version="b1")
        assert state == ({image_id}, {image_id})
        state = repo.annotation_state(session=s, image_ids=[image_id], model_version_id=mv.id, bank_version="b9")
        assert state == (set(), {image_id}), "a new bank version: captioned, not yet answered"
        # a new bank version is new work
        assert repo.insert_findings(session=s, rows=[{**finding, "bank_version": "b2"}]) == 1
        assert (count(s, Image), count(s, Caption), count(s, Finding), count(s, ModelVersion)) == (1, 1, 2, 1)


def test_failures_count_attempts_and_resolve(engine):
    with session_scope(engine) as s:
        repo.record_failure(session=s, stage="render", object_ref="sop:abc:f0", error=ValueError("bad pixels"))
        repo.record_failure(session=s, stage="render", object_ref="sop:abc:f0", error=ValueError("bad pixels"))
        (f,) = s.exec(select(Failure)).all()
        assert (f.attempts, f.error_class, f.message, f.resolved) == (2, "ValueError", "bad pixels", False)
        assert repo.status_counts(session=s)["failures"] == 1
        repo.resolve_failures(session=s, stage="render", object_ref="sop:abc:f0")
    with session_scope(engine) as s:
        assert repo.status_counts(session=s)["failures"] == 0


def test_pending_studies_respects_attempts(engine):
    with session_scope(engine) as s:
        _, _, study = _seed(s)
        assert [x.id for x in repo.pending_studies(session=s, max_attempts=3)] == [study.id]
        repo.update_study(session=s, study_id=study.id, attempts=3, status="incomplete")
        assert repo.pending_studies(session=s, max_attempts=3) == []
        with pytest.raises(AttributeError, match="no column"):
            repo.update_study(session=s, study_id=study.id, colour="blue")


def test_status_counts_and_runs(engine):
    with session_scope(engine) as s:
        _seed(s)
        run_id = repo.start_run(session=s, kind="nightly", parameters={}, flow_run_id="abc")
        repo.finish_run(session=s, run_id=run_id, status="completed", counts={"new": 1})
        data = repo.status_counts(session=s)
    assert data["studies"] == {"total": 1, "new": 1}
    assert data["last_run"]["status"] == "completed"
    assert data["last_run"]["counts"] == {"new": 1}


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def test_models_match_the_migrations(tmp_path, backend, request):
    """Alembic's autogenerate finds nothing to add: the tables and the migrations agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlmodel import SQLModel

    url = f"sqlite:///{tmp_path / 'x.sqlite'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    upgrade(url)
    eng = make_engine(url)
    with eng.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), SQLModel.metadata)
    eng.dispose()
    assert diff == []


def test_every_status_value_fits_its_column(engine):
    with session_scope(engine) as s:
        run_id = repo.start_run(session=s, kind="nightly", parameters={}, flow_run_id=None)
        repo.finish_run(session=s, run_id=run_id, status="completed_with_failures", counts={})
        _, _, study = _seed(s)
        for status in ("new", "incomplete", "done", "failed"):
            repo.update_study(session=s, study_id=study.id, status=status)
            s.flush()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def test_upgrade_from_the_first_revision_keeps_data(tmp_path, backend, request):
    """A database with rows at revision 0001 upgrades to head; nothing stored is lost."""
    from sqlalchemy import text

    url = f"sqlite:///{tmp_path / 'old.sqlite'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    upgrade(url, "0001")
    eng = make_engine(url)
    now = utcnow()
    with eng.begin() as conn:
        conn.execute(text("INSERT INTO pacs_source (name, kind, updated_at) VALUES ('p', 'dimse', :t)"), {"t": now})
        conn.execute(
            text(
                "INSERT INTO study (study_instance_uid, source_id, modalities, status, attempts, created_at,"
                " updated_at) VALUES ('1.2', 1, 'CT', 'done', 1, :t, :t)"
            ),
            {"t": now},
        )
    upgrade(url)
    assert current_revision(eng) == head_revision()
    with session_scope(eng) as s:
        source = s.exec(select(PacsSource)).one()
        assert source.enabled is True
        assert source.config is None
        assert s.exec(select(Study)).one().source_id == source.id
    eng.dispose()


def test_sqlite_migration_engine_rolls_back_ddl(tmp_path):
    """A migration that fails half way leaves no half-built table behind."""
    from sqlalchemy import inspect, text

    eng = make_engine(f"sqlite:///{tmp_path / 'ddl.sqlite'}", foreign_keys=False)

    def half_migration() -> None:
        with eng.begin() as conn:
            conn.execute(text("CREATE TABLE half_built (id INTEGER)"))
            raise RuntimeError("the migration fails here")

    with pytest.raises(RuntimeError):
        half_migration()
    assert "half_built" not in inspect(eng).get_table_names()
    eng.dispose()
