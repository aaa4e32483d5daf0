"""PHI scan: a nightly over synthetic patients whose identifiers are distinctive, with failures provoked
(two corrupt instances, a study the PACS under-delivers, an unreachable PACS), then every place a run
leaves text is searched for the patients' names, IDs, birth dates and accession numbers, and for the
studies' UIDs.

Where the data model keeps identifiers on purpose (docs/security.md):
- patient name, patient ID and accession number: `study_identity`, and only with
  `review.show_patient_identifiers` on (this run turns it on, so the scan also proves it can see them);
- UIDs: the Study, Series and SOP Instance UID columns of `study` and `image` (the keys that make runs
  idempotent and find a study in the PACS again).
Nowhere else: not in log records, stderr, Prefect's database (parameters, states, logs, events), object
keys, failure rows or any other column. (The SR objects carry the patient module by design: they go back
to the PACS; object contents are not scanned, object keys are.)

The scanner itself is tested with planted leaks below: it finds each one, in each kind of place.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterable
from contextlib import closing
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlmodel import Session, select

from db import repository as repo
from db.migrate import upgrade
from db.models import Failure, Run, Study, StudyIdentity
from db.session import make_engine, session_scope
from flows.nightly import run_nightly
from integrations.imaging import values_of
from integrations.ports import ObjectStore
from integrations.sample_pacs import SamplePacs, SampleStudy, generate_studies
from integrations.storage import LocalObjectStore
from tests.leak_scan import (
    Hit,
    SyntheticPatient,
    database_texts,
    find,
    flush_prefect_logs,
    log_texts,
    prefect_database,
    prefect_logs_stored,
    sqlite_texts,
    text_columns,
)
from tests.services import wait_until

# the columns that hold identifiers by design, and the only ones a scan of nightread's database skips
IDENTIFIER_COLUMNS = frozenset(
    {"study_identity.patient_name", "study_identity.patient_id", "study_identity.accession_number"}
)
UID_COLUMNS = frozenset(
    {"study.study_instance_uid", "image.sop_instance_uid", "image.series_instance_uid", "image.paired_sop_instance_uid"}
)


def scan(
    *,
    records: Iterable[logging.LogRecord],
    stderr: str,
    prefect_db: Path,
    store: ObjectStore,
    engine: Engine,
    phi: Iterable[str],
    uids: Iterable[str],
) -> list[Hit]:
    """Hits of patient identifiers and UIDs wherever they must not be."""
    phi, uids = list(phi), list(uids)
    outside = [
        *log_texts(records),
        ("stderr", stderr),
        *sqlite_texts(prefect_db),
        *(("object key", key) for key in store.list("")),
    ]
    return [
        *find(outside, [*phi, *uids]),
        *find(database_texts(engine, skip=IDENTIFIER_COLUMNS), phi),
        *find(database_texts(engine, skip=UID_COLUMNS), uids),
    ]


def phi_studies() -> tuple[list[SampleStudy], dict[str, SyntheticPatient]]:
    """Small synthetic studies (two corrupt instances among them), each of a patient of its own with
    distinctive identifiers; the patients by Study Instance UID."""
    studies = generate_studies(seed=23, include_corrupt=True, xr_size=256, ct_slices=8, ct_size=128)
    patients = {}
    for n, study in enumerate(studies, 1):
        p = patients[study.study_instance_uid] = SyntheticPatient.number(n)
        for ds in study.instances:
            ds.PatientName = p.name
            ds.PatientID = p.patient_id
            ds.PatientBirthDate = p.birth_date
            ds.AccessionNumber = p.accession
            ds.StudyID = p.accession[-8:]
    return studies, patients


def needles(studies: list[SampleStudy], patients: dict[str, SyntheticPatient]) -> tuple[list[str], list[str]]:
    """(patient identifiers in every form, the studies' Study/Series/SOP Instance UIDs)"""
    phi = [needle for p in patients.values() for needle in p.needles()]
    keys = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    uids = sorted({str(ds.get(k)) for st in studies for ds in st.instances for k in keys})
    return phi, uids


class UnderDeliveringArchive:
    """C-FIND announces one CT instance more than C-GET sends: that study fails as incomplete."""

    def __init__(self, archive):  # type: ignore[no-untyped-def]
        self._archive = archive

    def __getattr__(self, name):  # type: ignore[no-untyped-def]
        return getattr(self._archive, name)

    def find(self, identifier):  # type: ignore[no-untyped-def]
        for ds in self._archive.find(identifier):
            if "NumberOfStudyRelatedInstances" in ds and "CT" in values_of(ds.get("ModalitiesInStudy")):
                ds.NumberOfStudyRelatedInstances = int(ds.NumberOfStudyRelatedInstances) + 1
            yield ds


def sources(pacs: SamplePacs) -> list[dict[str, object]]:
    """The sample PACS (reports written back to it) and one nobody answers at."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = int(sock.getsockname()[1])
    return [
        {"name": "sample", "port": pacs.port, "called_ae": pacs.ae_title, "write_back": True},
        {"name": "down", "port": closed, "timeout_s": 2},
    ]


def check_failures_and_identities(
    engine: Engine, studies: list[SampleStudy], patients: dict[str, SyntheticPatient]
) -> Run:
    """The provoked failures were recorded, identities kept for the studies that were read; the run."""
    with Session(engine) as s:
        failures = s.exec(select(Failure)).all()
        identities = s.exec(select(StudyIdentity)).all()
        run = s.exec(select(Run)).one()
    assert sorted(f.stage for f in failures) == ["discover", "render", "render", "study"]
    read = [st for st in studies if st.header.Modality != "CT"]  # the CT study failed before it was read
    assert {i.patient_name for i in identities} == {patients[st.study_instance_uid].name for st in read}
    return run


def check_scan_sees_the_identifier_columns(engine: Engine, phi: list[str], uids: list[str]) -> None:
    """Unskipped, the scan finds the identifiers exactly where the data model keeps them."""
    assert {h.where for h in find(database_texts(engine), phi)} == {f"db:{c}" for c in IDENTIFIER_COLUMNS}
    assert {h.where for h in find(database_texts(engine), uids)} <= {f"db:{c}" for c in UID_COLUMNS}
    assert text_columns(engine) >= IDENTIFIER_COLUMNS | UID_COLUMNS, "the allowed columns exist as named"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_no_phi_in_logs_prefect_objects_or_failures(prefect_harness, make_settings, caplog):
    """The nightly flow in this process: every log record (DEBUG and up) and the Prefect test server's
    database."""
    studies, patients = phi_studies()
    phi, uids = needles(studies, patients)
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="prefect")  # every run log line reaches Prefect's log table too
    with SamplePacs(studies=studies) as pacs:
        pacs.archive = UnderDeliveringArchive(pacs.archive)
        settings = make_settings(sources=sources(pacs), flow={"retries": 0}, review={"show_patient_identifiers": True})
        upgrade(settings.database_url)
        result = run_nightly(settings)
    counts = (result["studies_done"], result["studies_failed"], result["sources_failed"], result["failed"])
    assert counts == (4, 1, 1, 2)
    engine = make_engine(settings.database_url)
    run = check_failures_and_identities(engine, studies, patients)
    flush_prefect_logs()
    db = prefect_database()
    wait_until(
        lambda: prefect_logs_stored(db, run.flow_run_id or "", "RetrievalIncomplete"),
        timeout=60,
        what="the run's logs in Prefect's database",
    )
    assert any("not rendered" in r.getMessage() for r in caplog.records)
    store = LocalObjectStore(settings.storage_root)
    assert len(list(store.list(""))) > 10

    hits = scan(records=caplog.records, stderr="", prefect_db=db, store=store, engine=engine, phi=phi, uids=uids)
    assert not hits, "\n".join(map(str, hits))
    check_scan_sees_the_identifier_columns(engine, phi, uids)
    engine.dispose()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_no_phi_in_what_nightread_run_prints_or_its_prefect_keeps(tmp_path, tiny_model):
    """`nightread run` as a user starts it: its stdout and stderr (Prefect's console at DEBUG), and the
    database of the Prefect API it starts itself."""
    studies, patients = phi_studies()
    phi, uids = needles(studies, patients)
    data, prefect_home = tmp_path / "data", tmp_path / "prefect-home"
    with SamplePacs(studies=studies) as pacs:
        pacs.archive = UnderDeliveringArchive(pacs.archive)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "PREFECT_SERVER_DATABASE"))},
            "PREFECT_HOME": str(prefect_home),
            "PREFECT_LOGGING_LEVEL": "DEBUG",
            "NIGHTREAD_DATA_DIR": str(data),
            "NIGHTREAD_SOURCES": json.dumps(sources(pacs)),
            "NIGHTREAD_FLOW__RETRIES": "0",
            "NIGHTREAD_REVIEW__SHOW_PATIENT_IDENTIFIERS": "true",
            "NIGHTREAD_INFERENCE__MODEL": str(tiny_model),
            "HF_HUB_OFFLINE": "1",
        }
        nightread = str(Path(sys.executable).parent / "nightread")
        subprocess.run([nightread, "db", "upgrade"], env=env, capture_output=True, timeout=120, check=True)
        done = subprocess.run(
            [nightread, "run"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "discovery in source down failed" in done.stderr
    assert "RetrievalIncomplete" in done.stderr
    engine = make_engine(f"sqlite:///{data / 'nightread.db'}")
    run = check_failures_and_identities(engine, studies, patients)
    prefect_db = prefect_home / "prefect.db"
    assert prefect_logs_stored(prefect_db, run.flow_run_id or "", "RetrievalIncomplete")
    store = LocalObjectStore(data / "objects")
    assert len(list(store.list(""))) > 10

    output = f"{done.stdout}\n{done.stderr}"
    hits = scan(records=[], stderr=output, prefect_db=prefect_db, store=store, engine=engine, phi=phi, uids=uids)
    assert not hits, "\n".join(map(str, hits))
    check_scan_sees_the_identifier_columns(engine, phi, uids)
    engine.dispose()


# --- the scanner finds planted leaks ---------------------------------------------------------------------

PLANTED = SyntheticPatient.number(42)


def test_needles_cover_the_forms_a_value_leaks_in():
    needles = PLANTED.needles()
    formatted_name = f"{PLANTED.family}, {PLANTED.given}"  # PN rendered for people
    iso_birth = f"{PLANTED.birth_date[:4]}-{PLANTED.birth_date[4:6]}-{PLANTED.birth_date[6:]}"
    for text in (formatted_name, iso_birth, PLANTED.patient_id.lower(), f"acc={PLANTED.accession}"):
        assert find([("x", text)], needles), text
    assert not find([("x", "study 7 failed: pixel data could not be decoded")], needles)


def test_scan_catches_each_kind_of_planted_leak(tmp_path, caplog, capfd):
    url = f"sqlite:///{tmp_path / 'nightread.db'}"
    upgrade(url)
    engine = make_engine(url)
    store = LocalObjectStore(tmp_path / "objects")
    prefect_db = tmp_path / "prefect.db"
    with closing(sqlite3.connect(prefect_db)) as conn, conn:
        conn.execute("CREATE TABLE flow_run (id TEXT, parameters JSON, state BLOB)")
        conn.execute("INSERT INTO flow_run VALUES ('a', '{}', NULL)")
    uid = "1.2.826.0.1.3680043.10.1071.4242"

    def places() -> set[str]:
        hits = scan(
            records=caplog.records,
            stderr=capfd.readouterr().err,
            prefect_db=prefect_db,
            store=store,
            engine=engine,
            phi=PLANTED.needles(),
            uids=[uid],
        )
        return {h.where for h in hits}

    assert places() == set()
    # the same values where the data model keeps them are no leak
    with session_scope(engine) as session:
        source = repo.upsert_source(session=session, name="s", kind="dimse")
        assert source.id is not None
        repo.register_studies(
            session=session,
            source_id=source.id,
            studies=[{"study_instance_uid": uid, "study_date": "20240101", "accession_number": PLANTED.accession}],
        )
        study = session.exec(select(Study).where(Study.study_instance_uid == uid)).one()
        assert study.id is not None
        repo.save_study_identity(
            session=session,
            study_id=study.id,
            values={"patient_name": PLANTED.name, "patient_id": PLANTED.patient_id, "accession_number": None},
        )
    assert places() == set()

    logging.getLogger("flows.planted").warning("study for %s failed", PLANTED.name)
    assert places() == {"log:flows.planted"}
    caplog.clear()
    try:
        raise ValueError(f"bad header of {PLANTED.patient_id}")
    except ValueError:
        logging.getLogger("flows.planted").exception("study 7 failed")  # the PHI is in the traceback only
    assert places() == {"log:flows.planted"}
    caplog.clear()

    sys.stderr.write(f"birth date {PLANTED.birth_date}\n")
    assert places() == {"stderr"}

    with closing(sqlite3.connect(prefect_db)) as conn, conn:
        conn.execute("INSERT INTO flow_run VALUES ('b', ?, ?)", (f'{{"who": "{PLANTED.family}"}}', uid.encode()))
    assert places() == {"prefect.db:flow_run.parameters", "prefect.db:flow_run.state"}
    with closing(sqlite3.connect(prefect_db)) as conn, conn:
        conn.execute("DELETE FROM flow_run WHERE id = 'b'")

    store.put(f"images/{PLANTED.accession}/f0.png", b"\x89PNG")
    assert places() == {"object key"}
    store.delete(f"images/{PLANTED.accession}/f0.png")

    with session_scope(engine) as session:
        repo.record_failure(session=session, stage="read", object_ref=f"uid:{uid}", error=f"{PLANTED.name}: bad")
    assert places() == {"db:failure.object_ref", "db:failure.message"}
    engine.dispose()
