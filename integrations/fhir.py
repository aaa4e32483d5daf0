"""nightread's findings as FHIR R4: one transaction Bundle per study and model version, and a small
client that POSTs it to a FHIR server.

The resources are built and validated with `fhir.resources.R4B` (FHIR 4.3): fhir.resources 8 has R5 at
its top level and no R4 package, and R4B's Bundle, DiagnosticReport, Observation and Device are
wire-compatible with R4 (4.0.1) for every element used here. The Bundle:

    Bundle (type transaction)                          one POST to the server's base URL creates it all
      Device             the model: name, revision, backend; identifier = hash of the model version
      Observation ×N     one per finding (image × question)
        code               the question bank's code (SCT, RADLEX or 99NIGHTREAD) + the question id
        valueCodeableConcept  SCT 373066001 Yes / 373067005 No         closed questions
        component          (99NIGHTREAD PYES) P(yes) as valueQuantity, UCUM "1"
        component          (DCM 121071 Finding) the bank's finding type, when it has one
        valueString        the generated text                           open questions
        bodySite           the bank's finding site
        interpretation     (99NIGHTREAD FLAG) when flagged for review, the reason as text
        derivedFrom        the ImagingStudy (Study Instance UID) and the image (Media, SOP Instance UID)
        device, method, note   the model Device; question bank, prompt and render versions
      DiagnosticReport   status preliminary, category RAD, LOINC 18748-4, imagingStudy by UID,
                         result → the Observations, conclusion = the captions

Every entry is a conditional PUT on its identifier (`Observation?identifier=system|value`), so sending
the same Bundle twice changes nothing on the server; references between entries are urn:uuid full
URLs derived from the identifiers. Identifiers are hashes (of the Study Instance UID and the model
version), never patient data; the report names the patient (`subject`) only when the caller passes
an identifier. Every resource carries "AI generated - not for clinical use" and the HL7 security
label AIAST (artificial intelligence asserted).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import ssl
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from fhir.resources.R4B.bundle import Bundle
from pydantic import ValidationError

from integrations.errors import ConfigurationError, PeerRefused, PermanentError, TransientError

DISCLAIMER = "AI generated - not for clinical use"
FHIR_JSON = "application/fhir+json"

# coding scheme designators (DICOM PS3.16 style, as in the SR and the question bank) -> FHIR systems
NIGHTREAD_CODES = "urn:nightread:codes"
SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "RADLEX": "http://radlex.org",
    "99NIGHTREAD": NIGHTREAD_CODES,
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "LN": "http://loinc.org",
    "UCUM": "http://unitsofmeasure.org",
}
DICOM_UID = "urn:dicom:uid"  # identifiers whose value is urn:oid:<UID>
QUESTION_ID = "urn:nightread:question-id"
ID_DEVICE = "urn:nightread:id:model-version"
ID_REPORT = "urn:nightread:id:report"
ID_OBSERVATION = "urn:nightread:id:observation"
NOT_FOR_CLINICAL_USE = "urn:nightread:fhir:extension:not-for-clinical-use"
AI_ASSERTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}
_UUIDS = uuid.UUID("6b1f6c1e-4f0e-5c55-9a51-6e6967687472")  # namespace of nightread's urn:uuid full URLs

YES = {"system": SYSTEMS["SCT"], "code": "373066001", "display": "Yes"}
NO = {"system": SYSTEMS["SCT"], "code": "373067005", "display": "No"}
PYES = {"system": NIGHTREAD_CODES, "code": "PYES", "display": "Probability of yes"}
FLAG = {"system": NIGHTREAD_CODES, "code": "FLAG", "display": "Flagged for review"}
FINDING = {"system": SYSTEMS["DCM"], "code": "121071", "display": "Finding"}
RADIOLOGY = [
    {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD", "display": "Radiology"},
    {"system": SYSTEMS["LN"], "code": "LP29684-5", "display": "Radiology"},
]
IMAGING_STUDY_REPORT = {"system": SYSTEMS["LN"], "code": "18748-4", "display": "Diagnostic imaging study"}
IMAGING = {
    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
    "code": "imaging",
    "display": "Imaging",
}
MAX_TEXT = 1024  # a caption or an open answer in the Bundle
MAX_RESPONSE_BYTES = 4 << 20  # of a server's answer, read; the rest is dropped


@dataclass(frozen=True)
class FhirCode:
    """A coded concept as the question bank writes it: scheme designator, value, meaning."""

    scheme: str
    value: str
    meaning: str


@dataclass(frozen=True)
class FhirFinding:
    question_id: str
    question_text: str
    kind: str  # closed | open
    code: FhirCode
    answer: str  # closed: yes | no; open: the generated text
    p_yes: float | None
    flagged: bool
    flag_reason: str | None
    render_version: str
    prompt_version: str
    finding_type: FhirCode | None = None
    finding_site: FhirCode | None = None


@dataclass(frozen=True)
class FhirImage:
    sop_instance_uid: str
    frame: int
    modality: str
    caption: str | None
    findings: tuple[FhirFinding, ...]


@dataclass(frozen=True)
class FhirProvenance:
    model_name: str
    model_revision: str
    model_backend: str
    model_version_key: str  # what makes the model version unique (name, revision, backend, options hash)
    bank_version: str
    prompt_version: str
    nightread_version: str


@dataclass(frozen=True)
class FhirSubject:
    """The patient, by identifier only (set only where patient identifiers are kept on purpose)."""

    system: str
    value: str


@dataclass(frozen=True)
class BuiltBundle:
    bundle: Bundle
    report_identifier: str  # the DiagnosticReport's identifier value (a hash)
    content_sha: str  # sha256 of `to_bytes()`: the same findings give the same bytes
    observations: int

    def to_bytes(self) -> bytes:
        return self.bundle.model_dump_json().encode()


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(("nightread-fhir", *parts)).encode()).hexdigest()[:32]


def _full_url(system: str, value: str) -> str:
    return f"urn:uuid:{uuid.uuid5(_UUIDS, f'{system}|{value}')}"


def coding(code: FhirCode) -> dict[str, str]:
    """A FHIR Coding of a bank code; an unknown scheme is a PermanentError naming it."""
    system = SYSTEMS.get(code.scheme)
    if system is None:
        raise PermanentError(
            f"code {code.value!r}: scheme {code.scheme!r} has no FHIR system (known: {sorted(SYSTEMS)})"
        )
    return {"system": system, "code": code.value, "display": code.meaning}


def _uid_ref(kind: str, uid: str, display: str | None = None) -> dict[str, Any]:
    ref: dict[str, Any] = {"type": kind, "identifier": {"system": DICOM_UID, "value": f"urn:oid:{uid}"}}
    if display:
        ref["display"] = display
    return ref


def _instant(at: dt.datetime) -> str:
    at = at if at.tzinfo else at.replace(tzinfo=dt.UTC)  # SQLite gives naive UTC datetimes back
    return at.astimezone(dt.UTC).isoformat(timespec="seconds")


def _entry(resource: dict[str, Any], system: str, value: str) -> dict[str, Any]:
    kind = resource["resourceType"]
    return {
        "fullUrl": _full_url(system, value),
        "resource": resource,
        "request": {"method": "PUT", "url": f"{kind}?identifier={system}|{value}"},
    }


def _meta() -> dict[str, Any]:
    return {"security": [AI_ASSERTED]}


def _device(provenance: FhirProvenance, device_id: str) -> dict[str, Any]:
    p = provenance
    return {
        "resourceType": "Device",
        "meta": _meta(),
        "identifier": [{"system": ID_DEVICE, "value": device_id}],
        "status": "active",
        "manufacturer": "nightread",
        "deviceName": [{"name": p.model_name[:255], "type": "model-name"}],
        "type": {"text": "vision-language model (nightread pre-reading)"},
        "version": [
            {"type": {"text": "model revision"}, "value": p.model_revision or "unknown"},
            {"type": {"text": "backend"}, "value": p.model_backend},
            {"type": {"text": "model version key"}, "value": p.model_version_key},
            {"type": {"text": "nightread"}, "value": p.nightread_version},
        ],
        "note": [{"text": DISCLAIMER}],
    }


def _observation(
    *,
    study_uid: str,
    image: FhirImage,
    finding: FhirFinding,
    provenance: FhirProvenance,
    identifier: str,
    device_url: str,
    subject: dict[str, Any] | None,
    issued: str | None,
) -> dict[str, Any]:
    f = finding
    code = coding(f.code)
    codings = [code]
    if (code["system"], code["code"]) != (NIGHTREAD_CODES, f.question_id):
        codings.append({"system": QUESTION_ID, "code": f.question_id})
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "meta": _meta(),
        "extension": [{"url": NOT_FOR_CLINICAL_USE, "valueString": DISCLAIMER}],
        "identifier": [{"system": ID_OBSERVATION, "value": identifier}],
        "status": "preliminary",
        "category": [{"coding": [IMAGING]}],
        "code": {"coding": codings, "text": f.question_text},
        "derivedFrom": [
            _uid_ref("ImagingStudy", study_uid),
            _uid_ref("Media", image.sop_instance_uid, f"{image.modality} image, frame {image.frame + 1}"),
        ],
        "device": {"reference": device_url, "display": provenance.model_name[:255]},
        "method": {
            "text": "vision-language model: P(yes) by scoring the answer tokens"
            if f.kind == "closed"
            else "vision-language model: generated answer"
        },
        "note": [
            {
                "text": f"{DISCLAIMER}. question_bank={provenance.bank_version}; prompt={f.prompt_version}; "
                f"render={f.render_version}; question={f.question_id}"
            }
        ],
    }
    if subject is not None:
        obs["subject"] = subject
    if issued is not None:
        obs["issued"] = issued
    components: list[dict[str, Any]] = []
    if f.kind == "closed" and f.p_yes is not None:
        obs["valueCodeableConcept"] = {"coding": [YES if f.answer.lower() == "yes" else NO]}
        components.append(
            {
                "code": {"coding": [PYES], "text": "P(yes)"},
                "valueQuantity": {
                    "value": round(float(f.p_yes), 6),
                    "unit": "1",
                    "system": SYSTEMS["UCUM"],
                    "code": "1",
                },
            }
        )
    elif f.kind == "open" and f.answer.strip():
        obs["valueString"] = f.answer.strip()[:MAX_TEXT]
    else:
        obs["dataAbsentReason"] = {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "unknown"}]
        }
    if f.finding_type is not None:
        components.append({"code": {"coding": [FINDING]}, "valueCodeableConcept": {"coding": [coding(f.finding_type)]}})
    if components:
        obs["component"] = components
    if f.finding_site is not None:
        obs["bodySite"] = {"coding": [coding(f.finding_site)]}
    if f.flagged:
        obs["interpretation"] = [{"coding": [FLAG], "text": (f.flag_reason or "flagged for review")[:255]}]
    return obs


def _conclusion(images: Sequence[FhirImage]) -> str:
    lines = [f"{DISCLAIMER}."]
    captioned = [im for im in images if im.caption and im.caption.strip()]
    for n, im in enumerate(captioned, 1):
        assert im.caption is not None
        lines.append(f"{im.modality} image {n}: {im.caption.strip()[:MAX_TEXT]}")
    return "\n".join(lines)


def build_bundle(
    *,
    study_uid: str,
    images: Sequence[FhirImage],
    provenance: FhirProvenance,
    subject: FhirSubject | None = None,
    issued: dt.datetime | None = None,
) -> BuiltBundle:
    """The study's transaction Bundle, validated by the fhir.resources R4B models. The same arguments
    give the same bytes. Raises PermanentError for an empty report or an invalid resource (naming the
    element, never echoing its value)."""
    if not study_uid:
        raise PermanentError('build_bundle: argument "study_uid" is empty')
    ordered = sorted(images, key=lambda i: (i.sop_instance_uid, i.frame))
    if not any(im.findings or im.caption for im in ordered):
        raise PermanentError("no annotated images to report")
    p = provenance
    study_key = _digest("study", study_uid)
    device_id = _digest("device", p.model_version_key)
    report_id = _digest("report", study_uid, p.model_version_key, p.bank_version)
    device_url = _full_url(ID_DEVICE, device_id)
    subject_ref = (
        {"type": "Patient", "identifier": {"system": subject.system, "value": subject.value}} if subject else None
    )
    issued_at = _instant(issued) if issued is not None else None
    entries = [_entry(_device(p, device_id), ID_DEVICE, device_id)]
    results = []
    for im in ordered:
        for f in sorted(im.findings, key=lambda f: f.question_id):
            obs_id = _digest("observation", report_id, im.sop_instance_uid, str(im.frame), f.question_id)
            obs = _observation(
                study_uid=study_uid,
                image=im,
                finding=f,
                provenance=p,
                identifier=obs_id,
                device_url=device_url,
                subject=subject_ref,
                issued=issued_at,
            )
            entries.append(_entry(obs, ID_OBSERVATION, obs_id))
            results.append({"reference": _full_url(ID_OBSERVATION, obs_id)})
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "meta": _meta(),
        "extension": [{"url": NOT_FOR_CLINICAL_USE, "valueString": DISCLAIMER}],
        "identifier": [{"system": ID_REPORT, "value": report_id}],
        "status": "preliminary",
        "category": [{"coding": RADIOLOGY}],
        "code": {"coding": [IMAGING_STUDY_REPORT], "text": f"nightread AI findings ({DISCLAIMER})"},
        "imagingStudy": [_uid_ref("ImagingStudy", study_uid)],
        "conclusion": _conclusion(ordered),
    }
    if subject_ref is not None:
        report["subject"] = subject_ref
    if issued_at is not None:
        report["issued"] = issued_at
    if results:
        report["result"] = results
    entries.append(_entry(report, ID_REPORT, report_id))
    try:
        bundle = Bundle.model_validate({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    except ValidationError as exc:
        where = "; ".join(
            f"{'.'.join(str(x) for x in e['loc'])}: {e['type']}" for e in exc.errors(include_input=False)[:5]
        )
        raise PermanentError(f"the FHIR Bundle of study {study_key[:12]} is not valid: {where}") from None
    body = bundle.model_dump_json().encode()
    return BuiltBundle(
        bundle=bundle,
        report_identifier=report_id,
        content_sha=hashlib.sha256(body).hexdigest(),
        observations=len(results),
    )


def read_bundle(source: bytes | str | Path) -> Bundle:
    """Parse a Bundle (JSON bytes, text or a file) with the R4B models, as a FHIR server would."""
    raw = source.read_bytes() if isinstance(source, Path) else source
    return Bundle.model_validate_json(raw)


# --- the client -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransactionResult:
    """What the server answered: its HTTP status and each entry's status (e.g. "201 Created")."""

    status_code: int
    entry_statuses: tuple[str, ...]


def _tls_failure(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(8):  # httpx.ConnectError <- httpcore.ConnectError <- ssl.SSLError
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class FhirClient:
    """POSTs transaction Bundles to a FHIR server's base URL, with a bearer token, a bounded timeout
    and TLS verified (against `ca_file` when given, else the system's CAs). Errors follow
    integrations.errors: a server error (5xx, 408, 429), a timeout or a refused connection is a
    TransientError; any other 4xx, a redirect or an untrusted certificate is PeerRefused (permanent).
    Messages name the server and the status, never the token, the Bundle or the server's text."""

    def __init__(
        self,
        *,
        base_url: str,
        bearer_token: str = "",
        timeout_s: float = 30.0,
        ca_file: Path | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigurationError('FhirClient: argument "base_url" must be an http:// or https:// URL')
        self.base_url = base_url
        self.where = f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"
        if ca_file is not None:
            try:  # a context of our own: SSL_CERT_FILE and the like cannot replace the CA asked for
                verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigurationError(f"fhir.ca_file cannot be read as a PEM CA bundle: {ca_file}") from exc
        else:
            verify = True
        headers = {"Accept": FHIR_JSON, "Content-Type": FHIR_JSON}
        if bearer_token:
            headers["Authorization"] = f"Bearer {bearer_token}"
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            verify=verify,
            follow_redirects=False,
            transport=transport,
        )

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def post_bundle(self, body: bytes) -> TransactionResult:
        """POST one transaction Bundle (its JSON bytes) to the base URL."""
        try:
            with self._client.stream("POST", self.base_url, content=body) as response:
                code = response.status_code
                answer = b"".join(_bounded(response.iter_bytes(), MAX_RESPONSE_BYTES))
        except httpx.TimeoutException as exc:
            raise TransientError(f"FHIR server {self.where}: no answer in time ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            if _tls_failure(exc):
                raise PeerRefused(
                    f"FHIR server {self.where}: the TLS certificate is not trusted or the handshake failed"
                ) from None
            raise TransientError(f"FHIR server {self.where}: cannot reach it ({type(exc).__name__})") from None
        if code >= 500 or code in (408, 429):
            raise TransientError(f"FHIR server {self.where}: HTTP {code}")
        if 300 <= code < 400:
            raise PeerRefused(f"FHIR server {self.where}: HTTP {code} redirect; set the endpoint to the final URL")
        if code >= 400:
            issues = _issue_codes(answer)
            raise PeerRefused(
                f"FHIR server {self.where} refused the Bundle: HTTP {code}"
                + (f" ({', '.join(issues)})" if issues else "")
            )
        statuses = _entry_statuses(answer)
        failed = [s for s in statuses if not s.startswith("2")]
        if failed:
            raise PeerRefused(f"FHIR server {self.where}: {len(failed)} entries not accepted ({failed[0][:40]})")
        return TransactionResult(status_code=code, entry_statuses=statuses)


def _bounded(chunks: Iterator[bytes], limit: int) -> Iterator[bytes]:
    left = limit
    for chunk in chunks:
        if left <= 0:
            return
        yield chunk[:left]
        left -= len(chunk)


def _json(answer: bytes) -> dict[str, Any]:
    try:
        data = json.loads(answer)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _issue_codes(answer: bytes) -> list[str]:
    """The issue codes of an OperationOutcome (`invalid`, `processing`, ...): codes from a fixed value
    set, unlike `diagnostics`, which may quote the Bundle."""
    data = _json(answer)
    if data.get("resourceType") != "OperationOutcome":
        return []
    codes = [str(i.get("code"))[:32] for i in data.get("issue", []) if isinstance(i, dict) and i.get("code")]
    return list(dict.fromkeys(codes))[:3]


def _entry_statuses(answer: bytes) -> tuple[str, ...]:
    data = _json(answer)
    if data.get("resourceType") != "Bundle":
        return ()
    out = []
    for entry in data.get("entry", []):
        response = entry.get("response") if isinstance(entry, dict) else None
        if isinstance(response, dict) and response.get("status"):
            out.append(str(response["status"])[:64])
    return tuple(out)
