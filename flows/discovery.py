"""Finding every study a PACS holds for a period, whatever its result cap.

A PACS answers at most so many matches per C-FIND or QIDO-RS query (Orthanc's LimitFindResults;
vendors' own limits). Some say so (Orthanc ends the C-FIND with status 0xFE00: `ResultsCapped`),
others stop silently at `limit` answers. Either way a query that reached the cap is asked again in
narrower pieces: a period day by day, a day in halves of its StudyTime range, down to one minute.
Used by the nightly discovery and the backfill.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Sequence

from integrations.errors import ResultsCapped
from integrations.ports import StudyRef, StudySource
from integrations.query import studies_since

MIN_WINDOW_S = 60  # a window is never split below one minute


def _hhmmss(seconds: int) -> str:
    return f"{seconds // 3600:02d}{seconds % 3600 // 60:02d}{seconds % 60:02d}"


def find_day(
    source: StudySource, *, day: str, modalities: Sequence[str], limit: int, counts: Counter[str]
) -> list[StudyRef]:
    """All studies of one day, splitting the day into time windows while an answer reaches the cap
    (`limit` answers, or the PACS saying it stopped)."""
    found: dict[str, StudyRef] = {}

    def query(lo: int, hi: int) -> None:
        time_range = None if (lo, hi) == (0, 86399) else (_hhmmss(lo), _hhmmss(hi))
        try:
            refs = source.find_studies_on(date=day, time_range=time_range, modalities=modalities)
            capped = len(refs) >= limit
        except ResultsCapped as exc:
            refs, capped = list(exc.partial), True
        counts["queries"] += 1
        if capped and hi - lo >= MIN_WINDOW_S:
            mid = (lo + hi) // 2
            query(lo, mid)
            query(mid + 1, hi)
            return
        if capped:
            counts["windows_at_limit"] += 1  # cannot split further: the PACS may hold more
        for r in refs:
            found.setdefault(r.study_instance_uid, r)

    query(0, 86399)
    return sorted(found.values(), key=lambda r: r.sort_key)


def find_since(
    source: StudySource,
    *,
    since: dt.datetime | None,
    modalities: Sequence[str],
    limit: int,
    counts: Counter[str],
    today: dt.date | None = None,
) -> list[StudyRef]:
    """Every study from `since` on: one query, or, when its answer reached the cap, day by day up to
    `today` (each day split as `find_day` does). Without `since` there is no period to split."""
    try:
        refs = source.find_studies(since=since, modalities=modalities)
        capped = len(refs) >= limit
    except ResultsCapped as exc:
        refs, capped = list(exc.partial), True
    counts["queries"] += 1
    if not capped or since is None:
        return refs
    counts["capped_periods"] += 1
    found: dict[str, StudyRef] = {}
    day, last = since.date(), today or dt.date.today()
    while day <= last:
        for r in find_day(source, day=f"{day:%Y%m%d}", modalities=modalities, limit=limit, counts=counts):
            found.setdefault(r.study_instance_uid, r)
        day += dt.timedelta(days=1)
    return studies_since(found.values(), since=since, modalities=modalities)
