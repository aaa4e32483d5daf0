"""Postgres at 1,000 and at 1,000,000 studies: do a night's bookkeeping, the review queue's first page and a
cohort query cost the same when the database is a thousand times bigger?

A Postgres like the tests' (tests/services.py) gets one database per size, migrated to the latest revision
(db/migrate.py) and seeded with psycopg COPY from generated text streams, in the sample data's proportions
(the sample PACS's five studies, tests/unit/test_nightly.py): per five studies three chest radiographs (CR,
DX, DX: frontal + lateral, the 8 chest questions each, one caption each), a chest CT (3 slices, each rendered
in the 3 windows its questions need, one question per rendering, a caption on the default window) and a
brain MR (3 slices, 3 questions each, a caption each): 3.6 images, 13.2 findings and 2.4 captions a study.
P(yes) of a closed question is u³ (u uniform), so about 10 % of closed findings are flagged at the bank's
thresholds; a reviewer has decided on (or commented) a fifth of the flagged ones; 1 % of the studies
failed; 1,000 studies a day. Foreign-key triggers are off during the load (session_replication_role =
replica: the rows are consistent by construction), then each table is vacuumed and analysed.

Measured at both sizes, alternating rounds so the machine's load falls on both alike (medians):
- bookkeeping: a night's database work for new studies through the real functions, each step in its
  own transaction as the nightly runs it: register (one batch), the pending list, then per study claim,
  the retrieved count, model version, each rendering's upsert and its render failure resolved, the
  annotation state, captions and findings inserted, finish. Seconds per study.
- queue: the review page's default view, db/reviews.py `queue` (flagged first, critical questions first,
  highest P(yes) first, pending findings only, 25 a page) with its total counted up to COUNT_LIMIT
  (`count_limit`: "1,000+", as review/views.py counts it); also with the exact total (how the page
  counted before), and the counts over the queue (`queue_counts`) both ways. An exact total counts every
  pending finding.
- cohort: `run_cohort` with `COHORT` as the review API runs it (the bank's questions known), its first
  page (`--cohort-limit` studies); and, for information, per study at the API's default limit of 1000.

Run: `make bench-db` (`python -m tests.bench.db --explain` adds each statement's EXPLAIN ANALYZE; `--keep DIR`
keeps the databases for the next run). Last line, the largest size over the smallest:
`P5 bookkeeping_1m_vs_1k=<r> queue_1m_vs_1k=<r> cohort_1m_vs_1k=<r> queue_exact_total_1m_vs_1k=<r>
counts_1m_vs_1k=<r> counts_exact_1m_vs_1k=<r>`. Nothing is asserted.
"""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import argparse
import datetime as dt
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from tests.services import Postgres, free_port, pg_bin

STUDIES_PER_DAY = 1000
MIX = ("CR", "DX", "DX", "CT", "MR")  # the sample PACS's five studies, repeated
FAILED_EVERY = 100  # one study in a hundred failed
REVIEWED_SHARE = 0.2  # of flagged findings: a reviewer decided (or commented)
DECISIONS = (("confirm", 0.65), ("reject", 0.2), ("correct", 0.1), ("comment", 0.05))
COHORT = "modality = CT and ct_pleural_effusion >= 0.7"
COUNT_LIMIT = 1000  # the queue's total and counts counted up to this (db/reviews.py `count_limit`)
CHUNK = 20_000  # studies per COPY round
SEED_UID_ROOT = "1.2.826.0.1.3680043.10.1071.77."  # synthetic UIDs only
NEW_UID_ROOT = "1.2.826.0.1.3680043.10.1071.78."
MODEL = {"name": "bench-model", "revision": "fixed", "backend": "triton", "options": {"bench": "db"}}


# --- what a study holds ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendering:
    """One image row of a study: a rendering of one instance (in one CT window), its questions and caption."""

    instance: int  # which instance of the study (CT: one rendering per window)
    modality: str
    body_part: str
    view: str | None
    view_role: str | None
    paired_with: int | None  # the instance it is paired with (chest frontal + lateral)
    ct_window: str | None
    render_version: str
    questions: tuple[Any, ...]  # flows.rules.questions Question
    caption: bool


@dataclass(frozen=True)
class Shapes:
    """Every study kind's renderings, from the question bank (as the nightly would render and ask)."""

    by_modality: dict[str, tuple[Rendering, ...]]
    views: dict[int, tuple[str, str]]  # position in MIX -> (frontal view, lateral view)
    thresholds: dict[str, float | None]
    bank_version: str
    critical: tuple[str, ...]
    question_ids: tuple[str, ...]


def shapes() -> Shapes:
    from flows.rules.questions import load_bank
    from integrations.imaging import render_version, window_key

    bank = load_bank()
    rv = render_version(512)
    by: dict[str, tuple[Rendering, ...]] = {}
    for modality in ("CR", "DX"):
        by[modality] = tuple(
            Rendering(
                i,
                modality,
                "CHEST",
                None,
                role,
                1 - i,
                None,
                rv,
                bank.for_image(modality=modality, body_part="CHEST"),
                True,
            )
            for i, role in enumerate(("frontal", "lateral"))
        )
    windows = bank.ct_window_sets(body_part="CHEST", default_windows=[])
    by["CT"] = tuple(
        Rendering(
            s,
            "CT",
            "CHEST",
            None,
            None,
            None,
            window_key(w),
            render_version(512, w),
            bank.for_image(modality="CT", body_part="CHEST", ct_window=window_key(w), default_windows=""),
            not w,
        )
        for s in range(3)
        for w in windows
    )
    by["MR"] = tuple(
        Rendering(s, "MR", "BRAIN", None, None, None, None, rv, bank.for_image(modality="MR", body_part="BRAIN"), True)
        for s in range(3)
    )
    return Shapes(
        by_modality=by,
        views={0: ("PA", "LL"), 1: ("AP", "LL"), 2: ("PA", "LL")},
        thresholds={q.id: q.flag_threshold for q in bank.questions},
        bank_version=bank.version,
        critical=tuple(q.id for q in bank.questions if q.critical),
        question_ids=tuple(q.id for q in bank.questions),
    )


def study_kind(n: int, sh: Shapes) -> tuple[str, tuple[Rendering, ...], tuple[str, str] | None]:
    position = n % len(MIX)
    modality = MIX[position]
    return modality, sh.by_modality[modality], sh.views.get(position)


def answer(rng: random.Random, q: Any, threshold: float | None) -> tuple[str, float | None, bool, str | None]:
    """(answer, P(yes), flagged, flag reason) of one finding."""
    if q.kind != "closed":
        return "no acute abnormality described", None, False, None
    p = rng.random() ** 3
    flagged = threshold is not None and p >= threshold
    reason = f"P(yes)={p:.3f} >= threshold {threshold:.2f}" if flagged else None
    return ("yes" if p >= 0.5 else "no"), p, flagged, reason


# --- seeding with COPY -----------------------------------------------------------------------------------------

STUDY_COLUMNS = (
    "id, study_instance_uid, source_id, accession_hash, study_date, study_time, modalities, status, "
    "expected_instances, received_instances, attempts, last_error, created_at, updated_at"
)
IMAGE_COLUMNS = (
    "id, study_id, sop_instance_uid, series_instance_uid, modality, body_part, view, patient_position, ct_window, "
    "view_role, paired_sop_instance_uid, frame, render_version, object_key, sha256, width, height, created_at"
)
CAPTION_COLUMNS = "id, image_id, model_version_id, prompt_version, render_version, text, latency_ms, created_at"
FINDING_COLUMNS = (
    "id, study_id, image_id, model_version_id, question_id, bank_version, prompt_version, render_version, kind, "
    "answer, probability, flagged, flag_reason, created_at"
)
REVIEW_COLUMNS = "id, finding_id, user_id, decision, from_answer, to_answer, comment, created_at"
NULL = "\\N"


@dataclass
class Counters:
    image: int = 0
    caption: int = 0
    finding: int = 0
    review: int = 0


def _line(*values: object) -> str:
    return "\t".join(NULL if v is None else str(v) for v in values) + "\n"


def seed_chunk(first: int, last: int, *, total: int, sh: Shapes, ids: Counters, today: dt.date) -> dict[str, list[str]]:
    """COPY text rows of studies first..last-1 (0-based) and everything they hold."""
    rng = random.Random(first)
    out: dict[str, list[str]] = {"study": [], "image": [], "caption": [], "finding": [], "review": []}
    study, image, caption, finding, review = (out[k] for k in ("study", "image", "caption", "finding", "review"))
    mv, prompt = 1, "p1"
    for n in range(first, last):
        sid = n + 1
        day = today - dt.timedelta(days=1 + (total - 1 - n) // STUDIES_PER_DAY)
        seconds = 21600 + (n % STUDIES_PER_DAY) * 57  # 06:00 to 21:48
        at = f"{day.isoformat()} {seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}+00"
        uid = f"{SEED_UID_ROOT}{sid}"
        modality, renderings, views = study_kind(n, sh)
        failed = sid % FAILED_EVERY == 0
        study.append(
            _line(
                sid,
                uid,
                1,
                f"{sid:032x}",
                day.strftime("%Y%m%d"),
                f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}",
                modality,
                "failed" if failed else "done",
                len({r.instance for r in renderings}),
                len({r.instance for r in renderings}),
                1 if not failed else 3,
                "retrieval incomplete: 1 of 2 instances after 3 attempts" if failed else None,
                at,
                at,
            )
        )
        if failed:
            continue
        for r in renderings:
            ids.image += 1
            iid = ids.image
            sop = f"{uid}.{r.instance + 1}"
            view = views[r.instance] if views else r.view
            image.append(
                _line(
                    iid,
                    sid,
                    sop,
                    f"{uid}.0",
                    r.modality,
                    r.body_part,
                    view,
                    "HFS" if r.modality in ("CT", "MR") else None,
                    r.ct_window,
                    r.view_role,
                    f"{uid}.{r.paired_with + 1}" if r.paired_with is not None else None,
                    0,
                    r.render_version,
                    f"images/{sid:020x}/{iid:020x}/f0-{r.render_version}.png",
                    f"{iid:064x}",
                    512,
                    435 if r.view_role else 512,
                    at,
                )
            )
            if r.caption:
                ids.caption += 1
                caption.append(_line(ids.caption, iid, mv, prompt, r.render_version, "A synthetic caption.", 41.0, at))
            for q in r.questions:
                ids.finding += 1
                text, p, flagged, reason = answer(rng, q, sh.thresholds[q.id])
                finding.append(
                    _line(
                        ids.finding,
                        sid,
                        iid,
                        mv,
                        q.id,
                        sh.bank_version,
                        prompt,
                        r.render_version,
                        q.kind,
                        text,
                        None if p is None else f"{p:.6f}",
                        "t" if flagged else "f",
                        reason,
                        at,
                    )
                )
                if flagged and rng.random() < REVIEWED_SHARE:
                    ids.review += 1
                    decision = rng.choices([d for d, _ in DECISIONS], [w for _, w in DECISIONS])[0]
                    to = ("no" if text == "yes" else "yes") if decision == "correct" else None
                    comment = "seen" if decision == "comment" else None
                    review.append(_line(ids.review, ids.finding, 1, decision, text, to, comment, at))
    return out


def seed(url: str, studies: int, *, say: Callable[[str], None]) -> None:
    """`studies` studies (and what they hold) into the migrated database at `url`, by COPY."""
    import psycopg

    sh = shapes()
    today = dt.date.today()
    ids = Counters()
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        conn.execute("SET session_replication_role = replica")  # no FK triggers: consistent by construction
        conn.execute(
            "INSERT INTO pacs_source (id, name, kind, host, port, enabled, updated_at) "
            "VALUES (1, 'bench', 'dimse', '127.0.0.1', 11112, true, now())"
        )
        conn.execute(
            "INSERT INTO model_version (id, name, revision, backend, options_hash, options, offline_stand_in, "
            "temperature, created_at) VALUES (1, %s, %s, %s, %s, %s, true, 1.0, now())",
            (MODEL["name"], MODEL["revision"], MODEL["backend"], _options_hash(), _options_json()),
        )
        conn.execute(
            "INSERT INTO app_user (id, name, role, password_hash, disabled, created_at, auth_version) "
            "VALUES (1, 'reader', 'reviewer', 'x', false, now(), 0)"
        )
        copies = (
            ("study", STUDY_COLUMNS),
            ("image", IMAGE_COLUMNS),
            ("caption", CAPTION_COLUMNS),
            ("finding", FINDING_COLUMNS),
            ("review", REVIEW_COLUMNS),
        )
        t0 = time.perf_counter()
        for first in range(0, studies, CHUNK):
            rows = seed_chunk(first, min(first + CHUNK, studies), total=studies, sh=sh, ids=ids, today=today)
            with conn.cursor() as cur:
                for table, columns in copies:
                    with cur.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                        lines = rows[table]
                        for i in range(0, len(lines), 5000):
                            copy.write("".join(lines[i : i + 5000]))
            conn.commit()
            if first and first % (10 * CHUNK) == 0:
                say(f"    {first:,} studies in {time.perf_counter() - t0:.0f} s")
        for table in ("study", "image", "caption", "finding", "review", "pacs_source", "model_version", "app_user"):
            conn.execute(f"SELECT setval('{table}_id_seq', (SELECT coalesce(max(id), 1) FROM {table}))")
        conn.commit()
    # vacuumed until every page is all-visible, as in a database that has been up a while (index-only scans):
    # right after the load a VACUUM here often marked none (with synchronous_commit off, as the tests run
    # Postgres, the hint bits of commits not yet flushed cannot be set), a later one did
    tables = ("study", "image", "caption", "finding", "review", "pacs_source", "model_version", "app_user")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CHECKPOINT")
        for table in tables:
            conn.execute(f"VACUUM (ANALYZE) {table}")
        for _ in range(30):
            behind = [
                t
                for t, pages, visible in conn.execute(
                    "SELECT relname, relpages, relallvisible FROM pg_class WHERE relname = ANY(%s)", (list(tables),)
                ).fetchall()
                if visible < pages
            ]
            if not behind:
                break
            time.sleep(1)  # a polling interval: how long this takes is Postgres's business
            for table in behind:
                conn.execute(f"VACUUM {table}")


def _options_json() -> str:
    import json

    return json.dumps(MODEL["options"])


def _options_hash() -> str:
    from db.repository import options_hash

    return options_hash(MODEL["options"])  # type: ignore[arg-type]


def sizes_on_disk(url: str) -> dict[str, int]:
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        total = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        tables = conn.execute(
            "SELECT relname, pg_total_relation_size(oid), (SELECT count(*) FROM pg_index i WHERE i.indrelid = c.oid) "
            "FROM pg_class c WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace "
            "AND relname IN ('study', 'image', 'caption', 'finding', 'review')"
        ).fetchall()
        rows = {
            t: int(conn.execute(f"SELECT reltuples FROM pg_class WHERE relname = '{t}'").fetchone()[0])  # type: ignore[index]
            for t in ("study", "image", "caption", "finding", "review")
        }
    assert total is not None
    return {"database": int(total[0]), **{f"{name}_bytes": int(b) for name, b, _ in tables}, **rows}


# --- what is timed -------------------------------------------------------------------------------------------


def new_studies(first: int, count: int, sh: Shapes) -> list[tuple[dict[str, Any], str, tuple[Rendering, ...], Any]]:
    """`count` studies as a PACS answers them (numbered from `first`), with what the nightly makes of each."""
    today = dt.date.today().strftime("%Y%m%d")
    out = []
    for n in range(first, first + count):
        modality, renderings, views = study_kind(n, sh)
        ref = {
            "study_instance_uid": f"{NEW_UID_ROOT}{n}",
            "study_date": today,
            "study_time": f"{n % 24:02d}0000",
            "accession_number": f"ACC{n}",
            "modalities": [modality],
            "number_of_instances": len({r.instance for r in renderings}),
        }
        out.append((ref, modality, renderings, views))
    return out


def bookkeeping(engine: Any, *, first: int, count: int, sh: Shapes) -> float:
    """The nightly's database work for `count` new studies, through the real functions, each step in its own
    transaction as the flow runs it; returns the seconds it took."""
    from db import ledger
    from db import repository as repo
    from db.models import Image, ModelVersion, utcnow
    from db.session import session_scope

    batch = new_studies(first, count, sh)
    rng = random.Random(first)
    started = time.perf_counter()
    with session_scope(engine) as s:  # discovery registers what the PACS answered, in one transaction
        repo.register_studies(session=s, source_id=1, studies=[ref for ref, *_ in batch])
    with session_scope(engine) as s:
        pending = {st.study_instance_uid: st.id or 0 for st in ledger.pending(session=s, max_attempts=3)}
    owner = ledger.lease_owner()
    for ref, _modality, renderings, views in batch:
        study_id = pending[ref["study_instance_uid"]]
        uid = ref["study_instance_uid"]
        with session_scope(engine) as s:
            assert ledger.claim(session=s, study_id=study_id, owner=owner, lease_s=120, max_attempts=3) is not None
        with session_scope(engine) as s:
            repo.update_study(session=s, study_id=study_id, received_instances=ref["number_of_instances"])
        image_ids: list[int] = []
        for r in renderings:
            with session_scope(engine) as s:
                image_ids.append(
                    repo.upsert_image(
                        session=s,
                        values={
                            "study_id": study_id,
                            "sop_instance_uid": f"{uid}.{r.instance + 1}",
                            "series_instance_uid": f"{uid}.0",
                            "modality": r.modality,
                            "body_part": r.body_part,
                            "view": views[r.instance] if views else r.view,
                            "patient_position": "HFS" if r.modality in ("CT", "MR") else None,
                            "ct_window": r.ct_window,
                            "view_role": r.view_role,
                            "paired_sop_instance_uid": f"{uid}.{r.paired_with + 1}"
                            if r.paired_with is not None
                            else None,
                            "frame": 0,
                            "render_version": r.render_version,
                            "object_key": f"images/{study_id:020x}/{len(image_ids)}/f0-{r.render_version}.png",
                            "sha256": f"{study_id:032x}{len(image_ids):032x}",
                            "width": 512,
                            "height": 512,
                            "created_at": utcnow(),
                        },
                    )
                )
            if r.ct_window in (None, ""):  # once per frame, on its first rendering
                with session_scope(engine) as s:
                    repo.resolve_failures(session=s, stage="render", object_ref=f"sop:{uid}.{r.instance + 1}:f0")
        with session_scope(engine) as s:
            mv = repo.upsert_model_version(session=s, **MODEL)  # type: ignore[arg-type]
            assert mv.id is not None
        with session_scope(engine) as s:
            assert s.get(ModelVersion, mv.id) is not None
            repo.annotation_state(session=s, image_ids=image_ids, model_version_id=mv.id, bank_version=sh.bank_version)
            images = [s.get(Image, i) for i in image_ids]
        captions, findings = [], []
        for image, r in zip(images, renderings, strict=True):
            assert image is not None
            assert image.id is not None
            if r.caption:
                captions.append(
                    {
                        "image_id": image.id,
                        "model_version_id": mv.id,
                        "prompt_version": "p1",
                        "render_version": r.render_version,
                        "text": "A synthetic caption.",
                        "latency_ms": 41.0,
                        "created_at": utcnow(),
                    }
                )
            for q in r.questions:
                text, p, flagged, reason = answer(rng, q, sh.thresholds[q.id])
                findings.append(
                    {
                        "study_id": study_id,
                        "image_id": image.id,
                        "model_version_id": mv.id,
                        "question_id": q.id,
                        "bank_version": sh.bank_version,
                        "prompt_version": "p1",
                        "render_version": r.render_version,
                        "kind": q.kind,
                        "answer": text,
                        "probability": p,
                        "flagged": flagged,
                        "flag_reason": reason,
                        "created_at": utcnow(),
                    }
                )
        with session_scope(engine) as s:
            repo.insert_captions(session=s, rows=captions)
            repo.insert_findings(session=s, rows=findings)
        with session_scope(engine) as s:
            ledger.finish(session=s, study_id=study_id)
    return time.perf_counter() - started


def queue_page(engine: Any, sh: Shapes, *, count_limit: int | None) -> tuple[float, float, int]:
    """The review page's default view: (seconds for its 25 findings and their total, seconds for the counts
    over the queue, total). `count_limit` None: exact (review/views.py `queue_view` counts up to COUNT_LIMIT
    past the page)."""
    from sqlmodel import Session

    from db import reviews

    with Session(engine) as s:
        t0 = time.perf_counter()
        items, total = reviews.queue(
            session=s,
            flt=reviews.QueueFilter(),
            order="critical",
            critical_ids=sh.critical,
            offset=0,
            limit=25,
            count_limit=count_limit,
        )
        t1 = time.perf_counter()
        reviews.queue_counts(session=s, count_limit=count_limit)
        t2 = time.perf_counter()
    assert len(items) == 25
    return t1 - t0, t2 - t1, total


def cohort(engine: Any, sh: Shapes, *, limit: int | None) -> tuple[float, int]:
    """`run_cohort` of COHORT as the review API runs it: (seconds, studies returned)."""
    from sqlmodel import Session

    from db.cohort import run_cohort

    with Session(engine) as s:
        t0 = time.perf_counter()
        result = run_cohort(session=s, where=COHORT, known_questions=sh.question_ids, limit=limit)
        return time.perf_counter() - t0, len(result.rows)


@contextmanager
def statements(engine: Any) -> Iterator[list[tuple[str, Any]]]:
    """The SQL statements (and parameters) `engine` runs inside the block."""
    from sqlalchemy import event

    seen: list[tuple[str, Any]] = []

    def note(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", note)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", note)


def explain(engine: Any, call: Callable[[], object], *, title: str, say: Callable[[str], None]) -> None:
    """EXPLAIN (ANALYZE, BUFFERS) of every statement `call` runs that reads more than a key lookup."""
    with statements(engine) as seen:
        call()
    with engine.connect() as conn:
        for statement, parameters in seen:
            if not statement.lstrip().upper().startswith("SELECT"):
                continue
            plan = conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + statement, parameters).all()
            say(f"  -- {title}: {' '.join(statement.split())[:160]}...")
            for (line,) in plan:
                say(f"     {line}")


# --- the run ------------------------------------------------------------------------------------------------


@dataclass
class Figures:
    bookkeeping: list[float] = field(default_factory=list)  # seconds per study, one per round
    queue: list[float] = field(default_factory=list)  # `queue`: the page and its total up to COUNT_LIMIT
    queue_counts: list[float] = field(default_factory=list)  # `queue_counts` up to COUNT_LIMIT
    queue_exact: list[float] = field(default_factory=list)  # `queue`, exact total
    queue_exact_counts: list[float] = field(default_factory=list)  # `queue_counts`, exact
    cohort: list[float] = field(default_factory=list)
    cohort_api: list[float] = field(default_factory=list)  # seconds per returned study, at the API's default limit
    total: int = 0
    cohort_rows: int = 0
    cohort_api_rows: int = 0


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 1_000_000], help="studies per database")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds at every size")
    parser.add_argument("--studies-per-round", type=int, default=50, help="bookkeeping: new studies a round")
    parser.add_argument("--cohort-limit", type=int, default=50, help="cohort: studies on its first page")
    parser.add_argument("--explain", action="store_true", help="print EXPLAIN ANALYZE of the queue and cohort")
    parser.add_argument("--keep", type=Path, help="keep the Postgres folder here (reused when it exists)")
    args = parser.parse_args()

    from db.migrate import upgrade
    from db.session import make_engine

    def say(line: str) -> None:
        print(line, flush=True)

    binaries = pg_bin()
    if binaries is None:
        raise SystemExit("bench-db needs PostgreSQL server binaries (apt-get install postgresql)")
    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench-db-"))
    reuse = args.keep is not None and (folder / "data").exists()
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)  # the postgres user must enter it
    pg = Postgres(folder=folder, port=free_port(), bin=binaries)
    engines: dict[int, Any] = {}
    try:
        pg.up() if reuse else pg.start()
        sh = shapes()
        for size in args.sizes:
            name = f"bench_{size}"
            url = pg.url(name)
            if not (reuse and _has_database(pg, name, size)):
                url = pg.create_database(name)
                t0 = time.perf_counter()
                upgrade(url)
                say(f"seeding {size:,} studies ...")
                seed(url, size, say=say)
                say(f"  seeded in {time.perf_counter() - t0:.0f} s (migrations, COPY, VACUUM ANALYZE)")
            upgrade(url)  # a kept database: to the latest revision (new indexes)
            disk = sizes_on_disk(url)
            say(
                f"  {size:,} studies: {disk['image']:,} images, {disk['caption']:,} captions, {disk['finding']:,} "
                f"findings, {disk['review']:,} reviews; {disk['database'] / 2**20:,.0f} MiB on disk (findings "
                f"{disk['finding_bytes'] / 2**20:,.0f} MiB with their indexes, images "
                f"{disk['image_bytes'] / 2**20:,.0f} MiB)"
            )
            engines[size] = make_engine(url)
        figures = {size: Figures() for size in args.sizes}
        next_study = {size: _max_study_id(engine) for size, engine in engines.items()}  # new UIDs on a kept one
        for size, engine in engines.items():  # warm-up: every path once, not counted
            bookkeeping(engine, first=10_000_000 + next_study[size], count=5, sh=sh)
            next_study[size] += 5
            queue_page(engine, sh, count_limit=COUNT_LIMIT)
            queue_page(engine, sh, count_limit=None)
            cohort(engine, sh, limit=args.cohort_limit)
        for round_ in range(args.rounds):
            for size, engine in engines.items():
                f = figures[size]
                n = args.studies_per_round
                f.bookkeeping.append(bookkeeping(engine, first=10_000_000 + next_study[size], count=n, sh=sh) / n)
                next_study[size] += n
                page_s, counts_s, _ = queue_page(engine, sh, count_limit=COUNT_LIMIT)
                f.queue.append(page_s)
                f.queue_counts.append(counts_s)
                seconds, f.cohort_rows = cohort(engine, sh, limit=args.cohort_limit)
                f.cohort.append(seconds)
                if round_ == 0:  # once: seconds of parallel scans at the largest size, and far off the goal
                    page_s, counts_s, f.total = queue_page(engine, sh, count_limit=None)
                    f.queue_exact.append(page_s)
                    f.queue_exact_counts.append(counts_s)
                    seconds, f.cohort_api_rows = cohort(engine, sh, limit=1000)
                    f.cohort_api.append(seconds / max(f.cohort_api_rows, 1))
        for size in args.sizes:
            f = figures[size]
            say(
                f"{size:>9,} studies: bookkeeping {median(f.bookkeeping) * 1000:.1f} ms a study; the queue's "
                f"first page and its total {median(f.queue) * 1000:.1f} ms counted up to {COUNT_LIMIT:,}, "
                f"{median(f.queue_exact) * 1000:.1f} ms exact ({f.total:,} pending); its counts "
                f"{median(f.queue_counts) * 1000:.1f} ms up to {COUNT_LIMIT:,}, "
                f"{median(f.queue_exact_counts) * 1000:.1f} ms exact; cohort first {f.cohort_rows} studies "
                f"{median(f.cohort) * 1000:.1f} ms, at the API's limit of 1000: {f.cohort_api_rows} studies, "
                f"{median(f.cohort_api) * 1000:.2f} ms a study"
            )
        if args.explain:
            for size, engine in engines.items():
                for count_limit in (COUNT_LIMIT, None):
                    explain(
                        engine,
                        partial(queue_page, engine, sh, count_limit=count_limit),
                        title=f"{size:,} queue (count_limit {count_limit})",
                        say=say,
                    )
                explain(engine, partial(cohort, engine, sh, limit=args.cohort_limit), title=f"{size:,} cohort", say=say)
        small, large = figures[min(args.sizes)], figures[max(args.sizes)]

        def ratio(name: str) -> float:
            return median(getattr(large, name)) / median(getattr(small, name))

        say(
            f"  {max(args.sizes):,} vs {min(args.sizes):,}: the queue's page with its exact total "
            f"{ratio('queue_exact'):.2f}; its counts {ratio('queue_counts'):.2f} up to {COUNT_LIMIT:,}, "
            f"{ratio('queue_exact_counts'):.2f} exact; cohort a study at the API's limit {ratio('cohort_api'):.2f}"
        )
        say(
            f"P5 bookkeeping_1m_vs_1k={ratio('bookkeeping'):.2f} queue_1m_vs_1k={ratio('queue'):.2f} "
            f"cohort_1m_vs_1k={ratio('cohort'):.2f} queue_exact_total_1m_vs_1k={ratio('queue_exact'):.2f} "
            f"counts_1m_vs_1k={ratio('queue_counts'):.2f} counts_exact_1m_vs_1k={ratio('queue_exact_counts'):.2f}"
        )
    finally:
        for engine in engines.values():
            engine.dispose()
        pg.stop()
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


def _max_study_id(engine: Any) -> int:
    from sqlalchemy import text

    with engine.connect() as conn:
        return int(conn.execute(text("SELECT coalesce(max(id), 0) FROM study")).scalar_one())


def _has_database(pg: Postgres, name: str, size: int) -> bool:
    """A kept database of `name` already seeded with `size` studies (or more, after bookkeeping rounds)."""
    import psycopg

    try:
        with psycopg.connect(f"host=127.0.0.1 port={pg.port} user=postgres dbname={name}") as conn:
            row = conn.execute(
                "SELECT count(*) FROM study WHERE study_instance_uid LIKE %s", (SEED_UID_ROOT + "%",)
            ).fetchone()
    except psycopg.Error:
        return False
    return row is not None and int(row[0]) == size


if __name__ == "__main__":
    main()
