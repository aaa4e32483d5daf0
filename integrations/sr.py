"""nightread's findings as DICOM SR the way the IHE AI Results (AIR) profile lays them out: a
Comprehensive 3D SR whose root is TID 1500 "Imaging Measurement Report", built with highdicom's
TID 1500 classes. docs/results.md describes the layout and lists every code of nightread's own
scheme `99NIGHTREAD`.

    CONTAINER (DCM 126000 "Imaging Measurement Report")                              TID 1500
      HAS CONCEPT MOD  Language of Content Item and Descendants = English              TID 1204
      HAS OBS CONTEXT  Observer Type = Device; Device Observer UID (one per model version), Name,
                       Manufacturer "nightread", Model Name                     TID 1001/1002/1004
      HAS CONCEPT MOD  Procedure Reported = the imaging procedure (CID 100), one per modality
      CONTAINS CONTAINER Image Library: every source instance, with its descriptors   TID 1600
      CONTAINS CONTAINER Imaging Measurements
        CONTAINS CONTAINER Measurement Group, one per source image (and frame)        TID 1501
          HAS OBS CONTEXT Tracking Identifier "image N [frame F]", Tracking Unique Identifier
          HAS CONCEPT MOD Algorithm Name, Version, Parameters (backend, question bank,
                          prompt, render and nightread versions)                      TID 4019
          CONTAINS NUM   <question code> = P(yes), UCUM "1"                           TID 300
            HAS CONCEPT MOD Measurement Method = (99NIGHTREAD, P_YES), Finding Site, Question id
          CONTAINS CODE  <question code> = SCT 373066001 Yes | 373067005 No     closed questions
          CONTAINS TEXT  <question code> = the model's answer                     open questions
            (the CODE and TEXT answers:)
            HAS CONCEPT MOD TEXT Question identifier; TEXT Equivalent Meaning of Concept Name =
                            the question; CODE Finding = finding type; CODE Finding Site
            HAS PROPERTIES  CODE Flagged for review = Yes | No
            HAS PROPERTIES  CODE Reviewer verdict = Confirmed | Rejected | Corrected   (verified)
              HAS OBS CONTEXT PNAME Person Observer Name = the reviewer
              HAS PROPERTIES  CODE | TEXT Corrected answer
            HAS PROPERTIES  TEXT Comment, HAS OBS CONTEXT PNAME Person Observer Name   (verified)
          CONTAINS TEXT  (99NIGHTREAD, CAPTION) the model's caption of the image
          CONTAINS IMAGE Source of the group: the instance, and its frame when multi-frame
      CONTAINS CONTAINER (UMLS C0034375 "Qualitative Evaluations")
        CONTAINS TEXT  (99NIGHTREAD, DISCLAIMER) "AI generated - not for clinical use"

Header: VerificationFlag UNVERIFIED (the model's report) or VERIFIED with the reviewers as
Verifying Observers and the previous version in the Predecessor Documents Sequence (the QA verdicts);
the series description says "not for clinical use"; the Contributing Equipment Sequence names
nightread as Processing Equipment (DCM 109102) with the model's name and versions (the device UID
is the Device Observer UID of the observation context: Device UID is not an attribute of that
sequence).

Text the model wrote is made safe for a DICOM text value by `sr_text` (no control characters but
CR and LF, bounded length); the database keeps it as the model said it.

UIDs are 2.25 UIDs derived from names (UUID version 5): the SOP Instance UID from the study, the
model version and a hash of the content, so the same findings give the same UID (the PACS keeps one
copy) and any change gives a new one; the device UID from the model version; a group's Tracking UID
from its image and frame, so a finding keeps its tracking UID from one version of the report to the
next.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import unicodedata
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    CodeContentItem,
    CodedConcept,
    ContainerContentItem,
    ContentItem,
    ContentSequence,
    ImageContentItem,
    PnameContentItem,
    TextContentItem,
)
from highdicom.sr import RelationshipTypeValues as Rel
from pydicom import Dataset
from pydicom.sr.codedict import codes

from integrations.errors import PermanentError

SCHEME = "99NIGHTREAD"
DISCLAIMER = "AI generated - not for clinical use"
SERIES_DESCRIPTION = f"nightread: {DISCLAIMER}"
SR_SERIES_NUMBER = 9900
TEXT_LIMIT = 4096  # characters of one model text in the SR (captions, open answers, comments)
NO_TEXT = "(no text)"  # a TEXT item cannot be empty

YES = CodedConcept("373066001", "SCT", "Yes")
NO = CodedConcept("373067005", "SCT", "No")
NO_UNITS = CodedConcept("1", "UCUM", "no units")
SOURCE = CodedConcept("260753009", "SCT", "Source")
COMMENT = CodedConcept("121106", "DCM", "Comment")
EQUIVALENT_MEANING = CodedConcept("121050", "DCM", "Equivalent Meaning of Concept Name")
PERSON_OBSERVER_NAME = CodedConcept("121008", "DCM", "Person Observer Name")
FINDING = CodedConcept("121071", "DCM", "Finding")
FINDING_SITE = CodedConcept("363698007", "SCT", "Finding Site")
IMAGE_LIBRARY = CodedConcept("111028", "DCM", "Image Library")
IMAGE_LIBRARY_GROUP = CodedConcept("126200", "DCM", "Image Library Group")
IMAGING_MEASUREMENTS = CodedConcept("126010", "DCM", "Imaging Measurements")
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
IMAGING_PROCEDURE = CodedConcept("363679005", "SCT", "Imaging procedure")
# CID 100 "Quantitative Diagnostic Imaging Procedures", by the modality of the source images
PROCEDURES = {
    "CT": CodedConcept("25045-6", "LN", "CT unspecified body region"),
    "MR": CodedConcept("25056-3", "LN", "MRI unspecified body region"),
    "CR": CodedConcept("43468-8", "LN", "XR unspecified body region"),
    "DX": CodedConcept("43468-8", "LN", "XR unspecified body region"),
}


def local(value: str, meaning: str) -> CodedConcept:
    """A code of nightread's own scheme (each one is listed in docs/results.md)."""
    return CodedConcept(value, SCHEME, meaning[:64])


QUESTION_ID = local("QUESTION_ID", "Question identifier")
P_YES = local("P_YES", "Probability of yes by answer-token scoring")
FLAGGED = local("FLAGGED", "Flagged for review")
CAPTION = local("CAPTION", "Image caption")
DISCLAIMER_CODE = local("DISCLAIMER", "Disclaimer")
VERDICT = local("VERDICT", "Reviewer verdict")
CORRECTED_ANSWER = local("CORRECTED_ANSWER", "Corrected answer")
VERDICTS = {
    "confirm": local("CONFIRMED", "Confirmed by reviewer"),
    "reject": local("REJECTED", "Rejected by reviewer"),
    "correct": local("CORRECTED", "Corrected by reviewer"),
}
DECISION_OF_VERDICT = {code.value: decision for decision, code in VERDICTS.items()}
GENERIC_QUESTION = ("99NIGHTREAD", "QUESTION", "Question")  # a question the bank no longer codes
LOCAL_CODES = {
    c.value: c.meaning
    for c in (QUESTION_ID, P_YES, FLAGGED, CAPTION, DISCLAIMER_CODE, VERDICT, CORRECTED_ANSWER, *VERDICTS.values())
} | {GENERIC_QUESTION[1]: GENERIC_QUESTION[2]}

_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://nightread.invalid/dicom/uid")


def derived_uid(*parts: str) -> str:
    """A 2.25 UID from a name-based (version 5) UUID of `parts`: the same parts, the same UID."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(31).join(parts)).int}"


def nightread_version() -> str:
    try:
        return version("nightread")
    except PackageNotFoundError:  # running from a checkout that is not installed
        return "0+unknown"


def sr_text(value: str | None, *, limit: int = TEXT_LIMIT) -> str:
    """`value` as a valid DICOM text value (TEXT content items are UT). Control characters are replaced
    by U+FFFD: NUL (which cuts the text short in C readers such as dcmtk), the other C0 and C1 controls,
    ESC (an ISO 2022 escape under UTF-8 would confuse readers), FF; a TAB becomes a space; CR and LF
    stay. Lone surrogates (not encodable) are replaced too. Trailing spaces are dropped (they read as
    padding), the length is bounded by `limit` characters (cut text ends with "…"), and an empty text
    becomes "(no text)". Applying it twice changes nothing."""
    out = []
    for ch in value or "":
        if ch in "\r\n":
            out.append(ch)
        elif ch == "\t":
            out.append(" ")
        elif unicodedata.category(ch) in ("Cc", "Cs"):
            out.append("\ufffd")
        else:
            out.append(ch)
    text = "".join(out).rstrip()
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return text or NO_TEXT


# --- what a report says ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SrCode:
    """A coded concept: DICOM coding scheme designator, code value, code meaning."""

    scheme: str
    value: str
    meaning: str

    def concept(self) -> CodedConcept:
        return CodedConcept(self.value, self.scheme, self.meaning[:64])

    @classmethod
    def of(cls, concept: CodedConcept) -> SrCode:
        return cls(str(concept.scheme_designator), str(concept.value), str(concept.meaning))


@dataclass(frozen=True)
class SrVerdict:
    """A reviewer's decision on one finding: confirm | reject | correct (the review table)."""

    decision: str
    reviewer: str
    at: dt.datetime
    corrected_answer: str | None = None


@dataclass(frozen=True)
class SrComment:
    author: str
    text: str
    at: dt.datetime


@dataclass(frozen=True)
class SrAnswer:
    question_id: str
    question_text: str
    kind: str  # closed | open
    answer: str
    p_yes: float | None
    flagged: bool
    code: SrCode
    finding_type: SrCode | None = None
    finding_site: SrCode | None = None
    verdict: SrVerdict | None = None
    comments: tuple[SrComment, ...] = ()


@dataclass(frozen=True)
class SrImage:
    sop_class_uid: str
    sop_instance_uid: str
    frame: int  # 0-based frame index
    render_version: str
    caption: str | None
    answers: tuple[SrAnswer, ...]
    multi_frame: bool = False  # the instance has several frames: the group references its frame by number


@dataclass(frozen=True)
class SrProvenance:
    model_name: str
    model_revision: str
    model_backend: str
    model_version_key: str  # what makes the model version unique (name, revision, backend, options hash)
    bank_version: str
    prompt_version: str
    nightread_version: str


@dataclass(frozen=True)
class SrVerification:
    """What turns a report into its verified version: the reviewers (user names, in the order of their
    first decision), their organisation, and the version it replaces (a dataset with its SOP Class,
    SOP Instance, Study and Series UIDs: the previous SR itself)."""

    observers: tuple[str, ...]
    organization: str
    predecessor: Dataset = field(compare=False, repr=False)


@dataclass(frozen=True)
class BuiltSr:
    dataset: Dataset
    sop_instance_uid: str
    series_instance_uid: str
    content_sha: str

    def to_bytes(self) -> bytes:
        buf = BytesIO()
        self.dataset.save_as(buf, enforce_file_format=True)
        return buf.getvalue()


def _utc(at: dt.datetime) -> dt.datetime:
    return at.replace(tzinfo=dt.UTC) if at.tzinfo is None else at.astimezone(dt.UTC)


def _dicom_dt(at: dt.datetime) -> str:
    return _utc(at).strftime("%Y%m%d%H%M%S.%f+0000")


def _canonical(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return _dicom_dt(value)
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def content_sha(
    study_uid: str,
    images: Sequence[SrImage],
    provenance: SrProvenance,
    verification: SrVerification | None = None,
) -> str:
    """What the report says, hashed: the study, the provenance, every image with its answers (verdicts
    and comments included) and the verification (reviewers, organisation; not the predecessor, so a
    repeated verification of the same decisions gives the same hash)."""
    payload = {
        "study": study_uid,
        "provenance": asdict(provenance),
        "images": [_canonical(asdict(im)) for im in sorted(images, key=lambda i: (i.sop_instance_uid, i.frame))],
        "verification": None
        if verification is None
        else {"observers": list(verification.observers), "organization": verification.organization},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# --- building -------------------------------------------------------------------------------------


def quiet_highdicom() -> None:
    """highdicom logs the SOP Instance UID of each evidence dataset at INFO ("copy Patient-related
    attributes from dataset ..."): never log UIDs, keep its warnings."""
    logging.getLogger("highdicom").setLevel(logging.WARNING)


def _library_descriptors(ds: Dataset) -> list[ContentItem]:
    """TID 1602 descriptors of one image (highdicom's ImageLibraryEntryDescriptors). A header without
    what the modality's descriptors need (pixel spacing, orientation, a multi-frame's functional groups)
    gets the common ones only: modality, frame of reference, rows and columns."""
    try:
        return list(cast("Sequence[ContentItem]", hd.sr.ImageLibraryEntryDescriptors(ds)))
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        pass
    common = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns", "FrameOfReferenceUID"):
        if keyword in ds:
            setattr(common, keyword, ds[keyword].value)
    common.Modality = ""  # neither cross-sectional nor projection: no modality-specific descriptors
    try:
        return list(cast("Sequence[ContentItem]", hd.sr.ImageLibraryEntryDescriptors(common)))
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return []  # not an image SOP Class, or no Rows/Columns: the entry names the instance only


def image_library(evidence: Sequence[Dataset]) -> ContainerContentItem:
    """TID 1600 Image Library: one group (TID 1601 entries) with every source instance."""
    entries: list[ContentItem] = []
    seen: set[str] = set()
    for ds in evidence:
        uid = str(ds.SOPInstanceUID)
        if uid in seen:
            continue
        seen.add(uid)
        entry = ImageContentItem(
            name=SOURCE,
            referenced_sop_class_uid=str(ds.SOPClassUID),
            referenced_sop_instance_uid=uid,
            relationship_type=Rel.CONTAINS,
        )
        descriptors = _library_descriptors(ds)
        if descriptors:
            entry.ContentSequence = ContentSequence(descriptors)
        entries.append(entry)
    group = ContainerContentItem(name=IMAGE_LIBRARY_GROUP, relationship_type=Rel.CONTAINS)
    group.ContentSequence = ContentSequence(entries)
    library = ContainerContentItem(name=IMAGE_LIBRARY, relationship_type=Rel.CONTAINS)
    library.ContentSequence = ContentSequence([group])
    return library


def _observed(item: ContentItem, at: dt.datetime) -> ContentItem:
    item.add_new(0x0040A032, "DT", _dicom_dt(at))  # Observation DateTime: when it was said
    return item


def person_name(user: str) -> str:
    """A user name as a DICOM person name: its family name component (the trailing "^" says that it is
    one component of the current form, not the retired single-string form)."""
    return f"{user.replace('^', ' ')[:63]}^"


def user_of(name: object) -> str:
    """The user name in a person name written by `person_name`."""
    return str(name).split("^", 1)[0]


def _person(user: str) -> PnameContentItem:
    return PnameContentItem(PERSON_OBSERVER_NAME, person_name(user), Rel.HAS_OBS_CONTEXT)


def _answer_children(a: SrAnswer) -> list[ContentItem]:
    items: list[ContentItem] = [
        TextContentItem(QUESTION_ID, a.question_id, Rel.HAS_CONCEPT_MOD),
        TextContentItem(EQUIVALENT_MEANING, sr_text(a.question_text, limit=1024), Rel.HAS_CONCEPT_MOD),
    ]
    if a.finding_type is not None:
        items.append(CodeContentItem(FINDING, a.finding_type.concept(), Rel.HAS_CONCEPT_MOD))
    if a.finding_site is not None:
        items.append(CodeContentItem(FINDING_SITE, a.finding_site.concept(), Rel.HAS_CONCEPT_MOD))
    items.append(CodeContentItem(FLAGGED, YES if a.flagged else NO, Rel.HAS_PROPERTIES))
    if a.verdict is not None:
        v = a.verdict
        verdict = _observed(CodeContentItem(VERDICT, VERDICTS[v.decision], Rel.HAS_PROPERTIES), v.at)
        parts: list[ContentItem] = [_person(v.reviewer)]
        if v.corrected_answer is not None:
            corrected = _yes_no(a.kind, v.corrected_answer)
            if corrected is not None:
                parts.append(CodeContentItem(CORRECTED_ANSWER, corrected, Rel.HAS_PROPERTIES))
            else:
                parts.append(TextContentItem(CORRECTED_ANSWER, sr_text(v.corrected_answer), Rel.HAS_PROPERTIES))
        verdict.ContentSequence = ContentSequence(parts)
        items.append(verdict)
    for c in a.comments:
        comment = _observed(TextContentItem(COMMENT, sr_text(c.text), Rel.HAS_PROPERTIES), c.at)
        comment.ContentSequence = ContentSequence([_person(c.author)])
        items.append(comment)
    return items


def _yes_no(kind: str, answer: str) -> CodedConcept | None:
    """SCT Yes / No for a closed question's yes / no answer; None for any other text."""
    if kind != "closed":
        return None
    return {"yes": YES, "no": NO}.get(answer.strip().lower())


def _group(number: int, im: SrImage, provenance: SrProvenance) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    label = f"image {number}" + (f" frame {im.frame + 1}" if im.multi_frame else "")
    tracking = hd.sr.TrackingIdentifier(
        uid=derived_uid("tracking", im.sop_instance_uid, str(im.frame)), identifier=label
    )
    algorithm = hd.sr.AlgorithmIdentification(
        name=provenance.model_name[:64],
        version=provenance.model_revision[:64] or "unknown",
        parameters=[
            f"backend={provenance.model_backend}",
            f"question_bank={provenance.bank_version}",
            f"prompt={provenance.prompt_version}",
            f"render={im.render_version}",
            f"nightread={provenance.nightread_version}",
        ],
    )
    measurements: list[hd.sr.Measurement] = []
    evaluations: list[hd.sr.QualitativeEvaluation] = []
    texts: list[ContentItem] = []
    for a in im.answers:
        if a.p_yes is not None:
            num = hd.sr.Measurement(
                name=a.code.concept(),
                value=float(a.p_yes),
                unit=NO_UNITS,
                method=P_YES,
                finding_sites=[hd.sr.FindingSite(a.finding_site.concept())] if a.finding_site else None,
            )
            num[0].ContentSequence.append(TextContentItem(QUESTION_ID, a.question_id, Rel.HAS_CONCEPT_MOD))
            measurements.append(num)
        coded = _yes_no(a.kind, a.answer)
        if coded is not None:
            evaluation = hd.sr.QualitativeEvaluation(a.code.concept(), coded)
            evaluation[0].ContentSequence = ContentSequence(_answer_children(a))
            evaluations.append(evaluation)
        else:
            text = TextContentItem(a.code.concept(), sr_text(a.answer), Rel.CONTAINS)
            text.ContentSequence = ContentSequence(_answer_children(a))
            texts.append(text)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        algorithm_id=algorithm,
        measurements=measurements or None,
        qualitative_evaluations=evaluations or None,
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=im.sop_class_uid,
                referenced_sop_instance_uid=im.sop_instance_uid,
                referenced_frame_numbers=[im.frame + 1] if im.multi_frame else None,
            )
        ],
    )
    if im.caption is not None:
        texts.append(TextContentItem(CAPTION, sr_text(im.caption), Rel.CONTAINS))
    group[0].ContentSequence.extend(texts)
    return group


def procedures_of(evidence: Sequence[Dataset]) -> list[SrCode]:
    """Procedure Reported: the CID 100 procedure of each modality among the source images (one each),
    "Imaging procedure" when none is known."""
    out: list[SrCode] = []
    for modality in sorted({str(ds.get("Modality", "")).upper() for ds in evidence}):
        code = SrCode.of(PROCEDURES.get(modality, IMAGING_PROCEDURE))
        if code not in out:
            out.append(code)
    return out or [SrCode.of(IMAGING_PROCEDURE)]


def build_sr(
    *,
    evidence: Sequence[Dataset],
    images: Sequence[SrImage],
    provenance: SrProvenance,
    procedures: Sequence[SrCode] | None = None,
    library: ContainerContentItem | None = None,
    verification: SrVerification | None = None,
    instance_number: int = 1,
) -> BuiltSr:
    """One SR for a study and model version. `evidence`: the source images' headers (patient and study
    modules, no pixels needed), one per referenced SOP instance. `procedures` (default: from the
    evidence's modalities) and `library` (default: built from the evidence) let a new version repeat
    what its predecessor said. With `verification` the SR is VERIFIED by the reviewers and names its
    predecessor. Raises PermanentError for an empty report."""
    quiet_highdicom()
    if not images:
        raise PermanentError("no annotated images to report")
    if not evidence:
        raise PermanentError("no source image headers to reference")
    if verification is not None and not verification.observers:
        raise PermanentError("a verified report needs at least one reviewer")
    study_uid = str(evidence[0].StudyInstanceUID)
    ordered = sorted(images, key=lambda i: (i.sop_instance_uid, i.frame))
    sha = content_sha(study_uid, ordered, provenance, verification)
    series_uid = derived_uid("nightread-sr-series", study_uid, provenance.model_version_key)
    sop_uid = derived_uid("nightread-sr", study_uid, provenance.model_version_key, sha)
    device_uid = derived_uid("nightread-device", provenance.model_version_key)

    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid, name="nightread", manufacturer_name="nightread", model_name=provenance.model_name[:64]
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=[p.concept() for p in (procedures or procedures_of(evidence))],
        imaging_measurements=[_group(n, im, provenance) for n, im in enumerate(ordered, start=1)],
    )
    root = report[0]
    items = list(root.ContentSequence)
    at = next(i for i, item in enumerate(items) if item.name == IMAGING_MEASUREMENTS)
    disclaimer = ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type=Rel.CONTAINS)
    disclaimer.ContentSequence = ContentSequence([TextContentItem(DISCLAIMER_CODE, DISCLAIMER, Rel.CONTAINS)])
    root.ContentSequence = ContentSequence(
        [*items[:at], library if library is not None else image_library(evidence), *items[at:], disclaimer]
    )

    equipment = hd.ContributingEquipment(
        manufacturer="nightread",
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=provenance.model_name[:64],
        software_versions=[
            (provenance.model_revision or "unknown")[:64],
            f"nightread {provenance.nightread_version}"[:64],
        ],
        contribution_description=f"AI findings by {provenance.model_name}"[:1024],
    )
    extra: dict[str, Any] = {}
    if verification is not None:
        extra = {
            "is_verified": True,
            "verifying_observer_name": person_name(verification.observers[0]),
            "verifying_organization": verification.organization[:64],
            "previous_versions": [verification.predecessor],
        }
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(evidence),
        content=report,
        series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer="nightread",
        manufacturer_model_name=provenance.model_name[:64],
        software_versions=f"nightread {provenance.nightread_version}"[:64],
        is_complete=True,
        series_description=SERIES_DESCRIPTION,
        contributing_equipment=[equipment],
        coding_schemes=[
            CodingSchemeIdentificationItem(
                designator=SCHEME,
                name="nightread codes (docs/results.md)",
                responsible_organization="nightread",
            )
        ],
        specific_character_set="ISO_IR 192",  # UTF-8: model text and names in any script
        **extra,
    )
    if verification is not None:
        first = sr.VerifyingObserverSequence[0]
        for name in verification.observers[1:]:
            item = Dataset()
            item.VerifyingObserverName = person_name(name)
            item.VerifyingOrganization = verification.organization[:64]
            item.VerificationDateTime = first.VerificationDateTime
            item.VerifyingObserverIdentificationCodeSequence = []
            sr.VerifyingObserverSequence.append(item)
    return BuiltSr(dataset=sr, sop_instance_uid=sop_uid, series_instance_uid=series_uid, content_sha=sha)


# --- reading --------------------------------------------------------------------------------------


def _code(concept: Any) -> SrCode:
    return SrCode(str(concept.scheme_designator), str(concept.value), str(concept.meaning))


def _children(item: Any) -> list[Any]:
    return list(getattr(item, "ContentSequence", None) or [])


def _answer_extras(item: Any, answer: dict[str, Any]) -> None:
    """The question id, question text, codes, flag, verdict and comments under an answer item."""
    for child in _children(item):
        name = child.name
        if name == QUESTION_ID:
            answer["id"] = child.value
        elif name == EQUIVALENT_MEANING:
            answer["question"] = child.value
        elif name == FINDING:
            answer["finding_type"] = _code(child.value)
        elif name == FINDING_SITE:
            answer["finding_site"] = _code(child.value)
        elif name == FLAGGED:
            answer["flagged"] = child.value == YES
        elif name == VERDICT:
            verdict: dict[str, Any] = {
                "decision": DECISION_OF_VERDICT.get(str(child.value.value), str(child.value.value)),
                "at": str(child.get("ObservationDateTime", "")),
                "reviewer": None,
                "corrected_answer": None,
            }
            for part in _children(child):
                if part.name == PERSON_OBSERVER_NAME:
                    verdict["reviewer"] = user_of(part.value)
                elif part.name == CORRECTED_ANSWER:
                    verdict["corrected_answer"] = (
                        str(part.value.meaning).lower() if part.ValueType == "CODE" else str(part.value)
                    )
            answer["verdict"] = verdict
        elif name == COMMENT:
            author = next((user_of(p.value) for p in _children(child) if p.name == PERSON_OBSERVER_NAME), None)
            answer["comments"].append(
                {"author": author, "text": child.value, "at": str(child.get("ObservationDateTime", ""))}
            )


def _new_answer(item: Any) -> dict[str, Any]:
    return {
        "id": None,
        "question": None,
        "code": _code(item.name),
        "kind": "open",
        "answer": None,
        "p_yes": None,
        "unit": None,
        "flagged": False,
        "finding_type": None,
        "finding_site": None,
        "verdict": None,
        "comments": [],
    }


def read_sr_findings(source: bytes | Path) -> dict[str, Any]:
    """Read an SR written by `build_sr` back with `highdicom.sr.srread` and highdicom's TID 1500
    classes (for tests and users): header (verification, predecessors), procedures, the disclaimer,
    the algorithm (name, version, parameters of the first group), and per referenced (SOP Instance
    UID, 0-based frame) the caption, render version and answers by question id: the answer as the
    database has it ("yes" / "no" for closed questions, the text for open ones), P(yes) and its unit,
    flag, codes, the reviewer's verdict and comments. An SR of another template is a PermanentError."""
    doc = hd.sr.srread(BytesIO(source) if isinstance(source, bytes) else source)
    try:
        report = hd.sr.MeasurementReport.from_sequence(doc.content)
    except (AttributeError, IndexError, ValueError) as exc:  # an SR of another template (nightread's before TID 1500)
        raise PermanentError(f"not a TID 1500 Imaging Measurement Report: {exc}") from exc
    root = report[0]
    out: dict[str, Any] = {
        "doc": doc,
        "sop_instance_uid": str(doc.SOPInstanceUID),
        "verified": doc.VerificationFlag == "VERIFIED",
        "verifying_observers": [
            (user_of(o.VerifyingObserverName), str(o.VerifyingOrganization))
            for o in doc.get("VerifyingObserverSequence", [])
        ],
        "predecessors": [
            str(ref.ReferencedSOPInstanceUID)
            for study in doc.get("PredecessorDocumentsSequence", [])
            for series in study.ReferencedSeriesSequence
            for ref in series.ReferencedSOPSequence
        ],
        "procedures": [],
        "disclaimer": None,
        "algorithm": {},
        "library": [],
        "images": {},
    }
    for item in _children(root):
        if item.name == codes.DCM.ProcedureReported:
            out["procedures"].append(_code(item.value))
        elif item.name == IMAGE_LIBRARY:
            out["library"] = [
                str(entry.referenced_sop_instance_uid)
                for group in _children(item)
                for entry in _children(group)
                if entry.ValueType == "IMAGE"
            ]
        elif item.name == QUALITATIVE_EVALUATIONS:
            for child in _children(item):
                if child.name == DISCLAIMER_CODE:
                    out["disclaimer"] = child.value
    for group in report.get_image_measurement_groups():
        (source_image,) = group.source_images
        frames = source_image.referenced_frame_numbers
        key = (str(source_image.referenced_sop_instance_uid), int(frames[0]) - 1 if frames else 0)
        entry: dict[str, Any] = {
            "sop_class_uid": str(source_image.referenced_sop_class_uid),
            "multi_frame": bool(frames),
            "tracking_uid": str(group.tracking_uid),
            "tracking_identifier": group.tracking_identifier,
            "caption": None,
            "render_version": None,
            "answers": {},
        }
        algorithm: dict[str, Any] = {}
        answers: list[dict[str, Any]] = []
        p_yes: dict[str, tuple[float, str]] = {}
        for item in _children(group[0]):
            name = item.name
            if name == codes.DCM.AlgorithmName:
                algorithm["name"] = item.value
            elif name == codes.DCM.AlgorithmVersion:
                algorithm["version"] = item.value
            elif name == codes.DCM.AlgorithmParameters:
                algorithm.setdefault("parameters", []).append(item.value)
            elif name == CAPTION:
                entry["caption"] = item.value
            elif item.ValueType == "NUM":
                qid = next(str(c.value) for c in _children(item) if c.name == QUESTION_ID)
                p_yes[qid] = (float(item.value), str(item.unit.value))
            elif item.ValueType in ("CODE", "TEXT") and any(c.name == QUESTION_ID for c in _children(item)):
                answer = _new_answer(item)
                if item.ValueType == "CODE":
                    answer["kind"], answer["answer"] = "closed", str(item.value.meaning).lower()
                else:
                    answer["answer"] = item.value
                _answer_extras(item, answer)
                answers.append(answer)
        for answer in answers:
            if answer["id"] in p_yes:
                answer["kind"] = "closed"
                answer["p_yes"], answer["unit"] = p_yes[answer["id"]]
            entry["answers"][str(answer["id"])] = answer
        params = dict(p.split("=", 1) for p in algorithm.get("parameters", []) if "=" in p)
        entry["render_version"] = params.get("render")
        entry["algorithm"] = algorithm
        out["images"][key] = entry
        out["algorithm"] = out["algorithm"] or algorithm
    return out


def images_of_report(read: dict[str, Any]) -> list[SrImage]:
    """The images and answers of a report read by `read_sr_findings`, to build its next version from
    (verdicts and comments left out: the next version gives its own)."""
    images: list[SrImage] = []
    for (sop, frame), entry in read["images"].items():
        answers = tuple(
            SrAnswer(
                question_id=qid,
                question_text=a["question"] or qid,
                kind=a["kind"],
                answer=a["answer"],
                p_yes=a["p_yes"],
                flagged=a["flagged"],
                code=a["code"],
                finding_type=a["finding_type"],
                finding_site=a["finding_site"],
            )
            for qid, a in entry["answers"].items()
        )
        images.append(
            SrImage(
                sop_class_uid=entry["sop_class_uid"],
                sop_instance_uid=sop,
                frame=frame,
                render_version=entry["render_version"] or "",
                caption=entry["caption"],
                answers=answers,
                multi_frame=entry["multi_frame"],
            )
        )
    return images


def provenance_of_report(read: dict[str, Any], *, model_version_key: str) -> SrProvenance:
    """The provenance a report states (its algorithm identification), for its next version."""
    algorithm = read["algorithm"]
    params = dict(p.split("=", 1) for p in algorithm.get("parameters", []) if "=" in p)
    return SrProvenance(
        model_name=algorithm.get("name", ""),
        model_revision="" if algorithm.get("version") == "unknown" else algorithm.get("version", ""),
        model_backend=params.get("backend", ""),
        model_version_key=model_version_key,
        bank_version=params.get("question_bank", ""),
        prompt_version=params.get("prompt", ""),
        nightread_version=params.get("nightread", ""),
    )


PATIENT_STUDY_KEYWORDS = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
)


def evidence_of_report(doc: Dataset) -> list[Dataset]:
    """Headers standing in for a report's source images when they are gone (a verified version is
    written long after retrieval): each instance of its evidence, with the patient and study the
    report names."""
    out: list[Dataset] = []
    for study in doc.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.ReferencedSeriesSequence:
            for ref in series.ReferencedSOPSequence:
                ds = Dataset()
                for keyword in PATIENT_STUDY_KEYWORDS:
                    if keyword in doc:
                        ds[keyword] = doc[keyword]
                ds.StudyInstanceUID = study.StudyInstanceUID
                ds.SeriesInstanceUID = series.SeriesInstanceUID
                ds.SOPClassUID = ref.ReferencedSOPClassUID
                ds.SOPInstanceUID = ref.ReferencedSOPInstanceUID
                out.append(ds)
    return out


def library_of_report(read: dict[str, Any]) -> ContainerContentItem | None:
    """A report's Image Library item, to repeat in its next version."""
    report = hd.sr.MeasurementReport.from_sequence(read["doc"].content)
    for item in _children(report[0]):
        if item.name == IMAGE_LIBRARY:
            return cast(ContainerContentItem, item)
    return None


def with_verdicts(
    images: Sequence[SrImage],
    verdicts: dict[tuple[str, int, str], tuple[SrVerdict | None, tuple[SrComment, ...]]],
) -> list[SrImage]:
    """`images` with each answer's verdict and comments by (SOP Instance UID, frame, question id)."""
    out = []
    for im in images:
        answers = []
        for a in im.answers:
            verdict, comments = verdicts.get((im.sop_instance_uid, im.frame, a.question_id), (None, ()))
            answers.append(replace(a, verdict=verdict, comments=comments))
        out.append(replace(im, answers=tuple(answers)))
    return out
