"""What a PACS answers to a query, as ports' value objects: shared by the DIMSE and DICOMweb sources."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Sequence

from pydicom.dataset import Dataset

from integrations.imaging import values_of
from integrations.ports import SeriesRef, StudyRef


def uid_hash(uid: str) -> str:
    """A short stable handle for a UID, for logs, file names and failure records."""
    return hashlib.sha256(uid.encode()).hexdigest()[:16]


def text_of(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value)


def int_of(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def study_ref(ds: Dataset) -> StudyRef:
    return StudyRef(
        study_instance_uid=text_of(ds, "StudyInstanceUID"),
        study_date=text_of(ds, "StudyDate"),
        study_time=text_of(ds, "StudyTime"),
        accession_number=text_of(ds, "AccessionNumber"),
        modalities=tuple(str(m) for m in values_of(ds.get("ModalitiesInStudy"))),
        description=text_of(ds, "StudyDescription"),
        number_of_instances=int_of(ds, "NumberOfStudyRelatedInstances"),
    )


def series_ref(ds: Dataset) -> SeriesRef:
    return SeriesRef(
        series_instance_uid=text_of(ds, "SeriesInstanceUID"),
        modality=text_of(ds, "Modality"),
        series_number=int_of(ds, "SeriesNumber"),
        description=text_of(ds, "SeriesDescription"),
        body_part=text_of(ds, "BodyPartExamined"),
        number_of_instances=int_of(ds, "NumberOfSeriesRelatedInstances"),
    )


def studies_since(
    refs: Iterable[StudyRef], *, since: dt.datetime | None, modalities: Sequence[str] = ()
) -> list[StudyRef]:
    """Keep the studies at or after `since` (date and time) with one of `modalities` (all when empty),
    sorted by date and time. A PACS matches StudyDate only by day, and one modality at a time."""
    floor = (f"{since:%Y%m%d}", f"{since:%H%M%S}") if since else ("", "")
    wanted = {m.upper() for m in modalities}
    kept = [
        r for r in refs if r.study_instance_uid and r.sort_key >= floor and (not wanted or wanted & set(r.modalities))
    ]
    return sorted(kept, key=lambda r: r.sort_key)
