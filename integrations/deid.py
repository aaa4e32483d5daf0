"""De-identification per DICOM PS3.15 Annex E, Basic Application Confidentiality Profile, with the
Retain Longitudinal Temporal Information with Modified Dates option.

- Attributes of the profile's table are removed (X), emptied (Z) or replaced by a pseudonym (D);
  every other person name (PN) is removed as well; all private tags are removed; overlays and
  curves (groups 50xx/60xx) are removed.
- UIDs are remapped consistently: every UI value that is not a DICOM-defined UID (1.2.840.10008.*)
  becomes 2.25.<keyed hash>, inside sequences and in the file meta too, so references between files
  and the exported tables still match.
- Dates are shifted per patient by a keyed offset (1-3650 days back); intervals between a patient's
  studies are kept.
- PatientIdentityRemoved, LongitudinalTemporalInformationModified, DeidentificationMethod and its
  code sequence (113100, 113107) are set.

Pseudonyms are keyed HMAC-SHA256 values of the originals: the same key gives the same pseudonyms in
every export (and in the tables); without the key they cannot be reversed. The map back to the
originals is kept encrypted (Fernet, same key) in its own table (`reid_map`)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag

DICOM_UID_ROOT = "1.2.840.10008."
METHOD = "nightread PS3.15 E basic; dates shifted; UIDs remapped"  # LO: at most 64

# PS3.15 Table E.1-1, Basic Application Confidentiality Profile (the attributes found in images; the
# action applied where the table allows a choice). D = replaced by a pseudonym, Z = emptied, X = removed.
ACTIONS: dict[str, str] = {
    "PatientName": "D",
    "PatientID": "D",
    "AccessionNumber": "D",
    "StudyID": "D",
    "PatientBirthDate": "Z",
    "PatientSex": "Z",
    "ReferringPhysicianName": "Z",
    "ContentCreatorName": "Z",
    "PatientBirthTime": "X",
    "PatientBirthName": "X",
    "PatientAge": "X",
    "PatientSize": "X",
    "PatientWeight": "X",
    "PatientAddress": "X",
    "PatientTelephoneNumbers": "X",
    "PatientMotherBirthName": "X",
    "OtherPatientIDs": "X",
    "OtherPatientIDsSequence": "X",
    "OtherPatientNames": "X",
    "IssuerOfPatientID": "X",
    "MilitaryRank": "X",
    "BranchOfService": "X",
    "EthnicGroup": "X",
    "Occupation": "X",
    "AdditionalPatientHistory": "X",
    "PatientComments": "X",
    "MedicalRecordLocator": "X",
    "PatientInsurancePlanCodeSequence": "X",
    "PatientReligiousPreference": "X",
    "CountryOfResidence": "X",
    "RegionOfResidence": "X",
    "MedicalAlerts": "X",
    "Allergies": "X",
    "PregnancyStatus": "X",
    "SmokingStatus": "X",
    "ReferringPhysicianAddress": "X",
    "ReferringPhysicianTelephoneNumbers": "X",
    "ReferringPhysicianIdentificationSequence": "X",
    "PerformingPhysicianName": "X",
    "PerformingPhysicianIdentificationSequence": "X",
    "NameOfPhysiciansReadingStudy": "X",
    "PhysiciansReadingStudyIdentificationSequence": "X",
    "PhysiciansOfRecord": "X",
    "PhysiciansOfRecordIdentificationSequence": "X",
    "RequestingPhysician": "X",
    "ScheduledPerformingPhysicianName": "X",
    "OperatorsName": "X",
    "OperatorIdentificationSequence": "X",
    "InstitutionName": "X",
    "InstitutionAddress": "X",
    "InstitutionalDepartmentName": "X",
    "InstitutionCodeSequence": "X",
    "StationName": "X",
    "DeviceSerialNumber": "X",
    "DeviceUID": "X",
    "PlateID": "X",
    "DetectorID": "X",
    "GantryID": "X",
    "CassetteID": "X",
    "GeneratorID": "X",
    "StudyDescription": "X",
    "SeriesDescription": "X",
    "ImageComments": "X",
    "DerivationDescription": "X",
    "RequestAttributesSequence": "X",
    "RequestedProcedureDescription": "X",
    "RequestedProcedureID": "X",
    "ScheduledProcedureStepDescription": "X",
    "ScheduledProcedureStepID": "X",
    "PerformedProcedureStepDescription": "X",
    "PerformedProcedureStepID": "X",
    "ReferencedPatientSequence": "X",
    "ReferencedStudySequence": "X",
    "AdmissionID": "X",
    "AdmittingDiagnosesDescription": "X",
    "ProtocolName": "X",
    "ResponsibleOrganization": "X",
    "ResponsiblePerson": "X",
    "InterpretationAuthor": "X",
    "TextString": "X",
    "TextComments": "X",
    "StorageMediaFileSetUID": "X",
    "IrradiationEventUID": "U",
    "FrameOfReferenceUID": "U",
    "SynchronizationFrameOfReferenceUID": "U",
    "ContentSequence": "X",  # free text in image objects (SRs are not exported)
    "AcquisitionComments": "X",
    "VisitComments": "X",
    "CurrentPatientLocation": "X",
    "InstanceCreatorUID": "X",
}


@dataclass
class Pseudonymizer:
    """Keyed pseudonyms: UIDs, identifiers and a per-patient date offset, plus the map back."""

    key: bytes
    # (kind, pseudonym) -> original, collected while de-identifying, to be stored encrypted
    seen: dict[tuple[str, str], str] = field(default_factory=dict)

    def _digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self.key, f"{kind}:{value}".encode(), hashlib.sha256).digest()

    def uid(self, value: str) -> str:
        if not value or value.startswith(DICOM_UID_ROOT):
            return value
        new = "2.25." + str(int.from_bytes(self._digest("uid", value)[:16], "big"))
        self.seen[("uid", new)] = value
        return new

    def identifier(self, kind: str, value: str) -> str:
        if not value:
            return value
        new = f"NR{kind[:1].upper()}{self._digest(kind, value).hex()[:13].upper()}"  # 16 characters: fits SH
        self.seen[(kind, new)] = value
        return new

    def date_offset(self, patient_id: str) -> int:
        """Days to shift a patient's dates back by: 1-3650, the same for every file of the patient."""
        return 1 + int.from_bytes(self._digest("dates", patient_id)[:4], "big") % 3650

    # --- the map back, encrypted ----------------------------------------------------------------
    def _fernet(self) -> object:
        from cryptography.fernet import Fernet

        return Fernet(base64.urlsafe_b64encode(hashlib.sha256(b"nightread-reid:" + self.key).digest()))

    def encrypt(self, original: str) -> str:
        return self._fernet().encrypt(original.encode()).decode()  # type: ignore[attr-defined,no-any-return]

    def decrypt(self, token: str) -> str:
        return self._fernet().decrypt(token.encode()).decode()  # type: ignore[attr-defined,no-any-return]


def _shift_date(value: str, days: int) -> str:
    try:
        d = dt.datetime.strptime(value[:8], "%Y%m%d").date()
    except ValueError:
        return ""  # an unparseable date cannot be shifted: emptied
    return f"{d - dt.timedelta(days=days):%Y%m%d}" + value[8:]


def deidentify(ds: Dataset, p: Pseudonymizer) -> Dataset:
    """De-identify one dataset in place (and its file meta); returns it."""
    patient = str(ds.get("PatientID", "") or ds.get("PatientName", "") or "")
    offset = p.date_offset(patient)
    ds.remove_private_tags()
    _walk(ds, p, offset, patient)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
        meta.MediaStorageSOPInstanceUID = p.uid(str(meta.MediaStorageSOPInstanceUID))
    ds.PatientIdentityRemoved = "YES"
    ds.LongitudinalTemporalInformationModified = "MODIFIED"
    ds.DeidentificationMethod = METHOD
    codes = []
    for value, meaning in (
        ("113100", "Basic Application Confidentiality Profile"),
        ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    ):
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        codes.append(item)
    ds.DeidentificationMethodCodeSequence = DicomSequence(codes)
    return ds


def _walk(ds: Dataset, p: Pseudonymizer, offset: int, patient: str) -> None:
    remove: list[BaseTag] = []
    for elem in list(ds):
        tag = elem.tag
        if 0x5000 <= tag.group <= 0x50FF or 0x6000 <= tag.group <= 0x60FF:  # curves and overlays
            remove.append(tag)
            continue
        action = ACTIONS.get(elem.keyword)
        if action == "X":
            remove.append(tag)
            continue
        if action == "Z":
            elem.value = ""
            continue
        if action == "D":
            if elem.value in (None, ""):
                continue
            if elem.keyword in ("PatientName", "PatientID"):  # one pseudonym per patient, in both
                elem.value = p.identifier("patient", patient)
            else:
                elem.value = p.identifier(elem.keyword.lower(), str(elem.value))
            continue
        _scrub(elem, p, offset, patient, remove)
    for tag in remove:
        del ds[tag]


def _scrub(elem: DataElement, p: Pseudonymizer, offset: int, patient: str, remove: list[BaseTag]) -> None:
    vr = elem.VR
    if vr == "SQ":
        for item in elem.value or []:
            _walk(item, p, offset, patient)
    elif vr == "UI":
        elem.value = _map_values(elem.value, p.uid)
    elif vr in ("DA", "DT"):
        elem.value = _map_values(elem.value, lambda v: _shift_date(v, offset) if v else v)
    elif vr == "PN":
        remove.append(elem.tag)  # any other person name


def _map_values(value: Any, fn: Callable[[str], str]) -> Any:
    if value is None or value == "":
        return value
    if isinstance(value, list | tuple | MultiValue):
        return [fn(str(v)) for v in value]
    return fn(str(value))
