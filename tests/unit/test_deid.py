"""De-identification (PS3.15 Annex E basic profile, modified dates, remapped UIDs) and the export:
no PatientName, PatientID, BirthDate, AccessionNumber or original UID survives in any exported file."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from db.cohort import run_cohort
from db.migrate import upgrade
from db.session import make_engine
from flows.deid_export import export_deidentified, reidentify
from flows.nightly import run_nightly
from flows.wiring.runtime import Runtime
from integrations.deid import Pseudonymizer, deidentify
from integrations.errors import ConfigurationError


def patient_dataset(patient_id: str = "PID-12345", study_date: str = "20240110") -> Dataset:
    ds = Dataset()
    ds.file_meta = Dataset()
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
    p = Pseudonymizer(key=b"k" * 32)
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
    for keyword in ("InstitutionName", "OperatorsName", "StudyDescription"):
        assert keyword not in ds
    assert ds.ReferringPhysicianName == ""
    assert 0x00091010 not in ds, "private tags removed"
    assert 0x60003000 not in ds, "overlays removed"
    assert "VerifyingObserverName" not in ds.ReferencedImageSequence[0], "person names in sequences removed"
    assert ds.SOPClassUID == CTImageStorage, "DICOM-defined UIDs are kept"
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID == p.uid(originals["sop"])
    assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == p.uid(originals["ref"])
    assert str(ds.StudyInstanceUID).startswith("2.25.")
    shift = p.date_offset("PID-12345")
    assert 1 <= shift <= 3650
    assert ds.StudyDate == f"{dt.date(2024, 1, 10) - dt.timedelta(days=shift):%Y%m%d}"
    assert ds.AcquisitionDateTime == ds.StudyDate + "101500"
    assert ds.PatientIdentityRemoved == "YES"
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100", "113107"]
    # the same key: the same pseudonyms and the same patient offset in another file of the patient
    other = deidentify(patient_dataset(study_date="20240301"), Pseudonymizer(key=b"k" * 32))
    assert other.PatientID == ds.PatientID
    interval = dt.datetime.strptime(other.StudyDate, "%Y%m%d") - dt.datetime.strptime(ds.StudyDate, "%Y%m%d")
    assert interval.days == (dt.date(2024, 3, 1) - dt.date(2024, 1, 10)).days, "intervals kept"
    assert deidentify(patient_dataset(), Pseudonymizer(key=b"x" * 32)).PatientID != ds.PatientID
    assert p.decrypt(p.encrypt("PID-12345")) == "PID-12345"


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
