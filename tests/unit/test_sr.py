"""The DICOM SR: built with highdicom and read back with `highdicom.sr.srread`."""

from __future__ import annotations

from dataclasses import replace

import pytest
from pydicom import dcmread

from integrations.errors import PermanentError
from integrations.sample_pacs import generate_studies
from integrations.sr import DISCLAIMER, SrAnswer, SrImage, SrProvenance, build_sr, read_sr_findings


@pytest.fixture(scope="module")
def chest():
    study = next(s for s in generate_studies(seed=3) if s.instances[0].Modality == "CR")
    return study.instances


PROVENANCE = SrProvenance(
    model_name="tiny-random-smolvlm",
    model_revision="abc123",
    model_backend="local",
    model_version_key="tiny-random-smolvlm@abc123/local/0f0f",
    bank_version="bank0001",
    prompt_version="prompt01",
    nightread_version="0.1.0",
)


def images_of(instances, p_yes: float = 0.8123) -> list[SrImage]:
    return [
        SrImage(
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            frame=0,
            render_version="r1-512",
            caption=f"A chest radiograph, view {ds.ViewPosition}.",
            answers=(
                SrAnswer("pleural_effusion", "Is there a pleural effusion?", "closed", "yes", p_yes, True),
                SrAnswer("pneumothorax", "Is there a pneumothorax?", "closed", "no", 0.1, False),
                SrAnswer(
                    "xr_impression", "What is the most important finding?", "open", "no acute finding", None, False
                ),
            ),
        )
        for ds in instances
    ]


def test_sr_reads_back_with_every_finding_and_its_provenance(chest):
    built = build_sr(evidence=chest, images=images_of(chest), provenance=PROVENANCE)
    raw = built.to_bytes()
    ds = dcmread(__import__("io").BytesIO(raw))
    assert ds.SOPClassUID.name == "Comprehensive SR Storage"
    assert DISCLAIMER in ds.SeriesDescription
    assert ds.StudyInstanceUID == chest[0].StudyInstanceUID
    assert ds.PatientID == chest[0].PatientID, "the SR files under the same patient in the PACS"
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {str(x.SOPInstanceUID) for x in chest}
    read = read_sr_findings(raw)
    assert read["disclaimer"] == DISCLAIMER
    assert read["algorithm"]["name"] == "tiny-random-smolvlm"
    assert read["algorithm"]["version"] == "abc123"
    assert {"question_bank=bank0001", "prompt=prompt01", "nightread=0.1.0"} <= set(read["algorithm"]["parameters"])
    assert set(read["images"]) == {(str(x.SOPInstanceUID), 0) for x in chest}
    for ds_in in chest:
        entry = read["images"][(str(ds_in.SOPInstanceUID), 0)]
        assert entry["caption"] == f"A chest radiograph, view {ds_in.ViewPosition}."
        assert entry["render_version"] == "r1-512"
        effusion = entry["answers"]["pleural_effusion"]
        assert effusion == {
            "question": "Is there a pleural effusion?",
            "id": "pleural_effusion",
            "answer": "Yes",
            "p_yes": pytest.approx(0.8123),
            "unit": "{probability}",
            "flagged": True,
        }
        assert entry["answers"]["pneumothorax"]["answer"] == "No"
        assert entry["answers"]["pneumothorax"]["flagged"] is False
        assert entry["answers"]["xr_impression"]["answer"] == "no acute finding"


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


def test_frames_are_referenced_by_number(chest):
    image = replace(images_of(chest[:1])[0], frame=4)
    read = read_sr_findings(build_sr(evidence=chest[:1], images=[image], provenance=PROVENANCE).to_bytes())
    assert set(read["images"]) == {(str(chest[0].SOPInstanceUID), 4)}


def test_an_empty_report_is_refused(chest):
    with pytest.raises(PermanentError, match="no annotated images"):
        build_sr(evidence=chest, images=[], provenance=PROVENANCE)
