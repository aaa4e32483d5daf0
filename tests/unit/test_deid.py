"""De-identification (PS3.15 Annex E Basic Profile with the Modified Dates, Clean Descriptors and Retain
Safe Private options; every attribute of the table is checked in test_deid_table.py) and the export:
no identifying value of a synthetic study or of pydicom's own test files survives, pseudonyms are
consistent across a study, and an image flagged with burned-in annotation is left out and reported."""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from db.cohort import CohortResult, run_cohort
from db.migrate import upgrade
from db.session import make_engine
from flows.deid_export import export_deidentified, reidentify
from flows.nightly import run_nightly
from flows.wiring.runtime import Runtime
from integrations.deid import (
    CLEAN_DESCRIPTORS,
    METHOD,
    Pseudonymizer,
    action_code,
    deidentify,
    exclusion_reason,
    is_clean_descriptor,
)
from integrations.errors import ConfigurationError

KEY = b"k" * 32
SCANNED_VRS = {"AE", "AS", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"}  # text a person can read
IDENTIFYING_VRS = {"AE", "LO", "LT", "PN", "SH", "ST", "UC", "UT"}


def patient_dataset(patient_id: str = "PID-12345", study_date: str = "20240110") -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", patient_id, "19700312"
    ds.AccessionNumber, ds.StudyID = "ACC-998877", "S77"
    ds.StudyDate, ds.SeriesDate, ds.AcquisitionDateTime = study_date, study_date, f"{study_date}101500"
    ds.InstitutionName, ds.OperatorsName, ds.ReferringPhysicianName = "St Elsewhere", "Tech^Tom", "Dr^Who"
    ds.StudyDescription, ds.Modality = "CT CHEST for Jane", "CT"
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = CTImageStorage, generate_uid()
    ref.VerifyingObserverName = "Doe^John"  # a person name in a sequence
    ds.ReferencedImageSequence = DicomSequence([ref])
    ds.add_new(0x00091010, "LO", "private: Jane Doe's ward")
    ds.add_new(0x60003000, "OW", b"\x00" * 8)  # an overlay
    return ds


def test_annex_e_basic_profile_on_one_dataset():
    p = Pseudonymizer(key=KEY)
    ds = patient_dataset()
    originals = {
        "sop": str(ds.SOPInstanceUID),
        "study": str(ds.StudyInstanceUID),
        "ref": str(ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID),
    }
    deidentify(ds, p)
    assert ds.PatientName == ds.PatientID != "PID-12345"
    assert ds.PatientBirthDate == ""
    assert ds.AccessionNumber not in ("", "ACC-998877")
    assert ds.InstitutionName == ds.OperatorsName == "ANONYMIZED", "X/Z/D: a dummy value"
    assert "StudyDescription" not in ds, "not a clean descriptor: its basic action (X)"
    assert ds.ReferringPhysicianName == ""
    assert 0x00091010 not in ds, "private tags removed"
    assert 0x60003000 not in ds, "overlays removed"
    assert ds.ReferencedImageSequence[0].VerifyingObserverName == "ANONYMIZED", "the table applies in sequences"
    assert ds.SOPClassUID == CTImageStorage, "DICOM-defined UIDs are kept"
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID == p.uid(originals["sop"])
    assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == p.uid(originals["ref"])
    assert str(ds.StudyInstanceUID).startswith("2.25.")
    shift = p.date_offset("PID-12345")
    assert 1 <= shift <= 3650
    assert ds.StudyDate == f"{dt.date(2024, 1, 10) - dt.timedelta(days=shift):%Y%m%d}"
    assert ds.AcquisitionDateTime == ds.StudyDate + "101500"
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    assert ds.DeidentificationMethod == METHOD
    assert len(METHOD) <= 64
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100", "113107", "113105", "113111"]
    assert {c.CodingSchemeDesignator for c in ds.DeidentificationMethodCodeSequence} == {"DCM"}
    # the same key: the same pseudonyms and the same patient offset in another file of the patient
    other = deidentify(patient_dataset(study_date="20240301"), Pseudonymizer(key=KEY))
    assert other.PatientID == ds.PatientID
    interval = dt.datetime.strptime(other.StudyDate, "%Y%m%d") - dt.datetime.strptime(ds.StudyDate, "%Y%m%d")
    assert interval.days == (dt.date(2024, 3, 1) - dt.date(2024, 1, 10)).days, "intervals kept"
    assert deidentify(patient_dataset(), Pseudonymizer(key=b"x" * 32)).PatientID != ds.PatientID
    assert p.decrypt(p.encrypt("PID-12345")) == "PID-12345"


# --- the attributes that used to survive ---------------------------------------------------------------

SURVIVORS = {  # keyword: an identifying value
    "StudyComments": "called Jane Doe at 555-0199",
    "ReasonForStudy": "Jane's cough since her trip to Lyon",
    "RequestedProcedureComments": "Mrs Doe prefers mornings",
    "PatientState": "Jane is anxious",
    "RequestingService": "Springfield Oncology Ward 5",
    "FrameComments": "Jane coughed here",
}


def with_survivors(values: dict[str, str]) -> Dataset:
    ds = patient_dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    content = Dataset()
    content.FrameComments = values["FrameComments"]  # where it really lives: a frame's functional group
    group = Dataset()
    group.FrameContentSequence = DicomSequence([content])
    ds.PerFrameFunctionalGroupsSequence = DicomSequence([group])
    icon = Dataset()
    icon.Rows = icon.Columns = 4
    icon.PixelData = b"\x00" * 16
    ds.IconImageSequence = DicomSequence([icon])
    return ds


def test_the_named_survivors_are_gone():
    out = deidentify(with_survivors(SURVIVORS), Pseudonymizer(key=KEY))
    for keyword in SURVIVORS:
        assert keyword not in out, keyword
    assert "FrameComments" not in out.PerFrameFunctionalGroupsSequence[0].FrameContentSequence[0]
    assert "IconImageSequence" not in out


def test_clean_descriptors_keep_only_safe_text():
    safe = {**SURVIVORS, **dict.fromkeys(["StudyComments", "ReasonForStudy", "FrameComments"], "CT CHEST W CONTRAST")}
    out = deidentify(with_survivors(safe), Pseudonymizer(key=KEY))
    assert out.StudyComments == out.ReasonForStudy == out.FrameComments == "CT CHEST W CONTRAST"
    assert "RequestingService" not in out, "not a descriptor of the Clean Descriptors option: removed"
    assert is_clean_descriptor("AX T2 FLAIR 5MM")
    assert is_clean_descriptor("ISOVUE300/100")
    for unsafe in ("CT chest for Jane", "MRN 12345678", "20240110", "St Elsewhere", "x" * 70):
        assert not is_clean_descriptor(unsafe), unsafe


def test_safe_private_attributes_are_kept_only_when_listed():
    def private() -> Dataset:
        ds = patient_dataset()
        block = ds.private_block(0x0011, "ACME SAFE 1.0", create=True)
        block.add_new(0x01, "DS", "1.5")
        block.add_new(0x02, "LO", "Jane Doe")
        return ds

    assert not any(e.tag.is_private for e in deidentify(private(), Pseudonymizer(key=KEY))), "empty list: all removed"
    kept = deidentify(private(), Pseudonymizer(key=KEY), safe_private={("ACME SAFE 1.0", 0x01)})
    assert kept.private_block(0x0011, "ACME SAFE 1.0")[0x01].value == "1.5"
    assert 0x00111002 not in kept


def test_burned_in_annotation_and_recognizable_features_exclude_an_instance():
    ds = patient_dataset()
    assert exclusion_reason(ds) is None
    ds.BurnedInAnnotation = "NO"
    assert exclusion_reason(ds) is None
    ds.BurnedInAnnotation = "YES"
    assert exclusion_reason(ds) == "BurnedInAnnotation YES"
    face = patient_dataset()
    face.RecognizableVisualFeatures = "YES"
    assert exclusion_reason(face) == "RecognizableVisualFeatures YES"
    embedded = patient_dataset()
    del embedded[0x60003000]
    embedded.add_new(0x60020010, "US", 8)  # Overlay Rows, no Overlay Data: its bits are in Pixel Data
    assert exclusion_reason(embedded) == "overlay bits inside Pixel Data (no Overlay Data)"


# --- whole objects: nothing identifying survives -------------------------------------------------------


def elements(ds: Dataset) -> Iterator[DataElement]:
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        yield from meta
    yield from ds.iterall()


def values(elem: DataElement) -> list[str]:
    if elem.value in (None, "", b""):
        return []
    items = elem.value if isinstance(elem.value, list | MultiValue) else [elem.value]
    return [str(v).strip() for v in items if str(v).strip()]


def identifying_values(ds: Dataset) -> set[str]:
    """The text values de-identification must not let through: person names, private values, file meta
    AE titles, and every text the table acts on (a clean descriptor is kept only when it is clean)."""
    found: set[str] = set()
    kept: set[str] = set()
    for elem in elements(ds):
        if elem.VR not in IDENTIFYING_VRS:
            continue
        tag = int(elem.tag)
        cleaned = tag in CLEAN_DESCRIPTORS and is_clean_descriptor(elem.value)
        identifying = (
            elem.VR == "PN"
            or elem.tag.is_private
            or elem.tag.group == 0x0002
            or (action_code(tag) is not None and not cleaned)
        )
        (found if identifying else kept).update(values(elem))
    # a value also found inside a kept one (InstitutionName "TOSHIBA", Manufacturer "TOSHIBA_MEC") cannot be told apart
    return {v for v in found if len(v) >= 3 and not any(v.upper() in k.upper() for k in kept)}


def leaks(out: Dataset, secrets: set[str]) -> list[str]:
    texts = [v.upper() for e in elements(out) if e.VR in SCANNED_VRS for v in values(e)]
    return sorted({s for s in secrets for t in texts if s.upper() in t})


def uids(ds: Dataset) -> set[str]:
    return {v for e in elements(ds) if e.VR == "UI" for v in values(e) if not v.startswith("1.2.840.10008.")}


def synthetic_study() -> list[Dataset]:
    """One patient's study, two series, three CT instances, with identifying values everywhere."""
    study, frame_of_reference = generate_uid(), generate_uid()
    series = [generate_uid(), generate_uid()]
    instances: list[Dataset] = []
    for i in range(3):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.SourceApplicationEntityTitle = "JANESPACS"
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series[min(i, 1)], frame_of_reference
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "DOE^JANE^MARIE", "MRN-4455667", "19700312"
        ds.PatientAge, ds.PatientSex, ds.PatientWeight, ds.PatientSize = "054Y", "F", "61.5", "1.68"
        ds.PatientAddress, ds.PatientTelephoneNumbers = "12 Rose Lane, Springfield", "555-0199"
        ds.PatientMotherBirthName, ds.OtherPatientNames = "SMITH^MARY", "ROE^JANE"
        other = Dataset()
        other.PatientID, other.IssuerOfPatientID = "ALT-99887", "Springfield General"
        ds.OtherPatientIDsSequence = DicomSequence([other])
        ds.Occupation, ds.AdditionalPatientHistory = "Rose Bakery", "Jane fell at home"
        ds.PatientComments, ds.MedicalAlerts, ds.Allergies = "Jane dislikes needles", "Jane: pacemaker", "Jane: latex"
        ds.AccessionNumber, ds.StudyID = "ACC-998877", "S77"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240110"
        ds.StudyTime, ds.AcquisitionDateTime = "101500", "20240110101502"
        ds.StudyDescription = "CT chest for Jane Doe"
        ds.ReferringPhysicianName, ds.RequestingPhysician = "WHO^DOCTOR", "HOUSE^GREGORY"
        for keyword, value in SURVIVORS.items():
            setattr(ds, keyword, value)
        ds.RequestedProcedureDescription = "Chest CT for Jane"
        ds.SeriesDescription = "AXIAL CHEST 5MM" if i < 2 else "Jane recon by Tom"
        ds.ProtocolName = "CHEST ROUTINE"
        ds.OperatorsName, ds.PerformingPhysicianName = "TECH^TOM", "GREY^MEREDITH"
        ds.InstitutionName, ds.InstitutionAddress = "St Elsewhere Hospital", "1 Hospital Road, Springfield"
        ds.InstitutionalDepartmentName, ds.StationName = "Radiology North", "JANESCT01"
        ds.DeviceSerialNumber, ds.ImageComments = "SN-445566", "Jane moved"
        ds.Modality, ds.Manufacturer, ds.BurnedInAnnotation = "CT", "nightread synthetic", "NO"
        request = Dataset()
        request.RequestedProcedureID, request.ScheduledProcedureStepID = "RP-5544", "SPS-0001"
        request.ScheduledProcedureStepDescription = "Jane chest"
        ds.RequestAttributesSequence = DicomSequence([request])
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "EMP-7788", "L", "Tom Tech"
        operator = Dataset()
        operator.PersonIdentificationCodeSequence = DicomSequence([code])
        operator.InstitutionName = "St Elsewhere Hospital"
        ds.OperatorIdentificationSequence = DicomSequence([operator])
        text = Dataset()
        text.ValueType, text.TextValue = "TEXT", "Jane Doe said it hurts"
        ds.ContentSequence = DicomSequence([text])
        if i > 0:  # references to the first instance, as a derived image has
            for keyword in ("ReferencedImageSequence", "SourceImageSequence"):
                ref = Dataset()
                ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = CTImageStorage, instances[0].SOPInstanceUID
                setattr(ds, keyword, DicomSequence([ref]))
        icon = Dataset()
        icon.Rows = icon.Columns = 4
        icon.PixelData = b"\x00" * 16
        ds.IconImageSequence = DicomSequence([icon])
        block = ds.private_block(0x0009, "ACME 1.0", create=True)
        block.add_new(0x01, "LO", "Jane Doe's ward")
        ds.add_new(0x60000010, "US", 4)  # an overlay with its comments
        ds.add_new(0x60000011, "US", 4)
        ds.add_new(0x60003000, "OW", b"\x00" * 2)
        ds.add_new(0x60004000, "LT", "Jane's marker")
        ds.add_new(0x50002500, "LO", "Jane's curve")  # a retired curve label
        ds.Rows = ds.Columns = 4
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = np.zeros((4, 4), np.uint16).tobytes()
        instances.append(ds)
    return instances


def test_a_synthetic_study_keeps_no_identifying_value_and_consistent_pseudonyms():
    originals = synthetic_study()
    secrets = set().union(*(identifying_values(ds) for ds in originals))
    assert {"DOE^JANE^MARIE", "MRN-4455667", "JANESPACS", "Jane Doe's ward", "Jane recon by Tom"} <= secrets
    secrets |= {"Tom Tech", "EMP-7788", "Jane Doe said it hurts"}  # codes and text inside emptied sequences
    original_uids = set().union(*(uids(ds) for ds in originals))
    first_sop = str(originals[0].SOPInstanceUID)
    p = Pseudonymizer(key=KEY)
    out = [deidentify(copy.deepcopy(ds), p) for ds in originals]
    for ds in out:
        assert not leaks(ds, secrets)
        assert not uids(ds) & original_uids
        assert "OperatorIdentificationSequence" not in ds or ds.OperatorIdentificationSequence == []
        assert len(ds.ContentSequence) == 0, "a sequence's dummy value has no items"
        assert not any(e.tag.group & 0xFF00 in (0x5000, 0x6000) for e in ds), "curves and overlays removed"
    assert out[0].SeriesDescription == "AXIAL CHEST 5MM", "a clean descriptor is kept"
    assert "SeriesDescription" not in out[2]
    # one study: the same pseudonyms in every instance, and references still lead to the right instance
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber", "StudyID"):
        assert len({str(ds.get(keyword)) for ds in out}) == 1, keyword
    assert len({str(ds.FrameOfReferenceUID) for ds in out}) == 1
    assert out[0].SeriesInstanceUID != out[1].SeriesInstanceUID == out[2].SeriesInstanceUID
    assert len({ds.StudyDate for ds in out}) == 1
    assert out[0].StudyDate != "20240110"
    for ds in out[1:]:
        assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == out[0].SOPInstanceUID == p.uid(first_sop)
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == out[0].SOPInstanceUID


TEST_FILES = [
    "CT_small.dcm",
    "MR_small.dcm",
    "rtplan.dcm",
    "test-SR.dcm",
    "examples_overlay.dcm",
    "SC_ybr_full_422_uncompressed.dcm",
    "waveform_ecg.dcm",
    "reportsi.dcm",
]


@pytest.mark.parametrize("name", TEST_FILES)
def test_pydicom_test_files_keep_no_identifying_value(name, tmp_path):
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not bundled with this pydicom")
    original = dcmread(path)
    secrets = identifying_values(original)
    assert str(original.PatientName) in secrets
    out = deidentify(dcmread(path), Pseudonymizer(key=KEY))
    assert not leaks(out, secrets)
    assert not uids(out) & uids(original)
    assert out.PatientIdentityRemoved == "YES"
    out.save_as(tmp_path / "out.dcm", enforce_file_format=True)  # still a writable DICOM file
    again = dcmread(tmp_path / "out.dcm")
    assert not leaks(again, secrets)
    assert again.file_meta.MediaStorageSOPInstanceUID == again.SOPInstanceUID


# --- the export ----------------------------------------------------------------------------------------


def test_export_leaves_out_and_reports_burned_in_images(tmp_path):
    from sqlmodel import Session

    from db.models import Image, Study
    from flows.annotate import object_key
    from flows.wiring.settings import NightreadSettings
    from integrations.sample_pacs import SamplePacs, SampleStudy, generate_studies

    study = next(s for s in generate_studies(seed=7) if s.header.Modality == "CR")
    burned, clean = study.instances[:2]
    burned.BurnedInAnnotation, clean.BurnedInAnnotation = "YES", "NO"
    missing_sop = generate_uid()  # recorded in the database, gone from the PACS
    with SamplePacs(studies=[SampleStudy(study.study_instance_uid, [burned, clean])]) as pacs:
        settings = NightreadSettings(  # type: ignore[call-arg]
            data_dir=tmp_path / "data", pacs={"port": pacs.port, "called_ae": pacs.ae_title}
        )
        upgrade(settings.database_url)
        with Runtime.build(settings) as rt:
            (source_id, *_) = rt.register_sources()
            with Session(rt.engine) as session:
                row = Study(study_instance_uid=study.study_instance_uid, source_id=source_id, study_date="20240110")
                session.add(row)
                session.commit()
                for sop in (str(burned.SOPInstanceUID), str(clean.SOPInstanceUID), missing_sop):
                    key = object_key(study_uid=row.study_instance_uid, sop_uid=sop, frame=0, render_version="r2-512")
                    rt.store.put(key, b"\x89PNG not really")
                    session.add(
                        Image(
                            study_id=row.id,
                            sop_instance_uid=sop,
                            series_instance_uid=str(clean.SeriesInstanceUID),
                            modality="CR",
                            render_version="r2-512",
                            object_key=key,
                            sha256="0" * 64,
                            width=8,
                            height=8,
                        )
                    )
                session.commit()
                study_id = row.id
            result = CohortResult(
                unit="study",
                where="",
                rows=[{"study_id": study_id}],
                questions=[],
                model_version_ids=[],
                bank_versions=[],
                render_versions=[],
            )
            out = tmp_path / "deid"
            manifest = export_deidentified(rt, result=result, out_dir=out)
    assert manifest["dicom_files"] == 1
    assert manifest["pngs"] == 1
    assert manifest["excluded"] == 2
    reasons = sorted(x["reason"] for x in manifest["excluded_instances"])
    assert reasons == ["BurnedInAnnotation YES", "not returned by the PACS (could not be checked)"]
    assert manifest["burned_in_annotation_unknown"] == 0
    assert "2026c" in manifest["action_table"]
    assert manifest["action_table_library"].startswith("dicom-anonymizer ")
    written = list((out / "dicom").rglob("*.dcm"))
    assert len(written) == 1
    assert dcmread(written[0]).BurnedInAnnotation == "NO"
    assert len(list((out / "images").iterdir())) == 1, "the burned-in image's rendering is left out too"
    rows = (out / "cohort.csv").read_text().splitlines()
    assert len(rows) == 2
    every_file = b"".join(f.read_bytes() for f in out.rglob("*") if f.is_file())
    for original in (str(burned.SOPInstanceUID), str(clean.SOPInstanceUID), missing_sop, str(burned.PatientName)):
        assert original.encode() not in every_file, "the report names no original value"
    assert json.loads((out / "manifest.json").read_text())["excluded"] == 2


@pytest.mark.slow
def test_export_leaves_no_identifier_in_any_file(prefect_harness, make_settings, sample_pacs, tmp_path):
    settings = make_settings(pacs={"port": sample_pacs.port, "called_ae": sample_pacs.ae_title})
    upgrade(settings.database_url)
    run_nightly(settings)
    engine = make_engine(settings.database_url)
    out = tmp_path / "deid"
    with Runtime.build(settings) as rt:
        from sqlmodel import Session

        with Session(engine) as session:
            result = run_cohort(session=session, where="", known_questions=[q.id for q in rt.bank.questions])
        manifest = export_deidentified(rt, result=result, out_dir=out)
        with pytest.raises(ConfigurationError, match="not empty"):
            export_deidentified(rt, result=result, out_dir=out)
        assert manifest["studies"] == 5
        assert manifest["dicom_files"] == 12, "the instances of the 12 annotated images (not the CT windows again)"
        assert manifest["excluded"] == 0
        secret_values = set()
        for study in sample_pacs.archive.studies:
            for ds in study.instances:
                for kw in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"):
                    if ds.get(kw):
                        secret_values.add(str(ds.get(kw)))
                secret_values |= {str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)}
        files = [f for f in out.rglob("*") if f.is_file()]
        assert any(f.suffix == ".dcm" for f in files)
        assert any(f.name == "cohort.csv" for f in files)
        for f in files:
            data = f.read_bytes()
            leaked = [v for v in secret_values if v.encode() in data]
            assert not leaked, f"{f.name} holds {leaked[:3]}"
        for f in (x for x in files if x.suffix == ".dcm"):
            ds = dcmread(f)
            assert ds.PatientIdentityRemoved == "YES"
            assert f.parent.name == ds.StudyInstanceUID
        # the table's pseudonyms are the files' pseudonyms, and the map leads back (with the key)
        header, *rows = (out / "cohort.csv").read_text().splitlines()
        study_col = header.split(",").index("study")
        assert {r.split(",")[study_col] for r in rows} == {f.name for f in (out / "dicom").iterdir()}
        # the same export from the CLI, for a smaller cohort
        cli = subprocess.run(
            [
                str(Path(sys.executable).parent / "nightread"),
                "cohort",
                "--where",
                "modality = CT",
                "--deid-out",
                str(tmp_path / "deid-ct"),
            ],
            env={
                **os.environ,
                "NIGHTREAD_DATA_DIR": str(settings.data_dir),
                "NIGHTREAD_PACS__PORT": str(sample_pacs.port),
                "NIGHTREAD_PACS__CALLED_AE": sample_pacs.ae_title,
            },
            capture_output=True,
            text=True,
            check=False,
        )
        assert cli.returncode == 0, cli.stderr
        assert "de-identified: 1 studies, 3 DICOM files" in cli.stdout
        assert {f.name for f in (tmp_path / "deid-ct" / "dicom").iterdir()} <= {
            f.name for f in (out / "dicom").iterdir()
        }
        one = dcmread(next((out / "dicom").rglob("*.dcm")))
        patient_ids = {str(st.instances[0].PatientID) for st in sample_pacs.archive.studies}
        back = reidentify(rt, str(one.PatientID))
        assert len(back) == 1
        assert back[0][0] == "patient"
        assert back[0][1] in patient_ids
    engine.dispose()
