"""The DICOM SR as IHE AI Results lays it out (TID 1500 in a Comprehensive 3D SR): built with highdicom,
checked by dciodvfy (dicom3tools) and by the content-tree constraints of the IOD, read back with
`highdicom.sr.srread`."""

from __future__ import annotations

import copy
import datetime as dt
import re
import shutil
import subprocess
import uuid
from dataclasses import replace
from io import BytesIO
from pathlib import Path

import pytest
from highdicom.sr import MeasurementReport
from pydicom import Dataset, dcmread
from pydicom.uid import EnhancedCTImageStorage

from integrations.errors import PermanentError
from integrations.sample_pacs import generate_studies
from integrations.sr import (
    DISCLAIMER,
    LOCAL_CODES,
    SCHEME,
    TEXT_LIMIT,
    SrAnswer,
    SrCode,
    SrComment,
    SrImage,
    SrProvenance,
    SrVerdict,
    SrVerification,
    build_sr,
    derived_uid,
    read_sr_findings,
    sr_text,
)
from tests.conftest import require_or_skip

# --- conformance: dciodvfy, the IOD's content-tree constraints, highdicom's reader --------------------

# every warning dciodvfy gives on our SRs, and why it is acceptable
KNOWN_WARNINGS = {
    # nightread's own coding scheme (docs/results.md), declared in the Coding Scheme Identification
    # Sequence; dciodvfy knows the standard's designators only
    r"Unrecognized defined term <99NIGHTREAD> for value 1 of attribute <Coding Scheme Designator>",
}
ALL_TYPES = {
    "CONTAINER", "TEXT", "CODE", "NUM", "DATETIME", "DATE", "TIME", "UIDREF", "PNAME",
    "IMAGE", "WAVEFORM", "COMPOSITE", "SCOORD", "SCOORD3D", "TCOORD", "TABLE",
}  # fmt: skip
_OBS = {"TEXT", "CODE", "NUM", "DATETIME", "DATE", "TIME", "UIDREF", "PNAME", "COMPOSITE"}
_ACQ = {"TEXT", "CODE", "NUM", "DATETIME", "DATE", "TIME", "UIDREF", "PNAME", "CONTAINER"}
_PROPERTIES = ALL_TYPES - {"TABLE"}
# PS3.3 Table A.35.13-2, Comprehensive 3D SR relationship content constraints: (source value type,
# relationship) -> the target value types allowed (dciodvfy checks the modules, not the content tree)
RELATIONSHIPS: dict[tuple[str, str], set[str]] = {
    ("CONTAINER", "CONTAINS"): ALL_TYPES,
    ("CONTAINER", "HAS OBS CONTEXT"): _OBS,
    ("CONTAINER", "HAS ACQ CONTEXT"): _ACQ,
    ("CONTAINER", "HAS CONCEPT MOD"): {"TEXT", "CODE"},
    **{(src, "HAS OBS CONTEXT"): _OBS for src in ("TEXT", "CODE", "NUM")},
    **{(src, "HAS CONCEPT MOD"): {"TEXT", "CODE"} for src in ("TEXT", "CODE", "NUM")},
    **{(src, "HAS PROPERTIES"): _PROPERTIES for src in ("TEXT", "CODE", "NUM")},
    **{(src, "INFERRED FROM"): _PROPERTIES for src in ("TEXT", "CODE", "NUM")},
    **{(src, "HAS ACQ CONTEXT"): _ACQ for src in ("IMAGE", "WAVEFORM", "COMPOSITE", "SCOORD", "SCOORD3D", "TCOORD")},
    **{(src, "HAS CONCEPT MOD"): {"TEXT", "CODE"} for src in ("IMAGE", "WAVEFORM", "COMPOSITE")},
    ("PNAME", "HAS PROPERTIES"): {"TEXT", "CODE", "DATETIME", "DATE", "TIME", "UIDREF", "PNAME"},
}
STANDARD_SCHEMES = {"DCM", "SCT", "LN", "UCUM", "UMLS", "RFC5646", "RADLEX"}


def _items(items, parent=None):
    for item in items:
        yield parent, item
        yield from _items(item.get("ContentSequence", []), item)


def content_tree_problems(ds: Dataset) -> list[str]:
    """Relationships the IOD does not allow, codes too long for their attributes, coding schemes
    neither standard nor declared in the Coding Scheme Identification Sequence."""
    declared = {str(i.CodingSchemeDesignator) for i in ds.get("CodingSchemeIdentificationSequence", [])}
    problems = []
    for parent, item in _items(ds.ContentSequence, ds):
        source = "CONTAINER" if parent is ds else parent.ValueType
        allowed = RELATIONSHIPS.get((source, item.RelationshipType), set())
        if item.ValueType not in allowed:
            problems.append(f"{source} {item.RelationshipType} {item.ValueType}")
        for seq in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
            for code in item.get(seq, []):
                if len(str(code.get("CodeValue", ""))) > 16 or len(str(code.CodeMeaning)) > 64:
                    problems.append(f"code too long: {code.CodeValue}")
                if code.CodingSchemeDesignator not in STANDARD_SCHEMES | declared:
                    problems.append(f"undeclared coding scheme {code.CodingSchemeDesignator}")
    return problems


def dciodvfy(raw: bytes, folder: Path) -> list[str]:
    """Run dciodvfy on `raw`; fail on any "Error" line and on a warning not in KNOWN_WARNINGS; return the
    warnings. A missing dciodvfy skips (fails in CI: NIGHTREAD_REQUIRE_SERVICES=1)."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        require_or_skip("dciodvfy (apt-get install dicom3tools)")
    assert tool is not None
    path = folder / f"sr-{uuid.uuid4().hex}.dcm"
    path.write_bytes(raw)
    try:
        run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120, check=False)
    finally:
        path.unlink()
    lines = [line.strip() for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error")]
    assert errors == [], errors
    warnings = [line for line in lines if line.startswith("Warning")]
    unknown = [w for w in warnings if not any(re.search(k, w) for k in KNOWN_WARNINGS)]
    assert unknown == [], unknown
    return warnings


def check_conformant(raw: bytes, folder: Path) -> dict:
    """dciodvfy finds no error, the content tree keeps the IOD's constraints, highdicom reads it back."""
    dciodvfy(raw, folder)
    ds = dcmread(BytesIO(raw))
    assert ds.SOPClassUID.name == "Comprehensive 3D SR Storage"
    assert content_tree_problems(ds) == []
    return read_sr_findings(raw)


# --- what we build --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chest():
    study = next(s for s in generate_studies(seed=3) if s.instances[0].Modality == "CR")
    return study.instances


@pytest.fixture(scope="module")
def enhanced_ct():
    """The header of a 3-frame Enhanced CT image (patient and study from a sample CT)."""
    ct = next(s for s in generate_studies(seed=3) if s.instances[0].Modality == "CT").instances[0]
    ds = Dataset()
    for element in ct:
        if element.tag.group in (0x0008, 0x0010, 0x0020) and element.keyword != "ImageType":
            ds[element.tag] = copy.deepcopy(element)
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = derived_uid("test-enhanced-ct")
    ds.NumberOfFrames = 3
    ds.Rows = ds.Columns = 16
    return ds


PROVENANCE = SrProvenance(
    model_name="tiny-random-smolvlm",
    model_revision="abc123",
    model_backend="local",
    model_version_key="tiny-random-smolvlm@abc123/local/0f0f",
    bank_version="bank0001",
    prompt_version="prompt01",
    nightread_version="0.1.0",
)
EFFUSION = SrCode("SCT", "60046008", "Pleural effusion")
PLEURA = SrCode("SCT", "3120008", "Pleura")
PNEUMOTHORAX = SrCode("SCT", "36118008", "Pneumothorax")
MAIN_FINDING = SrCode("99NIGHTREAD", "MAIN_FINDING", "Most important finding")


def answers(p_yes: float = 0.8123) -> tuple[SrAnswer, ...]:
    return (
        SrAnswer(
            "pleural_effusion", "Is there a pleural effusion?", "closed", "yes", p_yes, True, EFFUSION, EFFUSION, PLEURA
        ),
        SrAnswer("pneumothorax", "Is there a pneumothorax?", "closed", "no", 0.1, False, PNEUMOTHORAX, None, PLEURA),
        SrAnswer(
            "xr_impression",
            "What is the most important finding?",
            "open",
            "no acute finding",
            None,
            False,
            MAIN_FINDING,
        ),
    )


def images_of(instances, p_yes: float = 0.8123) -> list[SrImage]:
    return [
        SrImage(
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            frame=0,
            render_version="r1-512",
            caption=f"A chest radiograph, view {ds.ViewPosition}.",
            answers=answers(p_yes),
        )
        for ds in instances
    ]


def test_sr_is_an_ai_results_measurement_report_that_reads_back(chest, tmp_path):
    built = build_sr(evidence=chest, images=images_of(chest), provenance=PROVENANCE)
    raw = built.to_bytes()
    read = check_conformant(raw, tmp_path)
    ds = dcmread(BytesIO(raw))
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert ds.ConceptNameCodeSequence[0].CodeValue == "126000"  # Imaging Measurement Report
    assert ds.VerificationFlag == "UNVERIFIED"
    assert ds.CompletionFlag == "COMPLETE"
    assert DISCLAIMER in ds.SeriesDescription
    assert ds.StudyInstanceUID == chest[0].StudyInstanceUID
    assert ds.PatientID == chest[0].PatientID, "the SR files under the same patient in the PACS"
    assert ds.SOPInstanceUID.startswith("2.25.")
    # Contributing Equipment: nightread as Processing Equipment, with the model and its versions
    (ours,) = [e for e in ds.ContributingEquipmentSequence if e.Manufacturer == "nightread"]
    assert ours.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert ours.ManufacturerModelName == "tiny-random-smolvlm"
    assert list(ours.SoftwareVersions) == ["abc123", "nightread 0.1.0"]
    assert {i.CodingSchemeDesignator for i in ds.CodingSchemeIdentificationSequence} >= {SCHEME}
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {str(x.SOPInstanceUID) for x in chest}

    doc = read["doc"]
    (device,) = doc.content  # TID 1500 root: the device observer, one per model version
    observer = {str(i.ConceptNameCodeSequence[0].CodeMeaning): i for i in device.ContentSequence[1:6]}
    assert derived_uid("nightread-device", PROVENANCE.model_version_key) == observer["Device Observer UID"].UID
    assert read["disclaimer"] == DISCLAIMER
    assert read["verified"] is False
    assert read["predecessors"] == []
    assert read["procedures"] == [SrCode("LN", "43468-8", "XR unspecified body region")]
    assert sorted(read["library"]) == sorted(str(x.SOPInstanceUID) for x in chest)
    assert read["algorithm"]["name"] == "tiny-random-smolvlm"
    assert read["algorithm"]["version"] == "abc123"
    assert {"question_bank=bank0001", "prompt=prompt01", "render=r1-512", "nightread=0.1.0"} <= set(
        read["algorithm"]["parameters"]
    )
    assert set(read["images"]) == {(str(x.SOPInstanceUID), 0) for x in chest}
    for ds_in in chest:
        entry = read["images"][(str(ds_in.SOPInstanceUID), 0)]
        assert entry["multi_frame"] is False
        assert entry["tracking_uid"] == derived_uid("tracking", str(ds_in.SOPInstanceUID), "0")
        assert entry["caption"] == f"A chest radiograph, view {ds_in.ViewPosition}."
        assert entry["render_version"] == "r1-512"
        effusion = entry["answers"]["pleural_effusion"]
        assert effusion == {
            "id": "pleural_effusion",
            "question": "Is there a pleural effusion?",
            "code": EFFUSION,
            "kind": "closed",
            "answer": "yes",
            "p_yes": pytest.approx(0.8123),
            "unit": "1",
            "flagged": True,
            "finding_type": EFFUSION,
            "finding_site": PLEURA,
            "verdict": None,
            "comments": [],
        }
        assert entry["answers"]["pneumothorax"]["answer"] == "no"
        assert entry["answers"]["pneumothorax"]["flagged"] is False
        assert entry["answers"]["pneumothorax"]["finding_type"] is None
        impression = entry["answers"]["xr_impression"]
        assert (impression["kind"], impression["answer"], impression["code"]) == (
            "open",
            "no acute finding",
            MAIN_FINDING,
        )


def test_same_findings_same_uid_changed_findings_new_uid(chest):
    first = build_sr(evidence=chest, images=images_of(chest), provenance=PROVENANCE)
    again = build_sr(evidence=chest, images=list(reversed(images_of(chest))), provenance=PROVENANCE)
    assert again.sop_instance_uid == first.sop_instance_uid, "same content: the PACS keeps one copy"
    changed = build_sr(evidence=chest, images=images_of(chest, p_yes=0.9), provenance=PROVENANCE)
    assert changed.sop_instance_uid != first.sop_instance_uid
    assert changed.series_instance_uid == first.series_instance_uid, "one series per model version"
    other_model = build_sr(
        evidence=chest, images=images_of(chest), provenance=replace(PROVENANCE, model_version_key="other")
    )
    assert other_model.sop_instance_uid != first.sop_instance_uid
    assert other_model.series_instance_uid != first.series_instance_uid


def test_every_frame_of_a_multi_frame_image_is_referenced_by_its_number(chest, enhanced_ct, tmp_path):
    """Frame index 0 is frame number 1 of a multi-frame image (not the whole instance); a single-frame
    image names no frame."""
    multi = [
        SrImage(str(enhanced_ct.SOPClassUID), str(enhanced_ct.SOPInstanceUID), frame, "r1", None, answers(), True)
        for frame in (0, 1)
    ]
    single = images_of(chest[:1])
    built = build_sr(evidence=[enhanced_ct, chest[0]], images=[*multi, *single], provenance=PROVENANCE)
    read = check_conformant(built.to_bytes(), tmp_path)
    sop = str(enhanced_ct.SOPInstanceUID)
    assert set(read["images"]) == {(sop, 0), (sop, 1), (str(chest[0].SOPInstanceUID), 0)}
    assert read["images"][(sop, 0)]["multi_frame"]
    assert not read["images"][(str(chest[0].SOPInstanceUID), 0)]["multi_frame"]
    groups = {}
    for group in MeasurementReport.from_sequence(read["doc"].content).get_image_measurement_groups():
        (source,) = group.source_images
        groups[str(source.referenced_sop_instance_uid), group.tracking_identifier] = source.referenced_frame_numbers
    assert sorted(groups.values(), key=str) == [None, [1], [2]]
    assert groups[sop, "image 2 frame 1"] == [1]  # the chest image (a smaller UID) is image 1
    assert groups[sop, "image 3 frame 2"] == [2]
    assert read["images"][(sop, 0)]["tracking_uid"] != read["images"][(sop, 1)]["tracking_uid"]
    assert read["procedures"] == [  # one per modality: CR, CT
        SrCode("LN", "43468-8", "XR unspecified body region"),
        SrCode("LN", "25045-6", "CT unspecified body region"),
    ]


def test_model_text_is_made_safe_for_the_sr(chest, tmp_path):
    """A caption full of control characters (NUL first), an answer too long: the SR stays valid and
    says what `sr_text` makes of them."""
    nasty = "".join(chr(c) for c in range(32)) + "ok\x7f\x85\u2028end\ud800" + "\t \n"
    long_answer = "word " * 3000
    image = replace(
        images_of(chest[:1])[0],
        caption=nasty,
        answers=(
            SrAnswer("xr_impression", "What?\x00", "open", long_answer, None, False, MAIN_FINDING),
            SrAnswer("empty", "Anything?", "open", "\x00\x00", None, False, MAIN_FINDING),
        ),
    )
    raw = build_sr(evidence=chest[:1], images=[image], provenance=PROVENANCE).to_bytes()
    assert b"\x00ok" not in raw
    read = check_conformant(raw, tmp_path)
    entry = read["images"][(str(chest[0].SOPInstanceUID), 0)]
    assert entry["caption"] == sr_text(nasty)
    assert entry["caption"].startswith("\ufffd" * 9 + " \n\ufffd\ufffd\r\ufffd")  # TAB -> space, LF and CR kept
    assert "\x00" not in entry["caption"]
    assert "\x1b" not in entry["caption"]
    assert entry["answers"]["xr_impression"]["answer"] == sr_text(long_answer)
    assert len(entry["answers"]["xr_impression"]["answer"]) <= TEXT_LIMIT
    assert entry["answers"]["xr_impression"]["answer"].endswith("word…")
    assert entry["answers"]["xr_impression"]["question"] == "What?\ufffd"
    assert entry["answers"]["empty"]["answer"] == "\ufffd\ufffd"


def test_sr_text_keeps_what_is_valid_and_is_stable():
    assert sr_text("Right pleural effusion.\nNo pneumothorax.") == "Right pleural effusion.\nNo pneumothorax."
    assert sr_text("") == sr_text(None) == sr_text("   ") == "(no text)"
    assert sr_text("héllo 世界 ✓") == "héllo 世界 ✓"
    for value in ("a\x00b", "x" * 10_000, "tab\there", "\x1b[1mbold", "trailing   "):
        assert sr_text(sr_text(value)) == sr_text(value)
    assert sr_text("abc", limit=2) == "a…"


def test_a_verified_version_names_its_reviewers_and_predecessor(chest, tmp_path):
    original = build_sr(evidence=chest, images=images_of(chest), provenance=PROVENANCE)
    original_bytes = original.to_bytes()
    at = dt.datetime(2026, 12, 1, 9, 30, tzinfo=dt.UTC)
    sop = str(chest[0].SOPInstanceUID)
    images = images_of(chest)
    first = images[0]
    effusion, pneumothorax, impression = first.answers
    images[0] = replace(
        first,
        answers=(
            replace(effusion, verdict=SrVerdict("confirm", "alice", at)),
            replace(
                pneumothorax,
                verdict=SrVerdict("correct", "bob", at, corrected_answer="yes"),
                comments=(SrComment("bob", "small apical\x00 pneumothorax", at),),
            ),
            replace(impression, verdict=SrVerdict("correct", "alice", at, corrected_answer="Right effusion.")),
        ),
    )
    verification = SrVerification(("alice", "bob"), "St. Elsewhere", dcmread(BytesIO(original_bytes)))
    verified = build_sr(
        evidence=chest, images=images, provenance=PROVENANCE, verification=verification, instance_number=2
    )
    assert verified.sop_instance_uid != original.sop_instance_uid
    assert verified.series_instance_uid == original.series_instance_uid
    raw = verified.to_bytes()
    read = check_conformant(raw, tmp_path)
    ds = dcmread(BytesIO(raw))
    assert ds.VerificationFlag == "VERIFIED"
    assert read["verified"] is True
    assert read["verifying_observers"] == [("alice", "St. Elsewhere"), ("bob", "St. Elsewhere")]
    assert read["predecessors"] == [original.sop_instance_uid]
    answers_read = read["images"][(sop, 0)]["answers"]
    assert answers_read["pleural_effusion"]["verdict"] == {
        "decision": "confirm",
        "reviewer": "alice",
        "corrected_answer": None,
        "at": "20261201093000.000000+0000",
    }
    assert answers_read["pneumothorax"]["verdict"]["corrected_answer"] == "yes"
    assert answers_read["pneumothorax"]["comments"] == [
        {"author": "bob", "text": "small apical\ufffd pneumothorax", "at": "20261201093000.000000+0000"}
    ]
    assert answers_read["xr_impression"]["verdict"]["corrected_answer"] == "Right effusion."
    assert read["images"][(str(chest[1].SOPInstanceUID), 0)]["answers"]["pleural_effusion"]["verdict"] is None
    assert original.to_bytes() == original_bytes, "the first version is never changed"
    # the same decisions give the same document, whatever it replaces
    again = build_sr(
        evidence=chest,
        images=images,
        provenance=PROVENANCE,
        verification=replace(verification, predecessor=ds),
        instance_number=3,
    )
    assert again.sop_instance_uid == verified.sop_instance_uid


def test_an_empty_report_is_refused(chest):
    with pytest.raises(PermanentError, match="no annotated images"):
        build_sr(evidence=chest, images=[], provenance=PROVENANCE)


def test_every_local_code_is_documented():
    from flows.rules.questions import load_bank

    doc = (Path(__file__).resolve().parents[2] / "docs" / "results.md").read_text()
    bank_codes = {
        c.value: c.meaning
        for q in load_bank().questions
        for c in (q.code, q.finding_type, q.finding_site)
        if c is not None and c.scheme == SCHEME
    }
    assert bank_codes
    for value, meaning in (LOCAL_CODES | bank_codes).items():
        assert f"`{value}`" in doc, value
        assert meaning in doc, value


def test_an_sr_of_another_template_is_refused_clearly(chest):
    import highdicom as hd
    from highdicom.sr import CodedConcept, ContainerContentItem

    root = ContainerContentItem(name=CodedConcept("REPORT", SCHEME, "nightread AI findings"))
    root.ContentSequence = hd.sr.ContentSequence(
        [hd.sr.TextContentItem(CodedConcept("DISCLAIMER", SCHEME, "Disclaimer"), DISCLAIMER, "CONTAINS")]
    )
    other = hd.sr.ComprehensiveSR(  # the layout nightread wrote before TID 1500
        evidence=chest[:1],
        content=root,
        series_instance_uid=derived_uid("s"),
        series_number=1,
        sop_instance_uid=derived_uid("i"),
        instance_number=1,
    )
    buf = BytesIO()
    other.save_as(buf, enforce_file_format=True)
    with pytest.raises(PermanentError, match="not a TID 1500"):
        read_sr_findings(buf.getvalue())
