"""DICOM TLS on every DIMSE connection, with a CA made by the test: our SCUs (C-ECHO, C-FIND, C-GET on
both receivers, C-MOVE with our TLS storage SCP on both receivers, SR write-back) against a sample PACS
that requires client certificates, `nightread listen` over TLS against dcmtk's storescu (`+tls`), and
the refusals: an untrusted server, a client without a certificate."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import threading
from collections.abc import Iterator

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from integrations.dimse.tls import TlsConfig, client_context, server_context
from integrations.errors import ConfigurationError, PeerRefused, TransientError
from integrations.pacs import DimseStudySource
from integrations.receiver import Arrival, StoreReceiver
from integrations.sample_pacs import SamplePacs
from tests.tls_certs import Pki, make_pki

WEEK_AGO = dt.datetime.combine(dt.date.today() - dt.timedelta(days=7), dt.time())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def mutual(pki: Pki) -> TlsConfig:
    """Our side: trusts the test CA, presents the client certificate, and (as SCP) wants one back."""
    return TlsConfig(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key, require_client_cert=True)


@pytest.fixture
def tls_pacs(pki: Pki) -> Iterator[SamplePacs]:
    pacs_client = TlsConfig(ca_file=pki.ca, cert_file=pki.server_cert, key_file=pki.server_key)
    pacs_server = TlsConfig(**{**pacs_client.__dict__, "require_client_cert": True})
    with SamplePacs(ssl_context=server_context(pacs_server), move_tls=client_context(pacs_client)) as pacs:
        yield pacs


def source(pacs: SamplePacs, tls: TlsConfig, *, receiver: str = "direct", retrieve: str = "get") -> DimseStudySource:
    return DimseStudySource(
        name="tls",
        host="127.0.0.1",
        port=pacs.port,
        called_ae=pacs.ae_title,
        timeout_s=10,
        dimse_receiver=receiver,
        retrieve=retrieve,
        tls=tls,
    )


@pytest.mark.parametrize("receiver", ["direct", "pynetdicom"])
@pytest.mark.parametrize("retrieve", ["get", "move"])
def test_echo_find_and_retrieve_over_mutual_tls(tls_pacs, pki, tmp_path, receiver, retrieve) -> None:
    with source(tls_pacs, mutual(pki), receiver=receiver, retrieve=retrieve) as src:
        src.echo()
        studies = src.find_studies(since=WEEK_AGO)
        assert len(studies) == 5
        if retrieve == "move":
            tls_pacs.move_destinations["NIGHTREAD"] = ("127.0.0.1", src.move_port)
        ref = studies[0]
        got = src.retrieve_study(ref.study_instance_uid, dest=tmp_path, expected=ref.number_of_instances)
    assert len(got.files) == ref.number_of_instances
    assert dcmread(got.files[0]).StudyInstanceUID == ref.study_instance_uid


def test_the_sr_write_back_goes_over_tls(tls_pacs, pki) -> None:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"  # stored as a Comprehensive SR by the sample PACS
    with source(tls_pacs, mutual(pki)) as src:
        src.store_instances([ds])
    assert ds.SOPInstanceUID in tls_pacs.stored


def test_a_pacs_with_an_untrusted_certificate_is_refused(tls_pacs, pki, tmp_path) -> None:
    trusting_the_wrong_ca = TlsConfig(ca_file=pki.rogue_ca, cert_file=pki.client_cert, key_file=pki.client_key)
    with pytest.raises(PeerRefused, match="not trusted"), source(tls_pacs, trusting_the_wrong_ca) as src:
        src.retrieve_study("1.2.3", dest=tmp_path)
    with pytest.raises(TransientError, match="check both sides' certificates"):
        source(tls_pacs, trusting_the_wrong_ca).echo()
    assert list(tmp_path.iterdir()) == []


def test_a_client_without_a_certificate_is_refused_by_a_pacs_that_wants_one(tls_pacs, pki, tmp_path) -> None:
    no_certificate = TlsConfig(ca_file=pki.ca)
    with pytest.raises((PeerRefused, TransientError)), source(tls_pacs, no_certificate) as src:
        src.retrieve_study("1.2.3", dest=tmp_path)


def test_a_tls_storage_scp_needs_a_certificate(pki) -> None:
    with pytest.raises(ConfigurationError, match=r"cert_file and tls\.key_file"):
        server_context(TlsConfig(ca_file=pki.ca))
    with pytest.raises(ConfigurationError, match="cannot be loaded"):
        client_context(TlsConfig(ca_file=pki.ca, cert_file=pki.ca, key_file=pki.ca))


def storescu(port: int, pki: Pki, *, client_cert: bool, files: list[str]) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("storescu")
    if binary is None:
        from tests.conftest import require_or_skip

        require_or_skip("dcmtk's storescu is not installed")
    tls = ["+tls", str(pki.client_key), str(pki.client_cert)] if client_cert else ["+tla"]
    return subprocess.run(
        [binary, *tls, "+cf", str(pki.ca), "-aet", "MODALITY", "-aec", "NIGHTREAD", "127.0.0.1", str(port), *files],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("receiver", ["direct", "pynetdicom"])
def test_listen_over_tls_receives_from_dcmtk_and_refuses_a_sender_without_a_certificate(pki, tmp_path, receiver):
    arrivals: list[Arrival] = []
    arrived = threading.Event()

    def record(arrival: Arrival) -> None:
        arrivals.append(arrival)
        arrived.set()

    server_tls = TlsConfig(ca_file=pki.ca, cert_file=pki.server_cert, key_file=pki.server_key, require_client_cert=True)
    ct = get_testdata_file("CT_small.dcm")
    with StoreReceiver(
        inbox=tmp_path / "inbox", allowed_aes=["MODALITY"], on_arrival=record, dimse_receiver=receiver, tls=server_tls
    ) as r:
        refused = storescu(r.port, pki, client_cert=False, files=[ct])
        assert refused.returncode != 0
        assert not arrivals
        sent = storescu(r.port, pki, client_cert=True, files=[ct])
        assert sent.returncode == 0, sent.stderr
        assert arrived.wait(10)
    (filed,) = (tmp_path / "inbox").glob("*/*.dcm")
    assert dcmread(filed).SOPInstanceUID == dcmread(ct).SOPInstanceUID


def test_a_plain_association_to_a_tls_pacs_gets_nowhere(tls_pacs, tmp_path) -> None:
    """The other side of the coin: the sample PACS really speaks TLS only."""
    plain = DimseStudySource(
        name="plain", host="127.0.0.1", port=tls_pacs.port, called_ae=tls_pacs.ae_title, timeout_s=3
    )
    with pytest.raises(TransientError):
        plain.echo()
    with pytest.raises(TransientError):
        plain.retrieve_study("1.2.3", dest=tmp_path)
