"""DimseStudySource against the sample PACS: real associations on loopback, no mocks of the network."""

from __future__ import annotations

import datetime as dt
import shutil
import socket
import subprocess

import numpy as np
import pytest
from pydicom import dcmread

from integrations.errors import PeerRefused, RetrievalIncomplete, TransientError
from integrations.pacs import DimseStudySource
from integrations.sample_pacs import SamplePacs, generate_studies

WEEK_AGO = dt.datetime.combine(dt.date.today() - dt.timedelta(days=7), dt.time())


def source(pacs: SamplePacs, **kw) -> DimseStudySource:
    return DimseStudySource(name="t", host="127.0.0.1", port=pacs.port, called_ae=pacs.ae_title, timeout_s=10, **kw)


def test_synthetic_studies_are_realistic():
    studies = generate_studies(seed=3, xr_size=256, ct_size=128)
    modalities = [s.header.Modality for s in studies]
    assert modalities == ["CR", "DX", "DX", "CT", "MR"]
    assert len({s.header.StudyDate for s in studies}) >= 4, "dates are spread over days"
    ct = studies[3]
    axial = [ds for ds in ct.instances if "LOCALIZER" not in ds.ImageType]
    assert len(axial) >= 30
    assert all(ds.RescaleIntercept == -1024 and "WindowCenter" in ds for ds in axial)
    views = {ds.ViewPosition for s in studies[:3] for ds in s.instances}
    assert {"PA", "AP", "LL"} <= views
    cr = studies[0].instances[0]
    assert cr.PhotometricInterpretation == "MONOCHROME1"
    # a body outline: the centre (tissue) differs from the corners (air)
    px = cr.pixel_array.astype(float)
    assert abs(px[:10, :10].mean() - px[px.shape[0] // 2 - 5 : px.shape[0] // 2 + 5, :].mean()) > 500
    assert generate_studies(seed=3, xr_size=256, ct_size=128)[0].study_instance_uid == studies[0].study_instance_uid


def test_echo_find_and_series(sample_pacs):
    src = source(sample_pacs)
    src.echo()
    refs = src.find_studies(since=WEEK_AGO)
    assert len(refs) == 5
    assert refs == sorted(refs, key=lambda r: r.sort_key)
    ct = next(r for r in refs if r.modalities == ("CT",))
    assert ct.number_of_instances == 33
    series = src.find_series(ct.study_instance_uid)
    assert sorted(s.number_of_instances for s in series) == [1, 32]


def test_find_filters_by_date_and_modality(sample_pacs):
    src = source(sample_pacs)
    refs = src.find_studies(since=WEEK_AGO)
    latest = refs[-1]
    since = dt.datetime.strptime(latest.study_date + latest.sort_key[1], "%Y%m%d%H%M%S")
    assert [r.study_instance_uid for r in src.find_studies(since=since)] == [latest.study_instance_uid]
    assert {r.modalities for r in src.find_studies(since=WEEK_AGO, modalities=["DX"])} == {("DX",)}
    assert len(src.find_studies(since=WEEK_AGO, modalities=["CR", "MR"])) == 2


@pytest.mark.parametrize("method", ["get", "move"])
def test_retrieve_whole_study(sample_pacs, tmp_path, method):
    with source(sample_pacs, retrieve=method) as src:
        if method == "move":
            sample_pacs.move_destinations["NIGHTREAD"] = ("127.0.0.1", src.move_port)
        ref = next(r for r in src.find_studies(since=WEEK_AGO) if r.modalities == ("CT",))
        got = src.retrieve_study(ref.study_instance_uid, dest=tmp_path / "s", expected=ref.number_of_instances)
    assert len(got.files) == 33
    ds = dcmread(got.files[0])
    assert ds.StudyInstanceUID == ref.study_instance_uid
    assert ds.pixel_array.shape in ((512, 512), (256, 256))
    assert all(ref.study_instance_uid not in p.name for p in got.files), "file names carry no UIDs"


def test_incomplete_retrieval_is_transient(sample_pacs, tmp_path):
    src = source(sample_pacs)
    ref = src.find_studies(since=WEEK_AGO)[0]
    with pytest.raises(RetrievalIncomplete, match="received 2 of 5") as info:
        src.retrieve_study(ref.study_instance_uid, dest=tmp_path, expected=5)
    assert isinstance(info.value, TransientError)


def test_move_to_unknown_destination_is_refused(sample_pacs, tmp_path):
    with source(sample_pacs, retrieve="move") as src:
        ref = src.find_studies(since=WEEK_AGO)[0]
        with pytest.raises(PeerRefused, match="move destination"):
            src.retrieve_study(ref.study_instance_uid, dest=tmp_path)


def test_no_pacs_listening_is_transient():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = DimseStudySource(name="t", host="127.0.0.1", port=port, called_ae="NOBODY", timeout_s=2)
    with pytest.raises(TransientError, match=f"127.0.0.1:{port}"):
        src.echo()


def test_corrupt_instances_are_served_as_they_are(sample_pacs, tmp_path):
    src = source(sample_pacs)
    ref = next(r for r in src.find_studies(since=WEEK_AGO) if r.number_of_instances == 4)
    got = src.retrieve_study(ref.study_instance_uid, dest=tmp_path, expected=4)
    without_pixels = [p for p in got.files if "PixelData" not in dcmread(p)]
    assert len(without_pixels) == 1
    lengths = sorted(len(dcmread(p).get("PixelData", b"")) for p in got.files)
    assert lengths[1] == 2000
    assert np.prod([512, 512]) * 2 > lengths[1]


@pytest.mark.parametrize("method", ["get", "move"])
def test_parallel_associations_split_a_study_and_get_all_of_it(sample_pacs, tmp_path, method):
    with source(sample_pacs, retrieve=method, parallel=3) as src:
        if method == "move":
            sample_pacs.move_destinations["NIGHTREAD"] = ("127.0.0.1", src.move_port)
        ref = next(r for r in src.find_studies(since=WEEK_AGO) if r.modalities == ("CT",))
        before = sample_pacs.associations
        got = src.retrieve_study(ref.study_instance_uid, dest=tmp_path, expected=ref.number_of_instances)
    assert len(got.files) == 33
    assert len({dcmread(p).SOPInstanceUID for p in got.files}) == 33
    assert sample_pacs.associations - before >= 4, "one C-FIND for the instance list, then 3 retrievals"


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [("SYNTHETIC^PATIENT0*", 5), ("SYNTHETIC^PATIENT0?", 5), ("*PATIENT03", 1), ("SYNTHETIC^PAT", 0), ("[S]*", 0)],
)
def test_the_sample_pacs_matches_person_name_wildcards_as_a_pacs_does(sample_pacs, pattern, expected):
    """dcmtk's findscu with a PN wildcard (a PersonName value, not a str, reaches the matcher)."""
    findscu = shutil.which("findscu")
    if findscu is None:
        from tests.conftest import require_or_skip

        require_or_skip("dcmtk's findscu is not installed")
    result = subprocess.run(
        [findscu, "-S", "-aec", sample_pacs.ae_title, "-k", "QueryRetrieveLevel=STUDY", "-k", f"PatientName={pattern}",
         "-k", "StudyInstanceUID", "127.0.0.1", str(sample_pacs.port)],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert result.stderr.count("Find Response:") == expected
