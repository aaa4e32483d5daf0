"""The built-in sample PACS: a pynetdicom Query/Retrieve SCP over synthetic studies.

Used by `nightread demo`, `nightread sample-pacs` and the tests. Studies are generated on the fly
from a seed (nothing is read from disk, no real patient data exists here):

- chest CR (MONOCHROME1, PA + lateral), chest DX (AP + lateral) and chest DX (PA + lateral)
  with a plausible body outline: soft tissue, lungs, mediastinum, spine, ribs;
- a chest CT series of 32 slices (512×512, HU via Rescale Slope/Intercept, window tags)
  plus a localizer;
- a brain MR series (T1-like, 20 slices).

Study dates are spread over the last days before `today`. The SCP answers C-ECHO, C-FIND
(study, series and image level, Study Root and Patient Root), C-GET and C-MOVE.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    EnhancedSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from integrations.dimse import quiet_pynetdicom
from integrations.imaging import values_of

log = logging.getLogger(__name__)

_UID_ROOT = "1.2.826.0.1.3680043.10.1071."  # synthetic data only
STORAGE_CLASSES = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    CTImageStorage,
    MRImageStorage,
)


def _uid(*parts: object) -> UID:
    digest = int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:24], 16)
    return UID(f"{_UID_ROOT}{digest}"[:64])


@dataclass
class SampleStudy:
    study_instance_uid: str
    instances: list[Dataset] = field(default_factory=list)

    @property
    def header(self) -> Dataset:
        return self.instances[0]


# --- synthetic pixel data ------------------------------------------------------------------------


def chest_radiograph(rows: int, cols: int, *, lateral: bool, rng: np.random.Generator) -> npt.NDArray[Any]:
    """A 12-bit chest projection in 'attenuation' units: high = dense (bone), low = air."""
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cy, cx = rows * 0.55, cols * 0.5
    img = np.full((rows, cols), 150.0, dtype=np.float32)  # air outside the body
    body = ((xx - cx) / (cols * (0.30 if lateral else 0.44))) ** 2 + ((yy - cy) / (rows * 0.52)) ** 2 < 1
    img[body] = 1900.0
    if lateral:
        lung = ((xx - cx) / (cols * 0.2)) ** 2 + ((yy - rows * 0.48) / (rows * 0.3)) ** 2 < 1
        img[lung] = 700.0
        spine = (np.abs(xx - (cx + cols * 0.2)) < cols * 0.04) & body
        img[spine] = 3200.0
    else:
        for side in (-1, 1):
            lung = ((xx - (cx + side * cols * 0.18)) / (cols * 0.14)) ** 2 + (
                (yy - rows * 0.47) / (rows * 0.3)
            ) ** 2 < 1
            img[lung] = 650.0
        heart = ((xx - (cx + cols * 0.04)) / (cols * 0.12)) ** 2 + ((yy - rows * 0.62) / (rows * 0.12)) ** 2 < 1
        img[heart] = 2100.0
        spine = (np.abs(xx - cx) < cols * 0.035) & body
        img[spine] = 3000.0
        for k in range(8):  # ribs: faint bright arcs over the lungs
            ry = rows * (0.25 + 0.065 * k)
            ribs = (np.abs(yy - ry - 0.0006 * (xx - cx) ** 2 / max(cols, 1) * 8) < rows * 0.008) & body
            img[ribs] += 500.0
    img += rng.normal(0.0, 40.0, img.shape).astype(np.float32)
    return np.clip(img, 0, 4095).astype(np.uint16)


def ct_slice(size: int, z: float, rng: np.random.Generator) -> npt.NDArray[Any]:
    """Stored values of one axial chest CT slice; HU = stored - 1024."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = size / 2
    hu = np.full((size, size), -1000.0, dtype=np.float32)
    body = ((xx - c) / (size * 0.42)) ** 2 + ((yy - c) / (size * 0.32)) ** 2 < 1
    hu[body] = 40.0
    for side in (-1, 1):
        lung = ((xx - (c + side * size * 0.18)) / (size * 0.14)) ** 2 + ((yy - c) / (size * 0.22)) ** 2 < 1
        hu[lung] = -850.0
    spine = ((xx - c) ** 2 + (yy - (c + size * 0.24)) ** 2) < (size * 0.05) ** 2
    hu[spine] = 700.0
    aorta = ((xx - (c + size * 0.05)) ** 2 + (yy - (c + size * 0.1)) ** 2) < (size * (0.03 + 0.002 * z)) ** 2
    hu[aorta] = 45.0
    hu += rng.normal(0.0, 12.0, hu.shape).astype(np.float32)
    return np.clip(hu + 1024.0, 0, 4095).astype(np.uint16)


def mr_slice(size: int, z: float, rng: np.random.Generator) -> npt.NDArray[Any]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = size / 2
    r = 0.38 + 0.04 * np.cos(z)
    img = np.zeros((size, size), dtype=np.float32)
    head = ((xx - c) / (size * r)) ** 2 + ((yy - c) / (size * (r + 0.06))) ** 2
    img[head < 1] = 350.0
    img[head < 0.85] = 800.0
    img[head < 0.3] = 600.0
    img += np.abs(rng.normal(0.0, 15.0, img.shape)).astype(np.float32)
    return np.clip(img, 0, 4095).astype(np.uint16)


# --- datasets ------------------------------------------------------------------------------------


def _base(
    *,
    sop_class: UID,
    modality: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    patient: int,
    date: dt.date,
    time: str,
    accession: str,
    study_description: str,
    series_number: int,
    series_description: str,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = f"SYNTHETIC^PATIENT{patient:02d}"
    ds.PatientID = f"SYN{patient:06d}"
    ds.PatientBirthDate = f"{1940 + patient * 7 % 50}0101"
    ds.PatientSex = "FM"[patient % 2]
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
    ds.AccessionNumber = accession
    ds.StudyID = accession[-6:]
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    ds.Modality = modality
    ds.Manufacturer = "nightread synthetic"
    ds.SeriesNumber = series_number
    ds.ReferringPhysicianName = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    return ds


def _set_pixels(ds: Dataset, pixels: npt.NDArray[Any]) -> None:
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.PixelData = pixels.astype("<u2").tobytes()


def _axial_series(
    *,
    base: dict[str, Any],
    image_type: list[str],
    body_part: str,
    count: int,
    thickness: float,
    origin: tuple[float, float, float],
    pixels: Callable[[int], npt.NDArray[Any]],
    extra: dict[str, Any],
) -> list[Dataset]:
    """`count` axial slices, head first supine, `thickness` mm apart from `origin`."""
    out = []
    for i in range(count):
        ds = _base(**base, sop_uid=_uid(base["series_uid"], "sop", i))
        ds.ImageType = image_type
        ds.BodyPartExamined = body_part
        ds.InstanceNumber = i + 1
        ds.SliceThickness = thickness
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + thickness * i]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        for keyword, value in extra.items():
            setattr(ds, keyword, value)
        ds.PatientPosition = "HFS"
        _set_pixels(ds, pixels(i))
        out.append(ds)
    return out


def generate_studies(
    *,
    seed: int = 7,
    today: dt.date | None = None,
    include_corrupt: bool = False,
    xr_size: int = 1024,
    ct_slices: int = 32,
    ct_size: int = 512,
) -> list[SampleStudy]:
    """Synthetic studies, deterministic for a seed and a day."""
    today = today or dt.date.today()
    rng = np.random.default_rng(seed)
    studies: list[SampleStudy] = []

    def new_study(n: int) -> tuple[str, str, dt.date, str]:
        uid = _uid(seed, today, "study", n)
        return uid, f"SYNACC{seed:02d}{n:04d}", today - dt.timedelta(days=4 - n % 5), f"{8 + n:02d}{15 * (n % 4):02d}00"

    xr_specs = [
        ("CR", ComputedRadiographyImageStorage, "MONOCHROME1", [("PA", False), ("LL", True)]),
        ("DX", DigitalXRayImageStorageForPresentation, "MONOCHROME2", [("AP", False), ("LL", True)]),
        ("DX", DigitalXRayImageStorageForPresentation, "MONOCHROME2", [("PA", False), ("LL", True)]),
    ]
    for n, (modality, sop_class, photometric, views) in enumerate(xr_specs):
        study_uid, acc, date, time = new_study(n)
        study = SampleStudy(study_uid)
        for k, (view, lateral) in enumerate(views):
            series_uid = _uid(study_uid, "series", k)
            ds = _base(
                sop_class=sop_class,
                modality=modality,
                study_uid=study_uid,
                series_uid=series_uid,
                sop_uid=_uid(series_uid, "sop", 0),
                patient=n + 1,
                date=date,
                time=time,
                accession=acc,
                study_description="XR CHEST 2 VIEWS",
                series_number=k + 1,
                series_description=f"CHEST {'LAT' if lateral else view}",
            )
            ds.BodyPartExamined = "CHEST"
            ds.ViewPosition = view
            ds.PatientOrientation = ["P", "F"] if lateral else ["L", "F"]
            ds.ImageType = ["ORIGINAL", "PRIMARY"]
            ds.InstanceNumber = 1
            ds.ImagerPixelSpacing = [0.15, 0.15]
            if modality == "DX":
                ds.PresentationIntentType = "FOR PRESENTATION"
            pixels = chest_radiograph(xr_size, int(xr_size * 0.85), lateral=lateral, rng=rng)
            if photometric == "MONOCHROME1":
                pixels = (4095 - pixels).astype(np.uint16)  # stored inverted: low value = bright
            ds.PhotometricInterpretation = photometric
            ds.WindowCenter, ds.WindowWidth = 2048, 4096
            _set_pixels(ds, pixels)
            study.instances.append(ds)
        if include_corrupt and n == 1:
            # an image whose Pixel Data is truncated (far fewer bytes than 512×512×2), and one with none
            for number, (label, pixel_data) in enumerate((("truncated", b"\x00\x01" * 1000), ("no-pixels", None)), 1):
                bad = _base(
                    sop_class=sop_class,
                    modality=modality,
                    study_uid=study_uid,
                    series_uid=_uid(study_uid, "bad"),
                    sop_uid=_uid(study_uid, "bad", label),
                    patient=n + 1,
                    date=date,
                    time=time,
                    accession=acc,
                    study_description="XR CHEST 2 VIEWS",
                    series_number=9,
                    series_description="CHEST PA",
                )
                bad.BodyPartExamined, bad.ViewPosition, bad.InstanceNumber = "CHEST", "PA", number
                bad.Rows, bad.Columns = 512, 512
                if pixel_data is not None:
                    bad.PixelData = pixel_data
                study.instances.append(bad)
        studies.append(study)

    # CT chest: localizer + axial series
    study_uid, acc, date, time = new_study(3)
    study = SampleStudy(study_uid)
    scout_uid = _uid(study_uid, "series", "scout")
    scout = _base(
        sop_class=CTImageStorage,
        modality="CT",
        study_uid=study_uid,
        series_uid=scout_uid,
        sop_uid=_uid(scout_uid, "sop", 0),
        patient=4,
        date=date,
        time=time,
        accession=acc,
        study_description="CT CHEST WITHOUT CONTRAST",
        series_number=1,
        series_description="SCOUT",
    )
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.BodyPartExamined, scout.InstanceNumber = "CHEST", 1
    scout.RescaleIntercept, scout.RescaleSlope, scout.RescaleType = -1024, 1, "HU"
    scout.WindowCenter, scout.WindowWidth = 40, 400
    _set_pixels(scout, chest_radiograph(256, 256, lateral=False, rng=rng))
    study.instances.append(scout)
    axial_uid = _uid(study_uid, "series", "axial")
    study.instances += _axial_series(
        base={
            "sop_class": CTImageStorage,
            "modality": "CT",
            "study_uid": study_uid,
            "series_uid": axial_uid,
            "patient": 4,
            "date": date,
            "time": time,
            "accession": acc,
            "study_description": "CT CHEST WITHOUT CONTRAST",
            "series_number": 2,
            "series_description": "AXIAL 2.5MM",
        },
        image_type=["ORIGINAL", "PRIMARY", "AXIAL"],
        body_part="CHEST",
        count=ct_slices,
        thickness=2.5,
        origin=(-180.0, -180.0, -100.0),
        pixels=lambda i: ct_slice(ct_size, float(i), rng),
        extra={
            "PixelSpacing": [0.7, 0.7],
            "RescaleIntercept": -1024,
            "RescaleSlope": 1,
            "RescaleType": "HU",
            "WindowCenter": [40, -600],
            "WindowWidth": [400, 1500],
            "WindowCenterWidthExplanation": ["MEDIASTINUM", "LUNG"],
        },
    )
    studies.append(study)

    # MR brain
    study_uid, acc, date, time = new_study(4)
    study = SampleStudy(study_uid)
    mr_uid = _uid(study_uid, "series", "t1")
    study.instances += _axial_series(
        base={
            "sop_class": MRImageStorage,
            "modality": "MR",
            "study_uid": study_uid,
            "series_uid": mr_uid,
            "patient": 5,
            "date": date,
            "time": time,
            "accession": acc,
            "study_description": "MR BRAIN WITHOUT CONTRAST",
            "series_number": 3,
            "series_description": "AX T1",
        },
        image_type=["ORIGINAL", "PRIMARY", "M"],
        body_part="BRAIN",
        count=20,
        thickness=5.0,
        origin=(-120.0, -120.0, -50.0),
        pixels=lambda i: mr_slice(256, i / 3.0, rng),
        extra={},
    )
    studies.append(study)
    return studies


# --- query matching -------------------------------------------------------------------------------


def _match_range(value: str, query: str) -> bool:
    if "-" not in query:
        return value == query
    lo, _, hi = query.partition("-")
    return (not lo or value >= lo) and (not hi or value <= hi)


def _wildcard(query: str) -> re.Pattern[str]:
    """DICOM wild card matching (PS3.4 C.2.2.2.4): `*` any run of characters, `?` one; nothing else
    is special (fnmatch would also read `[`)."""
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in query), re.DOTALL)


def _match_value(keyword: str, value: Any, query: Any) -> bool:
    if query in (None, "", []):
        return True  # universal match
    if keyword in ("StudyDate", "SeriesDate", "StudyTime", "SeriesTime"):
        return _match_range(str(value), str(query))
    if keyword == "ModalitiesInStudy":
        return bool({str(v) for v in values_of(value)} & {str(q) for q in values_of(query)})
    if len(values_of(query)) == 1 and ("*" in str(query) or "?" in str(query)):  # PN values are PersonName
        return _wildcard(str(query)).fullmatch(str(value)) is not None
    if len(values_of(query)) > 1:
        return str(value) in [str(q) for q in values_of(query)]
    return str(value) == str(query)


_LEVEL_KEYS = {
    "PATIENT": ("PatientID",),
    "STUDY": ("StudyInstanceUID",),
    "SERIES": ("StudyInstanceUID", "SeriesInstanceUID"),
    "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"),
}


class SampleArchive:
    """The studies the sample PACS serves, and the query logic over them."""

    def __init__(self, studies: Sequence[SampleStudy]) -> None:
        self.studies = list(studies)

    def all_instances(self) -> Iterator[Dataset]:
        for study in self.studies:
            yield from study.instances

    def _study_attrs(self, study: SampleStudy) -> dict[str, Any]:
        head = study.header
        modalities = sorted({ds.Modality for ds in study.instances})
        return {
            "ModalitiesInStudy": modalities,
            "NumberOfStudyRelatedInstances": len(study.instances),
            "NumberOfStudyRelatedSeries": len({ds.SeriesInstanceUID for ds in study.instances}),
            **{
                k: head.get(k)
                for k in (
                    "StudyInstanceUID",
                    "StudyDate",
                    "StudyTime",
                    "AccessionNumber",
                    "StudyID",
                    "StudyDescription",
                    "PatientName",
                    "PatientID",
                    "PatientBirthDate",
                    "PatientSex",
                    "ReferringPhysicianName",
                )
            },
        }

    def find(self, identifier: Dataset) -> Iterator[Dataset]:
        level = str(identifier.get("QueryRetrieveLevel", "STUDY")).upper()
        if level not in _LEVEL_KEYS:
            raise ValueError(f"unsupported QueryRetrieveLevel {level!r}")
        wanted = [elem.keyword for elem in identifier if elem.keyword and elem.keyword != "QueryRetrieveLevel"]
        for study in self.studies:
            sattrs = self._study_attrs(study)
            rows: list[dict[str, Any]]
            if level in ("STUDY", "PATIENT"):
                rows = [sattrs]
            elif level == "SERIES":
                seen: dict[str, dict[str, Any]] = {}
                for ds in study.instances:
                    row = seen.setdefault(
                        ds.SeriesInstanceUID,
                        {
                            **sattrs,
                            "SeriesInstanceUID": ds.SeriesInstanceUID,
                            "Modality": ds.Modality,
                            "SeriesNumber": ds.get("SeriesNumber"),
                            "SeriesDescription": ds.get("SeriesDescription"),
                            "BodyPartExamined": ds.get("BodyPartExamined", ""),
                            "NumberOfSeriesRelatedInstances": 0,
                        },
                    )
                    row["NumberOfSeriesRelatedInstances"] += 1
                rows = list(seen.values())
            else:
                rows = [
                    {**sattrs, **{e.keyword: e.value for e in ds if e.keyword and e.keyword != "PixelData"}}
                    for ds in study.instances
                ]
            for row in rows:
                if all(_match_value(k, row.get(k, ""), identifier.get(k)) for k in wanted):
                    out = Dataset()
                    out.QueryRetrieveLevel = level
                    for k in wanted:
                        setattr(out, k, row.get(k, ""))
                    yield out

    def instances_for(self, identifier: Dataset) -> list[Dataset]:
        level = str(identifier.get("QueryRetrieveLevel", "STUDY")).upper()
        keys = _LEVEL_KEYS.get(level, ())
        out = []
        for ds in self.all_instances():
            ok = True
            for k in keys:
                q = identifier.get(k)
                if q in (None, ""):
                    continue
                values = [str(v) for v in values_of(q)]
                if str(ds.get(k, "")) not in values:
                    ok = False
                    break
            if ok:
                out.append(ds)
        return out


class SamplePacs:
    """The SCP. `with SamplePacs(...) as pacs:` serves on 127.0.0.1:`pacs.port` until the block ends."""

    FIND = (StudyRootQueryRetrieveInformationModelFind, PatientRootQueryRetrieveInformationModelFind)
    GET = (StudyRootQueryRetrieveInformationModelGet, PatientRootQueryRetrieveInformationModelGet)
    MOVE = (StudyRootQueryRetrieveInformationModelMove, PatientRootQueryRetrieveInformationModelMove)

    def __init__(
        self,
        *,
        studies: Sequence[SampleStudy] | None = None,
        ae_title: str = "SAMPLEPACS",
        host: str = "127.0.0.1",
        port: int = 0,
        move_destinations: dict[str, tuple[str, int]] | None = None,
        seed: int = 7,
        include_corrupt: bool = False,
        max_find_results: int | None = None,
        signal_cap: bool = False,
        ssl_context: Any = None,
        move_tls: Any = None,
    ) -> None:
        """`ssl_context` (an ssl.SSLContext, server side) makes every association DICOM TLS; `move_tls`
        (client side) is used for the C-MOVE sub-associations it opens to a destination."""
        self.ssl_context, self.move_tls = ssl_context, move_tls
        # like a PACS's C-FIND result cap: at most this many answers, then either a plain success (a
        # silent cap) or, with `signal_cap`, status 0xFE00 as Orthanc's LimitFindResults answers
        self.max_find_results = max_find_results
        self.signal_cap = signal_cap
        self.finds = 0
        self.archive = SampleArchive(
            studies if studies is not None else generate_studies(seed=seed, include_corrupt=include_corrupt)
        )
        self.ae_title = ae_title
        self.host = host
        self._requested_port = port
        self.move_destinations = dict(move_destinations or {})
        self._server: Any = None
        self._lock = threading.Lock()
        self.associations = 0
        self.open_now = 0  # connections open at this moment, and the most there ever were at once
        self.peak_open = 0
        # objects sent to it (nightread's SRs), kept apart from the archive it answers queries from
        self.stored: dict[str, Dataset] = {}

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the sample PACS is not running")
        return int(self._server.server_address[1])

    def _ae(self) -> AE:
        quiet_pynetdicom()
        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = 0  # unlimited: faster transfers of large images
        ae.maximum_associations = 64
        ae.add_supported_context(Verification)
        for ctx in (*self.FIND, *self.GET, *self.MOVE):
            ae.add_supported_context(ctx)
        for sop_class in STORAGE_CLASSES:  # for C-GET sub-operations: we act as SCU of storage
            ae.add_supported_context(
                sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian], scu_role=True, scp_role=True
            )
        for sop_class in STORAGE_CLASSES:
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        for sop_class in (ComprehensiveSRStorage, Comprehensive3DSRStorage, EnhancedSRStorage):  # write-back
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        return ae

    def __enter__(self) -> SamplePacs:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        handlers = [
            (evt.EVT_C_ECHO, lambda event: 0x0000),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_GET, self._on_get),
            (evt.EVT_C_MOVE, self._on_move),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_OPEN, self._on_open),
            (evt.EVT_CONN_CLOSE, self._on_close),
        ]
        self._server = self._ae().start_server(
            (self.host, self._requested_port), block=False, evt_handlers=handlers, ssl_context=self.ssl_context
        )
        log.info("sample PACS %s listening on %s:%d", self.ae_title, self.host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_close(self, event: Any) -> None:
        with self._lock:
            self.open_now -= 1

    def _on_open(self, event: Any) -> None:
        with self._lock:
            self.associations += 1
            self.open_now += 1
            self.peak_open = max(self.peak_open, self.open_now)

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.stored[str(ds.SOPInstanceUID)] = ds
        return 0x0000

    def _on_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        try:
            matches = list(self.archive.find(event.identifier))
        except ValueError:
            yield 0xA900, None  # identifier does not match SOP class
            return
        with self._lock:
            self.finds += 1
        capped = self.max_find_results is not None and len(matches) > self.max_find_results
        if self.max_find_results is not None:
            matches = matches[: self.max_find_results]
        for ds in matches:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield 0xFF00, ds
        if capped and self.signal_cap:
            yield 0xFE00, None

    def _on_get(self, event: Any) -> Iterator[Any]:
        instances = self.archive.instances_for(event.identifier)
        yield len(instances)
        for ds in instances:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield 0xFF00, ds

    def _on_move(self, event: Any) -> Iterator[Any]:
        dest = self.move_destinations.get(str(event.move_destination).strip())
        if dest is None:
            yield None, None  # unknown destination -> 0xA801
            return
        instances = self.archive.instances_for(event.identifier)
        if self.move_tls is not None:
            yield dest[0], dest[1], {"tls_args": (self.move_tls, dest[0])}
        else:
            yield dest[0], dest[1]
        yield len(instances)
        for ds in instances:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield 0xFF00, ds
