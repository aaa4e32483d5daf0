"""Discovery against an Orthanc with a result cap (`LimitFindResults: 2`), as many are configured: over
DIMSE it ends the C-FIND with status 0xFE00 after two answers; over DICOMweb every page is short.
Every study must still be found, by the nightly discovery and by the backfill's day query."""

from __future__ import annotations

import datetime as dt
import shutil
from collections import Counter
from collections.abc import Iterator

import pytest

from flows.discovery import find_day, find_since
from integrations.dicomweb import DicomWebStudySource
from integrations.errors import ResultsCapped
from integrations.pacs import DimseStudySource
from integrations.sample_pacs import SampleStudy, generate_studies
from tests.conftest import require_or_skip
from tests.services import DICOMWEB_PLUGIN, ORTHANC, Orthanc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
TODAY = dt.date.today()
SINCE = dt.datetime.combine(TODAY - dt.timedelta(days=9), dt.time())


@pytest.fixture(scope="module")
def studies() -> list[SampleStudy]:
    both = generate_studies(seed=7, today=TODAY, xr_size=64, ct_size=32) + generate_studies(
        seed=8, today=TODAY + dt.timedelta(days=1), xr_size=64, ct_size=32
    )
    return [s for s in both if s.header.StudyDate <= f"{TODAY:%Y%m%d}"]


@pytest.fixture(scope="module")
def capped_orthanc(tmp_path_factory: pytest.TempPathFactory, studies: list[SampleStudy]) -> Iterator[Orthanc]:
    if ORTHANC is None or not DICOMWEB_PLUGIN.exists():
        require_or_skip("Orthanc with the DICOMweb plugin (apt-get install orthanc orthanc-dicomweb)")
    folder = tmp_path_factory.mktemp("orthanc-capped")
    server = Orthanc.on_free_ports(folder, extra_config={"LimitFindResults": 2})
    server.start()
    try:
        server.upload_datasets(ds for study in studies for ds in study.instances)
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def dimse(orthanc: Orthanc) -> DimseStudySource:
    return DimseStudySource(
        name="capped", host="127.0.0.1", port=orthanc.dicom_port, called_ae=orthanc.aet, calling_ae="NIGHTREAD"
    )


def test_orthanc_says_it_stopped_and_the_partial_answer_is_kept(capped_orthanc):
    with pytest.raises(ResultsCapped) as info:
        dimse(capped_orthanc).find_studies(since=SINCE)
    assert len(info.value.partial) == 2


@pytest.mark.parametrize(("route", "limit"), [("dimse", 500), ("dicomweb", 2)])
def test_every_study_is_discovered_behind_the_cap(capped_orthanc, studies, route, limit):
    """Over DIMSE Orthanc says it stopped, so no limit needs configuring (500 is the default). Over
    DICOMweb it answers at most cap + 1 studies to any query, whatever the offset, and says nothing:
    only `backfill.result_limit` set to the PACS's cap lets the count reveal it."""
    if route == "dimse":
        source: DimseStudySource | DicomWebStudySource = dimse(capped_orthanc)
    else:
        source = DicomWebStudySource(name="capped-web", url=f"{capped_orthanc.url}/dicom-web")
    counts: Counter[str] = Counter()
    refs = find_since(source, since=SINCE, modalities=[], limit=limit, counts=counts, today=TODAY)
    assert {r.study_instance_uid for r in refs} == {s.study_instance_uid for s in studies}
    by_day = Counter(s.header.StudyDate for s in studies)
    day = max(by_day, key=lambda d: by_day[d])
    on_day = find_day(source, day=day, modalities=[], limit=limit, counts=counts)
    assert {r.study_instance_uid for r in on_day} == {
        s.study_instance_uid for s in studies if s.header.StudyDate == day
    }
