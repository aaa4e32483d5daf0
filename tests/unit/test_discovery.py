"""Discovery under a PACS's result cap: every study is found whether the PACS says it stopped (status
0xFE00, as Orthanc's LimitFindResults does) or stops silently at the cap."""

from __future__ import annotations

import datetime as dt
from collections import Counter

import pytest
from sqlmodel import Session, select

from db.migrate import upgrade
from db.models import PacsSource, Study
from flows.discovery import find_day, find_since
from flows.nightly import discover_studies
from flows.wiring.runtime import Runtime
from integrations.errors import PermanentError, ResultsCapped
from integrations.pacs import DimseStudySource
from integrations.sample_pacs import SamplePacs, generate_studies

TODAY = dt.date.today()
SINCE = dt.datetime.combine(TODAY - dt.timedelta(days=9), dt.time())


@pytest.fixture(scope="module")
def studies():
    """Ten studies over the last days, two on most days at different times."""
    both = generate_studies(seed=7, today=TODAY, xr_size=64, ct_size=32) + generate_studies(
        seed=8, today=TODAY + dt.timedelta(days=1), xr_size=64, ct_size=32
    )
    return [s for s in both if s.header.StudyDate <= f"{TODAY:%Y%m%d}"]


@pytest.mark.parametrize("signal_cap", [True, False], ids=["says-it-stopped", "silent"])
def test_every_study_is_found_under_a_cap_of_two(studies, signal_cap):
    with SamplePacs(studies=studies, max_find_results=2, signal_cap=signal_cap) as pacs:
        source = DimseStudySource(name="p", host="127.0.0.1", port=pacs.port, called_ae=pacs.ae_title)
        if signal_cap:
            with pytest.raises(ResultsCapped, match="stopped after 2 answers") as info:
                source.find_studies(since=SINCE)
            assert isinstance(info.value, PermanentError), "asking again the same way will not help"
            assert len(info.value.partial) == 2
        else:
            assert len(source.find_studies(since=SINCE)) == 2, "a silent cap: only the count says so"
        counts: Counter[str] = Counter()
        refs = find_since(source, since=SINCE, modalities=[], limit=2, counts=counts, today=TODAY)
    assert {r.study_instance_uid for r in refs} == {s.study_instance_uid for s in studies}
    assert refs == sorted(refs, key=lambda r: r.sort_key)
    assert counts["capped_periods"] == 1
    assert counts["queries"] > 10, "one query, then every day, and the crowded days in halves"


def test_a_day_is_split_when_the_pacs_says_it_stopped(studies):
    by_day = Counter(s.header.StudyDate for s in studies)
    day = max(by_day, key=lambda d: by_day[d])
    on_day = {s.study_instance_uid for s in studies if s.header.StudyDate == day}
    assert len(on_day) >= 2
    with SamplePacs(studies=studies, max_find_results=1, signal_cap=True) as pacs:
        source = DimseStudySource(name="p", host="127.0.0.1", port=pacs.port, called_ae=pacs.ae_title)
        counts: Counter[str] = Counter()
        # the limit is set far above the cap: only the PACS's 0xFE00 says the answer was cut
        refs = find_day(source, day=day, modalities=[], limit=500, counts=counts)
    assert {r.study_instance_uid for r in refs} == on_day
    assert counts["queries"] > 1


def test_the_nightly_discovery_registers_every_study_behind_a_cap(make_settings, studies):
    with SamplePacs(studies=studies, max_find_results=2, signal_cap=True) as pacs:
        settings = make_settings(
            pacs={"port": pacs.port, "called_ae": pacs.ae_title, "lookback_days": 9},
            backfill={"result_limit": 2},
        )
        upgrade(settings.database_url)
        with Runtime.build(settings) as rt:
            (source_id,) = rt.register_sources()
            result = discover_studies.fn(rt, source_id)
            with Session(rt.engine) as session:
                registered = {st.study_instance_uid for st in session.exec(select(Study)).all()}
                source = session.get(PacsSource, source_id)
    assert (result["found"], result["new"]) == (len(studies), len(studies))
    assert registered == {s.study_instance_uid for s in studies}
    latest = max(studies, key=lambda s: (s.header.StudyDate, s.header.StudyTime))
    assert source is not None
    assert source.cursor_date == latest.header.StudyDate, "the cursor moves to the latest study found"
