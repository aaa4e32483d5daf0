"""DICOM TLS against a real PACS: an Orthanc with `DicomTlsEnabled` that requires client certificates
(a CA made by the test signs both sides). nightread's C-ECHO, C-FIND, C-GET (both receivers) and
C-MOVE (Orthanc connects to our TLS storage SCP, both receivers); dcmtk's findscu `+tls` as a second
peer; and an Orthanc whose certificate we do not trust is refused."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from pydicom import dcmread

from integrations.dimse.tls import TlsConfig
from integrations.errors import PeerRefused
from integrations.pacs import DimseStudySource
from integrations.sample_pacs import SampleStudy, generate_studies
from tests.conftest import require_or_skip
from tests.services import DICOMWEB_PLUGIN, ORTHANC, Orthanc, TlsTerminator
from tests.tls_certs import Pki, make_pki

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
SINCE = dt.datetime.combine(dt.date.today() - dt.timedelta(days=9), dt.time())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("orthanc-pki"))


@pytest.fixture(scope="module")
def studies() -> list[SampleStudy]:
    return generate_studies(seed=21, xr_size=64, ct_size=32)[:2]


@pytest.fixture(scope="module")
def tls_orthanc(tmp_path_factory: pytest.TempPathFactory, pki: Pki, studies) -> Iterator[Orthanc]:
    if ORTHANC is None or not DICOMWEB_PLUGIN.exists():
        require_or_skip("Orthanc with the DICOMweb plugin (apt-get install orthanc orthanc-dicomweb)")
    folder = tmp_path_factory.mktemp("orthanc-tls")
    server = Orthanc.on_free_ports(folder)
    modalities = server.config()["DicomModalities"]
    assert isinstance(modalities, dict)
    for modality in modalities.values():
        modality["UseDicomTls"] = True  # Orthanc's own associations (C-MOVE to us) are TLS too
    server.extra_config = {
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(pki.server_cert),
        "DicomTlsPrivateKey": str(pki.server_key),
        "DicomTlsTrustedCertificates": str(pki.ca),
        "DicomTlsRemoteCertificateRequired": True,
        "DicomModalities": modalities,
    }
    server.start()
    try:
        server.upload_datasets(ds for study in studies for ds in study.instances)
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def source(orthanc: Orthanc, tls: TlsConfig, **kwargs: object) -> DimseStudySource:
    return DimseStudySource(
        name="orthanc-tls",
        host="127.0.0.1",
        port=orthanc.dicom_port,
        called_ae=orthanc.aet,
        calling_ae=orthanc.nightread_ae,
        timeout_s=20,
        tls=tls,
        move_port=orthanc.nightread_port,
        **kwargs,  # type: ignore[arg-type]
    )


def ours(pki: Pki) -> TlsConfig:
    return TlsConfig(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key, require_client_cert=True)


@pytest.mark.parametrize("receiver", ["direct", "pynetdicom"])
@pytest.mark.parametrize("retrieve", ["get", "move"])
def test_find_and_retrieve_from_orthanc_over_tls(tls_orthanc, pki, studies, tmp_path, receiver, retrieve) -> None:
    with source(tls_orthanc, ours(pki), dimse_receiver=receiver, retrieve=retrieve) as src:
        src.echo()
        found = {ref.study_instance_uid: ref for ref in src.find_studies(since=SINCE)}
        assert set(found) == {str(s.header.StudyInstanceUID) for s in studies}
        ref = found[str(studies[0].header.StudyInstanceUID)]
        got = src.retrieve_study(ref.study_instance_uid, dest=tmp_path, expected=ref.number_of_instances)
    assert len(got.files) == len(studies[0].instances)
    assert {dcmread(p).SOPInstanceUID for p in got.files} == {ds.SOPInstanceUID for ds in studies[0].instances}


def test_an_orthanc_we_do_not_trust_is_refused(tls_orthanc, pki, tmp_path) -> None:
    wrong_ca = TlsConfig(ca_file=pki.rogue_ca, cert_file=pki.client_cert, key_file=pki.client_key)
    with pytest.raises(PeerRefused, match="not trusted"), source(tls_orthanc, wrong_ca) as src:
        src.retrieve_study("1.2.3", dest=tmp_path)


def test_dcmtk_findscu_over_tls_agrees(tls_orthanc, pki, studies) -> None:
    """A second, independent TLS peer finds the same studies with the same certificates."""
    findscu = shutil.which("findscu")
    if findscu is None:
        require_or_skip("dcmtk's findscu is not installed")
    result = subprocess.run(
        [findscu, "+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca), "-S",
         "-aet", tls_orthanc.nightread_ae, "-aec", tls_orthanc.aet, "-k", "QueryRetrieveLevel=STUDY",
         "-k", "StudyInstanceUID", "127.0.0.1", str(tls_orthanc.dicom_port)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("Find Response:") == len(studies)


@pytest.fixture(scope="module")
def https_orthanc(tmp_path_factory: pytest.TempPathFactory, pki: Pki, studies) -> Iterator[tuple[Orthanc, str]]:
    """Orthanc's DICOMweb with basic authentication, behind HTTPS (the test CA's server certificate on a
    TLS terminator, as a reverse proxy serves it); yields the Orthanc and its https DICOMweb root."""
    if ORTHANC is None or not DICOMWEB_PLUGIN.exists():
        require_or_skip("Orthanc with the DICOMweb plugin (apt-get install orthanc orthanc-dicomweb)")
    folder = tmp_path_factory.mktemp("orthanc-https")
    server = Orthanc.on_free_ports(folder, user=("qa", "s3cret-pw"))
    server.start()
    try:
        server.upload_datasets(ds for study in studies for ds in study.instances)
        with TlsTerminator(target_port=server.http_port, cert=pki.server_cert, key=pki.server_key) as tls:
            yield server, f"https://127.0.0.1:{tls.port}/dicom-web"
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def test_dicomweb_over_https_with_basic_auth(https_orthanc, pki, studies, tmp_path) -> None:
    from flows.wiring.runtime import build_source
    from flows.wiring.settings import PacsSettings

    _, url = https_orthanc
    settings = PacsSettings(
        name="web",
        kind="dicomweb",
        url=url,
        tls={"enabled": True, "ca_file": pki.ca},
        auth="basic",
        username="qa",
        password="s3cret-pw",
    )
    with build_source(settings, inbox=tmp_path / "inbox") as src:  # type: ignore[attr-defined]
        found = src.find_studies(since=SINCE)
        assert {ref.study_instance_uid for ref in found} == {str(s.header.StudyInstanceUID) for s in studies}
        got = src.retrieve_study(found[0].study_instance_uid, dest=tmp_path / "study")
        assert got.files
    assert "s3cret-pw" not in repr(settings), "the password is masked wherever settings are shown"


def test_dicomweb_refusals_name_the_cause_and_keep_the_secret(https_orthanc, pki, tmp_path) -> None:
    from integrations.dicomweb import DicomWebStudySource

    _, url = https_orthanc
    with pytest.raises(PeerRefused, match="HTTP 401") as wrong_password:
        DicomWebStudySource(name="w", url=url, ca_file=pki.ca, auth=("basic", "qa:wrong")).find_studies(since=SINCE)
    assert "wrong" not in str(wrong_password.value)
    with pytest.raises(PeerRefused, match="TLS certificate"):
        DicomWebStudySource(name="w", url=url, ca_file=pki.rogue_ca, auth=("basic", "qa:s3cret-pw")).find_studies(
            since=SINCE
        )
