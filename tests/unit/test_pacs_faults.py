"""Queries through pynetdicom (C-FIND, C-ECHO) behind the fault proxy: a connection reset after the
association is a transient failure (retried), not a refusal; a PACS that stalls inside a PDU is cut
off by the query deadline however long it keeps the connection open; a PACS that aborts before
answering anything is still a refusal (Orthanc's way with callers it does not know)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator

import pytest

from integrations.errors import PeerRefused, TransientError
from integrations.pacs import DimseStudySource
from integrations.sample_pacs import SamplePacs
from tests.fault_proxy import FaultProxy

pytestmark = pytest.mark.timeout(120)
WEEK_AGO = dt.datetime.now() - dt.timedelta(days=7)
# past the A-ASSOCIATE-AC (about 200 bytes): the cut falls inside the C-FIND answers
AFTER_ASSOCIATION = (1200, 1600)


@pytest.fixture(scope="module")
def pacs() -> Iterator[SamplePacs]:
    with SamplePacs() as running:
        yield running


def source_via(proxy: FaultProxy, **kwargs: float) -> DimseStudySource:
    return DimseStudySource(name="faulty", host="127.0.0.1", port=proxy.port, called_ae="SAMPLEPACS", **kwargs)  # type: ignore[arg-type]


def test_the_answers_pass_through_the_proxy_untouched(pacs: SamplePacs) -> None:
    with FaultProxy(target_port=pacs.port) as proxy:
        assert len(source_via(proxy, timeout_s=5).find_studies(since=WEEK_AGO)) == 5


def test_a_reset_after_the_association_is_transient_not_a_refusal(pacs: SamplePacs) -> None:
    with FaultProxy(target_port=pacs.port, faults={"reset": 1.0}, cut_after=AFTER_ASSOCIATION) as proxy:
        with pytest.raises(TransientError, match="without a status") as caught:
            source_via(proxy, timeout_s=5).find_studies(since=WEEK_AGO)
        assert not isinstance(caught.value, PeerRefused)
        assert proxy.injected["reset"] == 1


def test_a_stall_inside_a_pdu_is_cut_off_by_the_query_deadline(pacs: SamplePacs) -> None:
    with FaultProxy(target_port=pacs.port, faults={"stall": 1.0}, stall_s=60, cut_after=AFTER_ASSOCIATION) as proxy:
        started = time.monotonic()
        with pytest.raises(TransientError, match="query deadline"):
            source_via(proxy, timeout_s=30, query_deadline_s=2).find_studies(since=WEEK_AGO)
        took = time.monotonic() - started
        assert proxy.injected["stall"] == 1
    assert took < 30, f"the query took {took:.1f} s: the per-read timeout (30 s), not the deadline (2 s), ended it"


def test_an_abort_before_any_answer_is_still_a_refusal() -> None:
    """A PACS that answers the C-FIND with an A-ABORT, as Orthanc does to a caller it does not know."""

    def abort_instead(event: object) -> Iterator[tuple[int, None]]:
        event.assoc.abort()  # type: ignore[attr-defined]
        yield 0xC000, None

    aborting = SamplePacs(ae_title="ABORTING")
    aborting._on_find = abort_instead  # type: ignore[method-assign]  # bound when the PACS starts
    with aborting, FaultProxy(target_port=aborting.port) as proxy:
        src = DimseStudySource(name="aborting", host="127.0.0.1", port=proxy.port, called_ae="ABORTING", timeout_s=5)
        with pytest.raises(PeerRefused, match="not declared among their DICOM modalities"):
            src.find_studies(since=WEEK_AGO)
