"""Backfill: day-by-day discovery split under a PACS's result cap, resumable progress, the off-peak
window and the rate limit; reannotate from the object store without the PACS."""

from __future__ import annotations

import datetime as dt
from collections import Counter

import pytest
from sqlmodel import Session, select

from db.migrate import upgrade
from db.models import Backfill, Finding, ModelVersion, Run, Study
from db.session import make_engine
from flows import backfill as bf
from flows.discovery import find_day
from flows.reannotate import reannotate
from integrations.ports import StudyRef
from integrations.sample_pacs import SamplePacs, generate_studies

TODAY = dt.date.today()


def test_off_peak_window_runs_over_midnight():
    at = lambda h, m=0: dt.datetime(2026, 1, 1, h, m)  # noqa: E731
    assert bf.in_window("19:00-07:00", at(23))
    assert bf.in_window("19:00-07:00", at(3))
    assert not bf.in_window("19:00-07:00", at(7))
    assert not bf.in_window("19:00-07:00", at(12))
    assert bf.in_window("08:30-17:00", at(8, 30))
    assert bf.in_window(None, at(12))


def test_rate_limit_spaces_acquisitions():
    waits: list[float] = []
    limit = bf.RateLimit(3600.0, sleep=waits.append)  # one per second
    for _ in range(4):
        limit.acquire()
    assert len(waits) == 3
    assert all(0.5 < w <= 3.0 for w in waits)
    assert waits == sorted(waits), "each waits for its own slot"
    free = bf.RateLimit(None, sleep=waits.append)
    free.acquire()
    assert len(waits) == 3


class CappedSource:
    """Answers like a PACS with a result cap of `limit`: the first `limit` studies of a window."""

    def __init__(self, times: list[str], limit: int) -> None:
        self.times, self.limit, self.queries = times, limit, []

    def find_studies_on(self, *, date, time_range=None, modalities=()):
        self.queries.append(time_range)
        lo, hi = time_range or ("000000", "235959")
        hits = [t for t in self.times if lo <= t <= hi][: self.limit]
        return [StudyRef(study_instance_uid=f"1.{t}", study_date=date, study_time=t) for t in hits]


def test_a_day_over_the_result_cap_is_split_into_windows():
    times = ["080000", "091500", "133000", "160000", "233000"]
    source = CappedSource(times, limit=2)
    counts: Counter[str] = Counter()
    refs = find_day(source, day="20260101", modalities=[], limit=2, counts=counts)
    assert sorted(r.study_time for r in refs) == times, "every study found despite the cap"
    assert counts["queries"] == len(source.queries) > 1
    assert counts["windows_at_limit"] == 0
    crowded = CappedSource(["080000", "080000", "080000"], limit=2)
    find_day(crowded, day="20260101", modalities=[], limit=2, counts=counts)
    assert counts["windows_at_limit"] == 1, "a one-minute window still at the cap is counted, not looped on"


@pytest.fixture
def two_per_day():
    """Studies on the last five days, two on each of four of them (different times)."""
    studies = generate_studies(seed=7, today=TODAY) + generate_studies(seed=8, today=TODAY + dt.timedelta(days=1))
    studies = [s for s in studies if s.instances[0].StudyDate <= f"{TODAY:%Y%m%d}"]
    with SamplePacs(studies=studies, max_find_results=2) as pacs:
        yield pacs, studies


@pytest.mark.slow
def test_backfill_finds_every_study_and_resumes_where_it_stopped(
    prefect_harness, make_settings, two_per_day, monkeypatch
):
    pacs, studies = two_per_day
    settings = make_settings(
        pacs={"port": pacs.port, "called_ae": pacs.ae_title},
        backfill={"result_limit": 2, "window": "19:00-07:00", "associations": 1},
    )
    upgrade(settings.database_url)
    start, end = f"{TODAY - dt.timedelta(days=4):%Y-%m-%d}", f"{TODAY:%Y-%m-%d}"
    # inside the window for the first two days, then the clock leaves it: the backfill pauses
    clock = iter([dt.datetime(2026, 1, 1, 23, 0)] * 2 + [dt.datetime(2026, 1, 2, 8, 0)] * 10)
    monkeypatch.setattr(bf, "now", lambda: next(clock))
    first = bf.run_backfill(settings, start_date=start, end_date=end)
    assert first["status"] == "paused"
    assert first["days"] == 2
    engine = make_engine(settings.database_url)
    with Session(engine) as s:
        (row,) = s.exec(select(Backfill)).all()
        assert row.next_date == f"{TODAY - dt.timedelta(days=2):%Y%m%d}"
        assert row.status == "paused"
        done_first = {x.study_instance_uid: x.attempts for x in s.exec(select(Study)).all()}
    assert all(v == 1 for v in done_first.values())
    monkeypatch.setattr(bf, "now", lambda: dt.datetime(2026, 1, 2, 2, 0))
    second = bf.run_backfill(settings, start_date=start, end_date=end)
    assert second["status"] == "done"
    assert second["days"] == 3, "resumed at the first unfinished day"
    with Session(engine) as s:
        rows = s.exec(select(Study)).all()
        (row,) = s.exec(select(Backfill)).all()
        runs = s.exec(select(Run).where(Run.kind == "backfill")).all()
    assert {x.study_instance_uid for x in rows} == {st.instances[0].StudyInstanceUID for st in studies}
    assert all(x.status == "done" for x in rows)
    assert all(x.attempts == 1 for x in rows), "no study processed twice"
    assert (row.status, row.days_done, row.studies_found) == ("done", 5, len(studies))
    assert first["queries"] + second["queries"] > 5, "crowded days were split under the cap"
    assert len(runs) == 2
    third = bf.run_backfill(settings, start_date=start, end_date=end)
    assert (third["status"], third.get("days", 0)) == ("done", 0)
    engine.dispose()


@pytest.mark.slow
def test_reannotate_uses_the_object_store_not_the_pacs(prefect_harness, make_settings, sample_pacs, tmp_path):
    from flows.nightly import run_nightly
    from flows.rules.questions import load_bank

    settings = make_settings(pacs={"port": sample_pacs.port, "called_ae": sample_pacs.ae_title})
    upgrade(settings.database_url)
    run_nightly(settings)
    # a new question bank, and the PACS gone: the CT studies are annotated again from stored images
    bank = tmp_path / "bank.yaml"
    bank.write_text(
        "name: extra\nquestions:\n"
        '  - {id: ct_emphysema, text: "Is there emphysema?", kind: closed, modalities: [CT], flag_threshold: 0.9,\n'
        '     code: {scheme: SCT, value: "87433001", meaning: Pulmonary emphysema}}\n'
    )
    settings2 = make_settings(pacs={"port": 1, "called_ae": "GONE"}, questions_file=str(bank))
    finds = sample_pacs.finds
    result = reannotate(where="modality = CT", settings=settings2)
    assert result["studies"] == 1, result
    assert sample_pacs.finds == finds
    engine = make_engine(settings.database_url)
    with Session(engine) as s:
        new = s.exec(select(Finding).where(Finding.question_id == "ct_emphysema")).all()
        assert len(new) == 3, result
        assert {f.bank_version for f in new} == {load_bank(bank).version}
        assert len(s.exec(select(ModelVersion)).all()) == 1
    engine.dispose()
    assert reannotate(where="modality = CT", settings=settings2).get("findings", 0) == 0, "nothing twice"
