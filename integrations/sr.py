"""nightread's findings as one DICOM Comprehensive SR per study and model version (highdicom).

Template (our own, documented in the README; local codes use the scheme designator `99NIGHTREAD`):

    CONTAINER (99NIGHTREAD, REPORT, "nightread AI findings")
      HAS OBS CONTEXT   device observer (nightread + model name)                 TID 1002/1004
      HAS CONCEPT MOD   algorithm: model name, revision; parameters = versions    TID 4019
      CONTAINS TEXT     (99NIGHTREAD, DISCLAIMER) "AI generated - not for clinical use"
      CONTAINS CONTAINER (99NIGHTREAD, IMAGE, "Image findings")       one per source image (and frame)
        CONTAINS IMAGE   (DCM 121112 "Source of Measurement") the source image  (the evidence)
        CONTAINS TEXT    (DCM 121106 "Comment") caption                 when the model wrote one
        CONTAINS TEXT    (99NIGHTREAD, RENDER, "Render version")
        CONTAINS CONTAINER (99NIGHTREAD, <question id>, <question text>)  one per question
          CONTAINS TEXT  (99NIGHTREAD, QID, "Question identifier") the question id
          CONTAINS CODE  (99NIGHTREAD, ANSWER, "Answer") SCT Yes / No    closed questions
          CONTAINS NUM   (99NIGHTREAD, PYES, "Probability of yes") P(yes), UCUM {probability}
          CONTAINS CODE  (99NIGHTREAD, FLAG, "Flagged for review") SCT Yes / No
          CONTAINS TEXT  (99NIGHTREAD, ANSWER, "Answer") the generated text    open questions

The SOP Instance UID is derived from the study, the model version and a hash of the content, so
building the same findings again gives the same UID (the PACS keeps one copy), and any change in
the findings or the versions gives a new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import highdicom as hd
from highdicom.sr import (
    CodeContentItem,
    CodedConcept,
    ContainerContentItem,
    ContentItem,
    ContentSequence,
    ImageContentItem,
    NumContentItem,
    TextContentItem,
)
from highdicom.sr import RelationshipTypeValues as Rel
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from integrations.errors import PermanentError

SCHEME = "99NIGHTREAD"
DISCLAIMER = "AI generated - not for clinical use"
SERIES_DESCRIPTION = f"nightread: {DISCLAIMER}"
SR_SERIES_NUMBER = 9900
YES = CodedConcept("373066001", "SCT", "Yes")
NO = CodedConcept("373067005", "SCT", "No")
PROBABILITY = CodedConcept("{probability}", "UCUM", "probability")
SOURCE_IMAGE = CodedConcept("121112", "DCM", "Source of Measurement")
COMMENT = CodedConcept("121106", "DCM", "Comment")


def local(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, SCHEME, meaning[:64])


REPORT = local("REPORT", "nightread AI findings")
IMAGE_FINDINGS = local("IMAGE", "Image findings")
DISCLAIMER_CODE = local("DISCLAIMER", "Disclaimer")
RENDER = local("RENDER", "Render version")
QID = local("QID", "Question identifier")
ANSWER = local("ANSWER", "Answer")
PYES = local("PYES", "Probability of yes")
FLAG = local("FLAG", "Flagged for review")


def nightread_version() -> str:
    try:
        return version("nightread")
    except PackageNotFoundError:  # running from a checkout that is not installed
        return "0+unknown"


@dataclass(frozen=True)
class SrAnswer:
    question_id: str
    question_text: str
    kind: str  # closed | open
    answer: str
    p_yes: float | None
    flagged: bool


@dataclass(frozen=True)
class SrImage:
    sop_class_uid: str
    sop_instance_uid: str
    frame: int
    render_version: str
    caption: str | None
    answers: tuple[SrAnswer, ...]


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
class BuiltSr:
    dataset: Dataset
    sop_instance_uid: str
    series_instance_uid: str
    content_sha: str

    def to_bytes(self) -> bytes:
        buf = BytesIO()
        self.dataset.save_as(buf, enforce_file_format=True)
        return buf.getvalue()


def content_sha(study_uid: str, images: Sequence[SrImage], provenance: SrProvenance) -> str:
    payload = {
        "study": study_uid,
        "provenance": asdict(provenance),
        "images": [
            {
                **asdict(im),
                "answers": [{**asdict(a), "p_yes": None if a.p_yes is None else round(a.p_yes, 6)} for a in im.answers],
            }
            for im in sorted(images, key=lambda i: (i.sop_instance_uid, i.frame))
        ],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _coding_scheme(sr: Dataset) -> None:
    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = "nightread local codes"
    item.CodingSchemeResponsibleOrganization = "nightread"
    sr.CodingSchemeIdentificationSequence = [item]


def _question(a: SrAnswer) -> ContainerContentItem:
    box = ContainerContentItem(name=local(a.question_id, a.question_text), relationship_type=Rel.CONTAINS)
    items: list[ContentItem] = [TextContentItem(QID, a.question_id, Rel.CONTAINS)]
    if a.kind == "closed" and a.p_yes is not None:
        items.append(CodeContentItem(ANSWER, YES if a.p_yes >= 0.5 else NO, Rel.CONTAINS))
        items.append(NumContentItem(PYES, float(a.p_yes), PROBABILITY, relationship_type=Rel.CONTAINS))
        items.append(CodeContentItem(FLAG, YES if a.flagged else NO, Rel.CONTAINS))
    else:
        items.append(TextContentItem(ANSWER, (a.answer or "")[:1024] or "(no answer)", Rel.CONTAINS))
    box.ContentSequence = ContentSequence(items)
    return box


def quiet_highdicom() -> None:
    """highdicom logs the SOP Instance UID of each evidence dataset at INFO ("copy Patient-related
    attributes from dataset ..."): never log UIDs, keep its warnings."""
    logging.getLogger("highdicom").setLevel(logging.WARNING)


def build_sr(
    *,
    evidence: Sequence[Dataset],
    images: Sequence[SrImage],
    provenance: SrProvenance,
) -> BuiltSr:
    """One SR for a study. `evidence`: the source images' headers (patient and study modules; no
    pixels needed), one per referenced SOP instance. Raises PermanentError for an empty report."""
    quiet_highdicom()
    if not images:
        raise PermanentError("no annotated images to report")
    if not evidence:
        raise PermanentError("no source image headers to reference")
    study_uid = str(evidence[0].StudyInstanceUID)
    sha = content_sha(study_uid, images, provenance)
    series_uid = generate_uid(entropy_srcs=["nightread-sr-series", study_uid, provenance.model_version_key])
    sop_uid = generate_uid(entropy_srcs=["nightread-sr", study_uid, provenance.model_version_key, sha])
    algorithm = hd.sr.AlgorithmIdentification(
        name=provenance.model_name[:64],
        version=provenance.model_revision[:64] or "unknown",
        parameters=[
            f"backend={provenance.model_backend}",
            f"question_bank={provenance.bank_version}",
            f"prompt={provenance.prompt_version}",
            f"nightread={provenance.nightread_version}",
        ],
    )
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["nightread-device", provenance.model_version_key]),
            name="nightread",
            manufacturer_name="nightread",
            model_name=provenance.model_name[:64],
        ),
    )
    children: list[ContentItem] = [*hd.sr.ObservationContext(observer_device_context=device)]
    children.extend(cast("Sequence[ContentItem]", algorithm))
    children.append(TextContentItem(DISCLAIMER_CODE, DISCLAIMER, Rel.CONTAINS))
    for im in sorted(images, key=lambda i: (i.sop_instance_uid, i.frame)):
        box = ContainerContentItem(name=IMAGE_FINDINGS, relationship_type=Rel.CONTAINS)
        ref = ImageContentItem(
            name=SOURCE_IMAGE,
            referenced_sop_class_uid=im.sop_class_uid,
            referenced_sop_instance_uid=im.sop_instance_uid,
            referenced_frame_numbers=[im.frame + 1] if im.frame else None,
            relationship_type=Rel.CONTAINS,
        )
        items: list[ContentItem] = [ref]
        if im.caption:
            items.append(TextContentItem(COMMENT, im.caption[:1024], Rel.CONTAINS))
        items.append(TextContentItem(RENDER, im.render_version, Rel.CONTAINS))
        items.extend(_question(a) for a in im.answers)
        box.ContentSequence = ContentSequence(items)
        children.append(box)
    root = ContainerContentItem(name=REPORT)
    root.ContentSequence = ContentSequence(children)
    sr = hd.sr.ComprehensiveSR(
        evidence=list(evidence),
        content=root,
        series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="nightread",
        is_complete=True,
        series_description=SERIES_DESCRIPTION,
    )
    _coding_scheme(sr)
    sr.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: captions are model output in any script
    return BuiltSr(dataset=sr, sop_instance_uid=sop_uid, series_instance_uid=series_uid, content_sha=sha)


def _code_value(code: Dataset) -> str:
    """A code's value, whichever attribute holds it (values over 16 characters are LongCodeValue)."""
    return str(code.get("CodeValue") or code.get("LongCodeValue") or code.get("URNCodeValue") or "")


def read_sr_findings(source: bytes | Path) -> dict[str, Any]:
    """Read an SR written by `build_sr` back with `highdicom.sr.srread` (for tests and users): the
    disclaimer, the algorithm's name/version/parameters, and per referenced (SOP Instance UID, frame)
    its caption, render version and answers."""
    doc = hd.sr.srread(BytesIO(source) if isinstance(source, bytes) else source)
    root = doc.content[0] if isinstance(doc.content, Sequence) else doc.content
    out: dict[str, Any] = {"images": {}, "disclaimer": None, "algorithm": {}, "doc": doc}
    images: dict[tuple[str, int], dict[str, Any]] = {}
    for item in root.ContentSequence:
        name = item.ConceptNameCodeSequence[0]
        if name.CodeValue == "DISCLAIMER":
            out["disclaimer"] = item.TextValue
        elif name.CodeValue == "111001":  # Algorithm Name
            out["algorithm"]["name"] = item.TextValue
        elif name.CodeValue == "111003":  # Algorithm Version
            out["algorithm"]["version"] = item.TextValue
        elif name.CodeValue == "111002":  # Algorithm Parameters
            out["algorithm"].setdefault("parameters", []).append(item.TextValue)
        elif name.CodeValue == "IMAGE":
            entry: dict[str, Any] = {"caption": None, "answers": {}}
            key: tuple[str, int] = ("", 0)
            for child in item.ContentSequence:
                code = _code_value(child.ConceptNameCodeSequence[0])
                if child.ValueType == "IMAGE":
                    ref = child.ReferencedSOPSequence[0]
                    frames = getattr(ref, "ReferencedFrameNumber", None)
                    key = (str(ref.ReferencedSOPInstanceUID), int(frames) - 1 if frames else 0)
                elif code == "121106":
                    entry["caption"] = child.TextValue
                elif code == "RENDER":
                    entry["render_version"] = child.TextValue
                elif child.ValueType == "CONTAINER":
                    answer: dict[str, Any] = {"question": child.ConceptNameCodeSequence[0].CodeMeaning}
                    for part in child.ContentSequence:
                        pcode = part.ConceptNameCodeSequence[0].CodeValue
                        if pcode == "QID":
                            answer["id"] = part.TextValue
                        elif pcode == "ANSWER":
                            answer["answer"] = (
                                part.ConceptCodeSequence[0].CodeMeaning if part.ValueType == "CODE" else part.TextValue
                            )
                        elif pcode == "PYES":
                            mv = part.MeasuredValueSequence[0]
                            answer["p_yes"] = float(mv.NumericValue)
                            answer["unit"] = mv.MeasurementUnitsCodeSequence[0].CodeValue
                        elif pcode == "FLAG":
                            answer["flagged"] = part.ConceptCodeSequence[0].CodeMeaning == "Yes"
                    entry["answers"][str(answer["id"])] = answer
            images[key] = entry
    out["images"] = images
    return out
