"""PACS throttling with Prefect's global concurrency limits: the sample PACS counts the connections it
has open at once while a nightly runs four studies at a time; it never sees more than the cap of the
hour, and the day/night switch changes the limit's value without ever deactivating it."""

from __future__ import annotations

import datetime as dt

import pytest
from prefect.client.orchestration import get_client

from db.migrate import upgrade
from flows.nightly import run_nightly
from flows.wiring.settings import PacsSettings
from flows.wiring.throttle import apply_limits, associations_now

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("cap", [1, 3])
def test_the_pacs_never_sees_more_associations_than_the_cap(prefect_harness, make_settings, sample_pacs, cap) -> None:
    settings = make_settings(
        pacs={"port": sample_pacs.port, "called_ae": sample_pacs.ae_title, "name": f"capped-{cap}",
              "max_associations_day": cap, "max_associations_night": cap},
        flow={"concurrency": 4},
    )  # fmt: skip
    upgrade(settings.database_url)
    result = run_nightly(settings)
    assert result["studies_done"] == 5
    assert 1 <= sample_pacs.peak_open <= cap
    if cap > 1:
        assert sample_pacs.peak_open > 1, "four studies at a time do use more than one association"


def test_day_and_night_change_the_limit_and_never_deactivate_it(prefect_harness) -> None:
    p = PacsSettings(name="profiled", max_associations_day=1, max_associations_night=4, night_window="19:00-07:00")
    noon, midnight = dt.datetime(2026, 11, 30, 12, 0), dt.datetime(2026, 11, 30, 23, 30)
    assert (associations_now(p, noon), associations_now(p, midnight)) == (1, 4)
    seen = []
    for at in (noon, midnight, noon):
        assert apply_limits([p], at=at) == {"profiled": associations_now(p, at)}
        with get_client(sync_client=True) as client:
            limit = client.read_global_concurrency_limit_by_name("pacs:profiled")
        seen.append((limit.limit, limit.active))
    assert seen == [(1, True), (4, True), (1, True)]
