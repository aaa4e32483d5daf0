"""The FHIR R4 output: the Bundle validates and reads back with the fhir.resources R4B models, carries the
question bank's codes and the database's P(yes), holds no patient data, is the same for the same
findings; the client POSTs it to a real HTTP server on loopback (which checks the token, the content
type and the Bundle) and maps the server's answers to transient and permanent errors; the nightly on
the sample PACS stores one Bundle per study and sends each once."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle
from sqlmodel import Session, select

from integrations.errors import PeerRefused, PermanentError, TransientError
from integrations.fhir import (
    DISCLAIMER,
    NIGHTREAD_CODES,
    SYSTEMS,
    FhirClient,
    FhirCode,
    FhirFinding,
    FhirImage,
    FhirProvenance,
    FhirSubject,
    build_bundle,
    read_bundle,
)
from tests.services import wait_until

TOKEN = "fhir-token-7f3c9a"

PROVENANCE = FhirProvenance(
    model_name="tiny-random-smolvlm",
    model_revision="abc123",
    model_backend="local",
    model_version_key="tiny-random-smolvlm@abc123/local/0f0f",
    bank_version="bank0001",
    prompt_version="prompt01",
    nightread_version="0.1.0",
)
EFFUSION = FhirCode("SCT", "60046008", "Pleural effusion")
PLEURA = FhirCode("SCT", "3120008", "Pleura")
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"


def finding(question_id: str = "pleural_effusion", p_yes: float | None = 0.8123456, **changes: Any) -> FhirFinding:
    base = FhirFinding(
        question_id=question_id,
        question_text="Is there a pleural effusion?",
        kind="closed",
        code=EFFUSION,
        answer="yes" if p_yes is not None and p_yes >= 0.5 else "no",
        p_yes=p_yes,
        flagged=p_yes is not None and p_yes >= 0.7,
        flag_reason="P(yes)=0.812 >= threshold 0.70" if p_yes is not None and p_yes >= 0.7 else None,
        render_version="r1-512",
        prompt_version="prompt01",
        finding_type=EFFUSION,
        finding_site=PLEURA,
    )
    return replace(base, **changes)


def images(p_yes: float = 0.8123456) -> list[FhirImage]:
    impression = finding(
        "xr_impression",
        None,
        kind="open",
        question_text="What is the most important finding?",
        code=FhirCode("99NIGHTREAD", "xr_impression", "Most important finding"),
        answer="no acute finding",
        finding_type=None,
        finding_site=None,
    )
    return [
        FhirImage(
            sop_instance_uid=f"{STUDY_UID}.{n}",
            frame=0,
            modality="CR",
            caption=f"A chest radiograph, view {view}.",
            findings=(
                finding(p_yes=p_yes),
                finding("pneumothorax", 0.1, code=FhirCode("SCT", "36118008", "Pneumothorax")),
                impression,
            ),
        )
        for n, view in ((1, "PA"), (2, "LL"))
    ]


def resources(bundle: Bundle, kind: str) -> list[Any]:
    return [e.resource for e in bundle.entry if e.resource.get_resource_type() == kind]


# --- the Bundle -----------------------------------------------------------------------------------------


def test_bundle_reads_back_with_codes_probabilities_and_references() -> None:
    built = build_bundle(study_uid=STUDY_UID, images=images(), provenance=PROVENANCE)
    bundle = read_bundle(built.to_bytes())
    assert bundle.type == "transaction"
    (device,) = resources(bundle, "Device")
    (report,) = resources(bundle, "DiagnosticReport")
    observations = resources(bundle, "Observation")
    assert len(observations) == built.observations == 6
    urls = {e.resource.get_resource_type(): e.fullUrl for e in bundle.entry}
    for entry in bundle.entry:  # every entry: urn:uuid, a conditional PUT on its own identifier
        identifier = entry.resource.identifier[0]
        assert entry.fullUrl.startswith("urn:uuid:")
        assert entry.request.method == "PUT"
        assert (
            entry.request.url
            == f"{entry.resource.get_resource_type()}?identifier={identifier.system}|{identifier.value}"
        )

    assert device.deviceName[0].name == "tiny-random-smolvlm"
    assert {v.type.text: v.value for v in device.version}["model revision"] == "abc123"

    assert report.status == "preliminary"
    assert {(c.system, c.code) for c in report.category[0].coding} >= {
        ("http://terminology.hl7.org/CodeSystem/v2-0074", "RAD")
    }
    assert (report.code.coding[0].system, report.code.coding[0].code) == ("http://loinc.org", "18748-4")
    assert report.imagingStudy[0].identifier.system == "urn:dicom:uid"
    assert report.imagingStudy[0].identifier.value == f"urn:oid:{STUDY_UID}"
    assert report.subject is None
    assert {r.reference for r in report.result} == {
        e.fullUrl for e in bundle.entry if e.resource.get_resource_type() == "Observation"
    }
    assert report.conclusion.startswith(DISCLAIMER)
    assert "A chest radiograph, view PA." in report.conclusion
    assert report.extension[0].valueString == DISCLAIMER
    assert report.meta.security[0].code == "AIAST"

    by_key = {(o.derivedFrom[1].identifier.value, o.code.coding[-1].code): o for o in observations}
    effusion = by_key[(f"urn:oid:{STUDY_UID}.1", "pleural_effusion")]
    assert effusion.status == "preliminary"
    assert (effusion.code.coding[0].system, effusion.code.coding[0].code) == ("http://snomed.info/sct", "60046008")
    assert effusion.valueCodeableConcept.coding[0].code == "373066001"  # Yes
    (p_yes,) = [c for c in effusion.component if c.code.coding[0].code == "PYES"]
    assert float(p_yes.valueQuantity.value) == pytest.approx(0.8123456, abs=1e-6)
    assert (p_yes.valueQuantity.system, p_yes.valueQuantity.code) == ("http://unitsofmeasure.org", "1")
    assert effusion.bodySite.coding[0].code == "3120008"
    assert effusion.interpretation[0].coding[0].code == "FLAG"
    assert effusion.device.reference == urls["Device"]
    assert effusion.derivedFrom[0].identifier.value == f"urn:oid:{STUDY_UID}"
    assert effusion.derivedFrom[1].type == "Media"
    assert "question_bank=bank0001" in effusion.note[0].text
    assert "render=r1-512" in effusion.note[0].text
    pneumothorax = by_key[(f"urn:oid:{STUDY_UID}.1", "pneumothorax")]
    assert pneumothorax.valueCodeableConcept.coding[0].code == "373067005"  # No
    assert pneumothorax.interpretation is None
    impression = by_key[(f"urn:oid:{STUDY_UID}.2", "xr_impression")]
    assert impression.valueString == "no acute finding"
    assert impression.code.coding[0].system == NIGHTREAD_CODES
    assert impression.component is None


def test_bundle_is_deterministic_and_identifiers_outlive_content() -> None:
    first = build_bundle(study_uid=STUDY_UID, images=images(), provenance=PROVENANCE)
    again = build_bundle(study_uid=STUDY_UID, images=list(reversed(images())), provenance=PROVENANCE)
    assert first.to_bytes() == again.to_bytes()
    assert first.content_sha == again.content_sha
    changed = build_bundle(study_uid=STUDY_UID, images=images(p_yes=0.31), provenance=PROVENANCE)
    assert changed.content_sha != first.content_sha
    # the same report and Observations on the server: identifiers and full URLs stay
    assert changed.report_identifier == first.report_identifier
    assert [e.fullUrl for e in changed.bundle.entry] == [e.fullUrl for e in first.bundle.entry]
    other_bank = build_bundle(
        study_uid=STUDY_UID, images=images(), provenance=replace(PROVENANCE, bank_version="bank0002")
    )
    assert other_bank.report_identifier != first.report_identifier


def test_subject_only_when_given() -> None:
    plain = build_bundle(study_uid=STUDY_UID, images=images(), provenance=PROVENANCE).to_bytes()
    assert b"Patient" not in plain
    built = build_bundle(
        study_uid=STUDY_UID,
        images=images(),
        provenance=PROVENANCE,
        subject=FhirSubject(system="urn:oid:1.2.3.4.5", value="MRN0001"),
    )
    (report,) = resources(built.bundle, "DiagnosticReport")
    assert (report.subject.type, report.subject.identifier.value) == ("Patient", "MRN0001")
    assert all(o.subject.identifier.value == "MRN0001" for o in resources(built.bundle, "Observation"))


def test_code_schemes_map_to_fhir_systems_and_bad_input_is_named() -> None:
    for scheme, system in (
        ("SCT", "http://snomed.info/sct"),
        ("RADLEX", "http://radlex.org"),
        ("99NIGHTREAD", NIGHTREAD_CODES),
    ):
        im = replace(images()[0], findings=(finding(code=FhirCode(scheme, "RID1", "x")),))
        (obs,) = resources(build_bundle(study_uid=STUDY_UID, images=[im], provenance=PROVENANCE).bundle, "Observation")
        assert obs.code.coding[0].system == system == SYSTEMS[scheme]
    unknown = replace(images()[0], findings=(finding(code=FhirCode("ICD10", "J90", "Pleural effusion")),))
    with pytest.raises(PermanentError, match="ICD10"):
        build_bundle(study_uid=STUDY_UID, images=[unknown], provenance=PROVENANCE)
    with pytest.raises(PermanentError, match="no annotated images"):
        build_bundle(study_uid=STUDY_UID, images=[], provenance=PROVENANCE)
    empty_value = replace(images()[0], findings=(finding(code=FhirCode("SCT", "", "Pleural effusion")),))
    with pytest.raises(PermanentError, match=r"not valid: .*code"):
        build_bundle(study_uid=STUDY_UID, images=[empty_value], provenance=PROVENANCE)


# --- a FHIR server on loopback ------------------------------------------------------------------------


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gave up (the timeout test) leaves a broken pipe behind: expected, not reported."""


@dataclass(frozen=True)
class Received:
    path: str
    authorization: str
    content_type: str
    bundle: Bundle | None


class FhirServer:
    """A FHIR server stand-in: POST /fhir checks the bearer token, the content type and that the body is a
    transaction Bundle (R4B models), and answers a transaction-response; /broken/fhir answers 503,
    /invalid/fhir 422 with an OperationOutcome whose diagnostics quote the request, /moved/fhir 301,
    /slow/fhir waits until the test releases it."""

    LEAK = "DIAGNOSTICS-QUOTING-THE-BUNDLE"

    def __init__(self, token: str, *, ssl_context: Any = None) -> None:
        self.token = token
        self.received: list[Received] = []
        self.release = threading.Event()
        self.httpd = _QuietServer(("127.0.0.1", 0), self._handler())
        if ssl_context is not None:
            self.httpd.socket = ssl_context.wrap_socket(self.httpd.socket, server_side=True)
        self.scheme = "https" if ssl_context is not None else "http"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="fhir-server", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def url(self, prefix: str = "") -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{prefix}/fhir"

    def start(self) -> FhirServer:
        self.thread.start()

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(listening, timeout=10, what="the FHIR test server")
        return self

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _send(self, code: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                raw = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(raw)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(raw)

            def _outcome(self, code: int, issue: str, diagnostics: str = "") -> None:
                self._send(
                    code,
                    {
                        "resourceType": "OperationOutcome",
                        "issue": [{"severity": "error", "code": issue, "diagnostics": diagnostics or issue}],
                    },
                )

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                try:
                    bundle: Bundle | None = Bundle.model_validate_json(body)
                except Exception:
                    bundle = None
                server.received.append(
                    Received(
                        path=self.path,
                        authorization=self.headers.get("Authorization", ""),
                        content_type=self.headers.get("Content-Type", ""),
                        bundle=bundle,
                    )
                )
                prefix = self.path.removesuffix("/fhir")
                if prefix == "/slow":
                    server.release.wait(timeout=30)
                if prefix == "/broken":
                    return self._outcome(503, "transient")
                if prefix == "/moved":
                    return self._send(301, {}, {"Location": "http://elsewhere.example/fhir"})
                if self.headers.get("Authorization") != f"Bearer {server.token}":
                    return self._outcome(401, "login")
                if not self.headers.get("Content-Type", "").startswith("application/fhir+json"):
                    return self._outcome(415, "not-supported")
                if bundle is None or bundle.type != "transaction":
                    return self._outcome(400, "structure")
                if prefix == "/invalid":
                    return self._outcome(422, "invalid", f"{server.LEAK}: {body[:200].decode(errors='replace')}")
                entries = [
                    {
                        "response": {
                            "status": "201 Created",
                            "location": f"{e.resource.get_resource_type()}/{n}/_history/1",
                        }
                    }
                    for n, e in enumerate(bundle.entry or [], 1)
                ]
                self._send(200, {"resourceType": "Bundle", "type": "transaction-response", "entry": entries})

        return Handler


@pytest.fixture
def fhir_server() -> Iterator[FhirServer]:
    server = FhirServer(TOKEN).start()
    try:
        yield server
    finally:
        server.stop()


def body() -> bytes:
    return build_bundle(study_uid=STUDY_UID, images=images(), provenance=PROVENANCE).to_bytes()


def test_post_arrives_with_token_content_type_and_a_bundle(fhir_server: FhirServer) -> None:
    with FhirClient(base_url=fhir_server.url(), bearer_token=TOKEN, timeout_s=10) as client:
        result = client.post_bundle(body())
    assert result.status_code == 200
    assert len(result.entry_statuses) == 1 + 6 + 1
    assert all(s.startswith("201") for s in result.entry_statuses)
    (got,) = fhir_server.received
    assert got.authorization == f"Bearer {TOKEN}"
    assert got.content_type.startswith("application/fhir+json")
    assert got.bundle is not None
    assert got.bundle.type == "transaction"
    assert [e.fullUrl for e in got.bundle.entry] == [e.fullUrl for e in read_bundle(body()).entry]


@pytest.mark.parametrize(
    ("prefix", "token", "error", "text"),
    [
        ("/broken", TOKEN, TransientError, "HTTP 503"),
        ("", "wrong-token", PeerRefused, "HTTP 401 (login)"),
        ("/invalid", TOKEN, PeerRefused, "HTTP 422 (invalid)"),
        ("/moved", TOKEN, PeerRefused, "HTTP 301 redirect"),
    ],
)
def test_server_answers_map_to_transient_and_permanent_errors(
    fhir_server: FhirServer, prefix: str, token: str, error: type[Exception], text: str
) -> None:
    with (
        FhirClient(base_url=fhir_server.url(prefix), bearer_token=token, timeout_s=10) as client,
        pytest.raises(error) as info,
    ):
        client.post_bundle(body())
    message = str(info.value)
    assert text in message
    assert isinstance(info.value, PermanentError) == (error is PeerRefused)
    for secret in (TOKEN, "wrong-token", FhirServer.LEAK, STUDY_UID, "pleural"):
        assert secret not in message


def test_unreachable_and_silent_servers_are_transient(fhir_server: FhirServer) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with (
        FhirClient(base_url=f"http://127.0.0.1:{closed}/fhir", timeout_s=5) as client,
        pytest.raises(TransientError, match="cannot reach"),
    ):
        client.post_bundle(body())
    with (
        FhirClient(base_url=fhir_server.url("/slow"), bearer_token=TOKEN, timeout_s=0.3) as client,
        pytest.raises(TransientError, match="no answer in time"),
    ):
        client.post_bundle(body())


def test_tls_is_verified_against_the_ca_file(tmp_path: Path) -> None:
    import ssl

    from tests.tls_certs import make_pki

    pki = make_pki(tmp_path / "pki")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    server = FhirServer(TOKEN, ssl_context=context).start()
    try:
        with FhirClient(base_url=server.url(), bearer_token=TOKEN, ca_file=pki.ca, timeout_s=10) as client:
            assert client.post_bundle(body()).status_code == 200
        for untrusted in (pki.rogue_ca, None):
            with (
                FhirClient(base_url=server.url(), bearer_token=TOKEN, ca_file=untrusted, timeout_s=10) as client,
                pytest.raises(PeerRefused, match="TLS certificate"),
            ):
                client.post_bundle(body())
    finally:
        server.stop()


def test_fhir_settings_keep_the_token_secret_and_check_the_endpoint(tmp_path: Path) -> None:
    from fastapi.encoders import jsonable_encoder
    from pydantic import ValidationError

    from flows.wiring.settings import NightreadSettings

    s = NightreadSettings(
        data_dir=tmp_path, fhir={"enabled": True, "endpoint": "https://fhir.example/r4", "bearer_token": TOKEN}
    )
    assert s.fhir.bearer_token.get_secret_value() == TOKEN
    for shown in (repr(s), s.model_dump_json(), json.dumps(jsonable_encoder(s)), str(s.masked())):
        assert TOKEN not in shown
    for bad, why in (
        ({"endpoint": "https://fhir.example/r4"}, "needs enabled"),
        ({"enabled": True, "endpoint": "ftp://fhir.example"}, "http"),
        ({"enabled": True, "endpoint": f"https://u:{TOKEN}@fhir.example/r4"}, "bearer_token"),
    ):
        with pytest.raises(ValidationError, match=why) as info:
            NightreadSettings(data_dir=tmp_path, fhir=bad)
        assert TOKEN not in str(info.value)


# --- end to end: the nightly on the sample PACS ---------------------------------------------------------


@pytest.mark.slow
def test_nightly_stores_one_bundle_per_study_and_sends_it_once(
    prefect_harness, make_settings, sample_pacs, fhir_server: FhirServer
) -> None:
    from db.migrate import upgrade
    from db.models import Failure, Finding, Study
    from db.session import make_engine
    from flows.annotate import annotate_study
    from flows.nightly import run_nightly
    from flows.rules.questions import load_bank
    from integrations.storage import LocalObjectStore

    fhir = {"enabled": True, "endpoint": fhir_server.url(), "bearer_token": TOKEN}
    settings = make_settings(pacs={"port": sample_pacs.port, "called_ae": sample_pacs.ae_title}, fhir=fhir)
    upgrade(settings.database_url)
    first = run_nightly(settings)
    assert first["studies_done"] == 5
    assert first["fhir_bundles"] == first["fhir_sent"] == 5
    assert "fhir_failures" not in first

    engine = make_engine(settings.database_url)
    with Session(engine) as s:
        studies = {st.study_instance_uid: st for st in s.exec(select(Study)).all()}
        findings = s.exec(select(Finding)).all()
    store = LocalObjectStore(settings.storage_root)
    keys = sorted(k for k in store.list("fhir/") if k.endswith(".json"))
    assert len(keys) == 5
    assert not any(uid in key for key in keys for uid in studies)
    bank = {q.id: q for q in load_bank().questions}
    p_yes = {(f.image_id, f.question_id): f.probability for f in findings}
    sop_of = _image_sops(engine)
    names = {
        str(value)
        for study in sample_pacs.archive.studies
        for ds in study.instances
        for value in (ds.PatientName, ds.PatientID, ds.AccessionNumber, ds.PatientBirthDate)
    }
    seen_observations = 0
    for key in keys:
        raw = store.get(key)
        text = raw.decode()
        for phi in names:
            assert phi not in text, f"{phi!r} in {key}"
        assert "SYNTHETIC" not in text
        bundle = read_bundle(raw)
        (report,) = resources(bundle, "DiagnosticReport")
        assert report.subject is None
        study_uid = report.imagingStudy[0].identifier.value.removeprefix("urn:oid:")
        assert study_uid in studies
        for obs in resources(bundle, "Observation"):
            question_id = obs.code.coding[-1].code
            spec = bank[question_id]
            coding = obs.code.coding[0]
            assert (coding.system, coding.code, coding.display) == (
                SYSTEMS[spec.code.scheme],
                spec.code.value,
                spec.code.meaning,
            )
            if spec.finding_site is not None:
                assert obs.bodySite.coding[0].code == spec.finding_site.value
            sop = obs.derivedFrom[1].identifier.value.removeprefix("urn:oid:")
            if spec.kind == "closed":
                (component,) = [c for c in obs.component if c.code.coding[0].code == "PYES"]
                expected = [p for (image_id, q), p in p_yes.items() if q == question_id and sop_of[image_id] == sop]
                assert float(component.valueQuantity.value) == pytest.approx(expected[0], abs=1e-6)
            seen_observations += 1
    assert seen_observations == len(findings)
    # at the server: one transaction per study, with the token
    assert len(fhir_server.received) == 5
    assert all(r.authorization == f"Bearer {TOKEN}" and r.bundle is not None for r in fhir_server.received)
    assert sorted(len(r.bundle.entry) for r in fhir_server.received if r.bundle) == sorted(
        len(read_bundle(store.get(k)).entry) for k in keys
    )

    # again: the same findings, the same Bundle; nothing stored or sent twice
    study_id = next(iter(studies.values())).id
    assert study_id is not None
    again = annotate_study(study_id=study_id, settings=settings)
    assert again.get("fhir_bundles", 0) == again.get("fhir_sent", 0) == 0
    assert sorted(k for k in store.list("fhir/") if k.endswith(".json")) == keys
    assert len(fhir_server.received) == 5

    # a failing endpoint: retried, recorded as a failure of stage fhir; the study is done all the same
    broken = make_settings(
        pacs={"port": sample_pacs.port, "called_ae": sample_pacs.ae_title},
        fhir={**fhir, "endpoint": fhir_server.url("/broken")},
    )
    result = annotate_study(study_id=study_id, settings=broken)
    assert result["fhir_failures"] == 1
    assert result["studies_done"] == 1
    assert [r.path for r in fhir_server.received[5:]] == ["/broken/fhir"] * 2  # the first try and one retry
    with Session(engine) as s:
        (failure,) = s.exec(select(Failure).where(Failure.stage == "fhir")).all()
        assert s.get(Study, study_id).status == "done"
    assert "HTTP 503" in failure.message
    assert failure.object_ref.startswith(f"study:{study_id}:mv:")


def _image_sops(engine: Any) -> dict[int, str]:
    from db.models import Image

    with Session(engine) as s:
        return {i.id: i.sop_instance_uid for i in s.exec(select(Image)).all() if i.id is not None}
