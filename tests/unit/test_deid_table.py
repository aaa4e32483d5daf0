"""Every attribute of PS3.15 Table E.1-1 (2026c, as dicom-anonymizer ships it) against its action code.

Each row of the table becomes one dataset holding that attribute with a value valid for its VR (from
pydicom's dictionary), is de-identified, and the outcome is checked against the code, the documented
rule for combined codes and the options (Modified Dates, Clean Descriptors). 652 rows name one tag, 25
of them not in pydicom 3.0's dictionary (added in editions after it: added with VR UN, all X); 3 rows
are repeating groups (curve data 50xx,xxxx; overlay data 60xx,3000 and comments 60xx,4000), each
checked on several groups. No row is skipped."""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

import pytest
from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as table
from pydicom import Dataset
from pydicom.datadict import dictionary_has_tag, dictionary_VR, repeater_has_tag
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage

from integrations.deid import CLEAN_DESCRIPTORS, Pseudonymizer, deidentify, dummy_value, patient_key

LISTS = {
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
# the documented rule (integrations/deid.py): the member of a combined code valid in every IOD
RULE = {"X": "X", "Z": "Z", "D": "D", "U": "U", "X/Z": "Z", "X/D": "D", "Z/D": "D", "X/Z/D": "D", "X/Z/U*": "U"}
NOT_RETAINED_DATES = {0x00100030, 0x00100032, 0x00160077}  # birth date, birth time, GPS time stamp
PSEUDONYM_KIND = {0x00100020: "patient", 0x00080050: "accessionnumber", 0x00200010: "studyid"}
KEY = b"t" * 32
TEXT = "DOE^JANE 1234567 St Elsewhere"  # identifying free text, not a clean descriptor

SAMPLE: dict[str, Any] = {
    "AE": "JANESPACS",
    "AS": "045Y",
    "CS": "JANE_DOE",
    "DA": "20240110",
    "DS": "1.5",
    "DT": "20240110101500.000000+0100",
    "FL": 1.5,
    "FD": 1.5,
    "IS": "7",
    "LO": TEXT,
    "LT": TEXT,
    "PN": "DOE^JANE",
    "SH": "ID1234567",
    "SL": 7,
    "SS": 7,
    "ST": TEXT,
    "TM": "101500",
    "UC": TEXT,
    "UI": "1.2.3.4.5.6789",
    "UL": 7,
    "UR": "http://example.org/jane-doe",
    "US": 7,
    "UT": TEXT,
    "SV": 7,
    "UV": 7,
    "AT": 0x00100010,
    **dict.fromkeys(("OB", "OD", "OF", "OL", "OV", "OW", "UN"), b"JANE-DOE"),
}


def rows() -> list[tuple[int, str, str]]:
    """(tag, code, how it is known) for every row of the table; repeating groups on several groups."""
    out = []
    for name, code in LISTS.items():
        for row in getattr(table, name):
            if len(row) == 2:
                tag = (row[0] << 16) | row[1]
                out.append((tag, code, "dictionary" if dictionary_has_tag(tag) else "not in pydicom"))
            else:
                group, element, _, element_mask = row
                elements = (0x0005, 0x3000) if element_mask == 0 else (element,)  # curves: every element
                for g in (group, group + 0x02, group + 0x1E):
                    out.extend(((g << 16) | e, code, "repeating group") for e in elements)
    return out


ROWS = rows()


def vr_of(tag: int) -> str:
    if dictionary_has_tag(tag) or repeater_has_tag(tag):
        return dictionary_VR(tag).split(" or ")[0]
    return "UN"


def sample_sequence() -> DicomSequence:
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = "1.2.3.4.5.999"
    item.PersonName = "DOE^JANE"  # D inside the item
    return DicomSequence([item])


def build(tag: int, vr: str, value: Any) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.PatientID = "PID-TABLE"
    if tag >> 16 == 0x0002:
        ds.file_meta.add_new(tag, vr, value)
    else:
        ds.add_new(tag, vr, sample_sequence() if vr == "SQ" else value)
    return ds


def shifted(value: str, days: int) -> str:
    day = dt.datetime.strptime(value[:8], "%Y%m%d").date() - dt.timedelta(days=days)
    return f"{day:%Y%m%d}{value[8:]}"


def test_the_table_is_complete_and_counted():
    kinds = [kind for _, _, kind in ROWS]
    assert kinds.count("dictionary") + kinds.count("not in pydicom") == 652
    assert kinds.count("not in pydicom") == 25
    assert sum(len(r) == 4 for name in LISTS for r in getattr(table, name)) == 3
    assert all(code == "X" for _, code, kind in ROWS if kind == "not in pydicom")
    assert len({tag for tag, _, _ in ROWS}) == len(ROWS), "no attribute has two codes"


def test_every_clean_descriptor_is_in_the_table():
    table_tags = {tag for tag, _, _ in ROWS}
    assert set(CLEAN_DESCRIPTORS) <= table_tags
    assert len(CLEAN_DESCRIPTORS) == 125


@pytest.mark.parametrize(("tag", "code", "kind"), ROWS, ids=[f"{t >> 16:04X},{t & 0xFFFF:04X} {c}" for t, c, _ in ROWS])
def test_attribute_outcome_matches_its_action_code(tag, code, kind):
    vr = vr_of(tag)
    value = SAMPLE[vr] if vr != "SQ" else None
    ds = build(tag, vr, value)
    original = copy.deepcopy(ds)
    p = Pseudonymizer(key=KEY)
    offset = p.date_offset(patient_key(original))
    out = deidentify(ds, p)
    holder = out.file_meta if tag >> 16 == 0x0002 else out
    elem = holder.get(tag)

    if vr in ("DA", "DT", "TM") and tag not in NOT_RETAINED_DATES:  # Retain Longitudinal, Modified Dates
        assert elem is not None
        assert elem.value == (value if vr == "TM" else shifted(value, offset))
        return
    if tag == 0x00100010:  # PatientName: the patient's pseudonym, the same as PatientID's
        assert elem.value == out.PatientID == p.identifier("patient", patient_key(original))
        return
    if tag in PSEUDONYM_KIND:
        assert elem.value == p.identifier(PSEUDONYM_KIND[tag], str(value)), "a keyed pseudonym as the dummy value"
        return
    action = RULE[code]
    if vr == "SQ" and action == "D":
        action = "Z"  # a sequence's dummy value has no items
    if action == "X":
        assert elem is None, f"{code}: removed"
    elif action == "Z":
        assert elem is not None, f"{code}: kept, emptied"
        assert len(elem.value) == 0 if vr == "SQ" else elem.is_empty
    elif action == "D":
        assert elem is not None
        if vr == "UI":
            assert elem.value == p.uid(value)
        else:
            assert elem.value == dummy_value(vr) != value
    else:  # U
        assert elem is not None
        if vr == "SQ":
            (item,) = elem.value
            assert item.ReferencedSOPInstanceUID == p.uid("1.2.3.4.5.999")
            assert item.ReferencedSOPClassUID == CTImageStorage
            assert item.PersonName == dummy_value("PN")
        else:
            assert elem.value == p.uid(value) != value


CLEAN_TEXT = [t for t in CLEAN_DESCRIPTORS if vr_of(t) in ("LO", "LT", "SH", "ST", "UC", "UT")]


@pytest.mark.parametrize("tag", CLEAN_TEXT, ids=[CLEAN_DESCRIPTORS[t] for t in CLEAN_TEXT])
def test_clean_descriptors_keep_a_safe_value(tag):
    vr = vr_of(tag)
    safe = "CT CHEST W CONTRAST" if vr != "SH" else "CT CHEST"
    out = deidentify(build(tag, vr, safe), Pseudonymizer(key=KEY))
    assert out[tag].value == safe
