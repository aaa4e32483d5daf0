"""DICOM pixels → 8-bit RGB PNG, in a fixed, versioned order.

    decode (pydicom + pylibjpeg/gdcm where installed)
      → frame
      → modality LUT (Rescale Slope/Intercept or Modality LUT Sequence)
      → VOI (VOI LUT Sequence, or Window Center/Width with the first value and its VOI LUT
             Function LINEAR / LINEAR_EXACT / SIGMOID; without one: data of at most 8 bits stored
             as stored (the full stored range), a per-modality default, else the 0.5-99.5
             percentile range; a degenerate range (a nearly uniform frame) puts the frame's level
             at mid-grey in a window as wide as the stored range: never a black image)
      → MONOCHROME1 inversion
      → colour (YBR/RGB as decoded, PALETTE COLOR through its LUT)
      → 8-bit RGB, long edge capped, aspect ratio kept → PNG

A multi-frame object rendered without a frame number gives its middle frame (`default_frame`), the one
the selection rules' default ("middle") picks.

`RENDER_PIPELINE_VERSION` changes whenever the output of this module may change; the full
`render_version` also names the long-edge cap, and is recorded with every image (r2: 8-bit data without
a window as stored, degenerate auto-ranges never black, the middle frame by default).
"""

from __future__ import annotations

import copy
import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image as PILImage
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.uid import UID

from integrations.errors import DecodeError

RENDER_PIPELINE_VERSION = "r2"

# (center, width) used when an image carries no window of its own
DEFAULT_WINDOWS: dict[str, tuple[float, float]] = {
    "CT": (40.0, 400.0),  # soft tissue / mediastinum
}

IMAGE_SOP_CLASS_HINT = "Image Storage"


def window_key(ct_windows: Sequence[tuple[float, float]]) -> str:
    """A CT window setting as a short stable text usable in object keys ("" = the file's own window):
    center x width per window, "_" between windows, e.g. "-600x1500_40x400_400x1800"."""
    return "_".join(f"{c:g}x{w:g}" for c, w in ct_windows)


def render_version(max_long_edge: int, ct_windows: Sequence[tuple[float, float]] = ()) -> str:
    windows = "-w" + window_key(ct_windows) if ct_windows else ""
    return f"{RENDER_PIPELINE_VERSION}-{max_long_edge}{windows}"


@dataclass(frozen=True)
class InstanceInfo:
    """The header facts selection and prompts need (read without pixel data, no identifiers)."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    modality: str = ""
    body_part: str = ""
    view_position: str = ""
    patient_position: str = ""
    image_type: tuple[str, ...] = ()
    series_description: str = ""
    series_number: int | None = None
    instance_number: int | None = None
    slice_position: float | None = None
    slice_thickness: float | None = None
    orientation: str = ""  # AXIAL | CORONAL | SAGITTAL | OBLIQUE from ImageOrientationPatient, "" if absent
    number_of_frames: int = 1
    has_pixels: bool = False
    rows: int = 0
    columns: int = 0

    @property
    def sop_class_name(self) -> str:
        return UID(self.sop_class_uid).name if self.sop_class_uid else "unknown SOP class"

    @property
    def is_image_sop_class(self) -> bool:
        """An image storage SOP class (a private/unknown class counts when it has rows and columns)."""
        name = self.sop_class_name
        if name != self.sop_class_uid and name != "unknown SOP class":
            return "Image Storage" in name
        return self.rows > 0 and self.columns > 0


@dataclass
class RenderedImage:
    png: bytes
    width: int
    height: int
    frame: int
    render_version: str
    steps: list[str] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.png).hexdigest()


def _str(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _slice_position(ds: Dataset) -> float | None:
    pos, ori = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    try:
        if pos is not None and ori is not None and len(ori) == 6:
            normal = np.cross(np.asarray(ori[:3], float), np.asarray(ori[3:], float))
            return float(np.dot(normal, np.asarray(pos, float)))
        if pos is not None:
            return float(pos[2])
    except (TypeError, ValueError, IndexError):
        return None
    return None


def _orientation(ds: Dataset) -> str:
    """The plane of ImageOrientationPatient: the axis the slice normal points along (within ~20°)."""
    ori = ds.get("ImageOrientationPatient")
    try:
        if ori is None or len(ori) != 6:
            return ""
        normal = np.cross(np.asarray(ori[:3], float), np.asarray(ori[3:], float))
        norm = float(np.linalg.norm(normal))
        if norm == 0.0:
            return ""
        axis = int(np.argmax(np.abs(normal)))
        if abs(normal[axis]) / norm < 0.94:
            return "OBLIQUE"
        return ("SAGITTAL", "CORONAL", "AXIAL")[axis]
    except (TypeError, ValueError):
        return ""


def _float_or_none(ds: Dataset, keyword: str) -> float | None:
    try:
        value = ds.get(keyword)
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def read_instance_info(path: Path) -> InstanceInfo:
    """Header only; raises DecodeError for a file that is not DICOM."""
    try:
        ds = dcmread(path, force=True, defer_size="4 KB")  # large values (pixels) are not read
        sop_class = _str(ds, "SOPClassUID") or _str(getattr(ds, "file_meta", Dataset()), "MediaStorageSOPClassUID")
        if not sop_class and "StudyInstanceUID" not in ds:
            raise InvalidDicomError("no SOP Class UID and no Study Instance UID")
        has_pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
        image_type = ds.get("ImageType", [])
        image_type_t = tuple(str(v).upper() for v in image_type) if image_type else ()

        def as_int(keyword: str) -> int | None:
            try:
                value = ds.get(keyword)
                return int(value) if value not in (None, "") else None
            except (TypeError, ValueError):
                return None

        return InstanceInfo(
            path=path,
            sop_class_uid=sop_class,
            sop_instance_uid=_str(ds, "SOPInstanceUID"),
            series_instance_uid=_str(ds, "SeriesInstanceUID"),
            study_instance_uid=_str(ds, "StudyInstanceUID"),
            modality=_str(ds, "Modality").upper(),
            body_part=_str(ds, "BodyPartExamined").upper(),
            view_position=_str(ds, "ViewPosition").upper(),
            patient_position=_str(ds, "PatientPosition").upper(),
            image_type=image_type_t,
            series_description=_str(ds, "SeriesDescription"),
            series_number=as_int("SeriesNumber"),
            instance_number=as_int("InstanceNumber"),
            slice_position=_slice_position(ds),
            slice_thickness=_float_or_none(ds, "SliceThickness"),
            orientation=_orientation(ds),
            number_of_frames=as_int("NumberOfFrames") or 1,
            has_pixels=has_pixels,
            rows=as_int("Rows") or 0,
            columns=as_int("Columns") or 0,
        )
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(f"header could not be read ({type(exc).__name__})") from exc


def values_of(value: Any) -> list[Any]:
    """A DICOM element value as a list, whatever its multiplicity (MultiValue, list, scalar, empty)."""
    if value is None or value == "":
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return [value]
    return list(value)


def _first(value: Any) -> float:
    return float(values_of(value)[0])


def _window(arr: npt.NDArray[Any], center: float, width: float, function: str) -> npt.NDArray[Any]:
    """DICOM PS3.3 C.11.2.1.2: map to [0, 1]."""
    function = function.upper() or "LINEAR"
    if function == "SIGMOID":
        out: npt.NDArray[Any] = 1.0 / (1.0 + np.exp(-4.0 * (arr - center) / max(width, 1e-6)))
        return out
    if function == "LINEAR_EXACT":
        width = max(width, 1e-6)
        return np.clip((arr - (center - width / 2)) / width, 0.0, 1.0)
    width = max(width, 1.0)
    return np.clip(((arr - (center - 0.5)) / (width - 1)) + 0.5, 0.0, 1.0)


def _auto_range(arr: npt.NDArray[Any], *, step: float, full_width: float, steps: list[str]) -> npt.NDArray[Any]:
    """The 0.5-99.5 percentile range to [0, 1]. When it is degenerate (at least 99% of the pixels within
    one `step`, a nearly uniform frame), the frame's level goes to mid-grey in a window `full_width` wide
    (the stored range), so a flat frame is never black and its few outliers still show."""
    lo, hi = (float(v) for v in np.percentile(arr, (0.5, 99.5))) if arr.size else (0.0, 1.0)
    if hi - lo > step:
        steps.append("auto-range(p0.5-p99.5)")
        return np.clip((arr - lo) / (hi - lo), 0.0, 1.0)
    level, width = (lo + hi) / 2.0, max(full_width, step, 1e-6)
    steps.append(f"auto-range(degenerate: level {level:g} at mid-grey, width {width:g})")
    return np.clip((arr - level) / width + 0.5, 0.0, 1.0)


def _stored_range(ds: Dataset) -> tuple[float, float, int]:
    """The range of the stored pixel values (Bits Stored, Pixel Representation) through the modality
    LUT, and Bits Stored."""
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
    bits = min(max(bits, 1), 32)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    ends = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2**bits - 1], dtype=np.float64)
    try:
        mapped = apply_modality_lut(ends, ds).astype(np.float64)
    except Exception:  # a modality LUT that cannot map the ends: the stored values themselves
        mapped = ends
    return float(mapped.min()), float(mapped.max()), bits


def _grey_to_unit(ds: Dataset, arr: npt.NDArray[Any], modality: str, steps: list[str]) -> npt.NDArray[Any]:
    values = apply_modality_lut(arr, ds).astype(np.float64)
    slope = 1.0
    if "ModalityLUTSequence" in ds:
        steps.append("modality-lut-sequence")
    elif "RescaleSlope" in ds or "RescaleIntercept" in ds:
        steps.append("rescale")
        try:
            slope = abs(float(ds.get("RescaleSlope", 1) or 1)) or 1.0
        except (TypeError, ValueError):
            slope = 1.0
    if "VOILUTSequence" in ds:
        out = apply_voi_lut(values, ds, index=0, prefer_lut=True).astype(np.float64)
        steps.append("voi-lut-sequence")
        try:
            lut_bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        except (AttributeError, IndexError, TypeError, ValueError):
            lut_bits = 8
        return _auto_range(out, step=1.0, full_width=float(2 ** min(max(lut_bits, 1), 16) - 1), steps=steps)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = _str(ds, "VOILUTFunction") or "LINEAR"
        steps.append(f"window({center:g},{width:g},{function.lower()})")
        return _window(values, center, width, function)
    lo, hi, bits = _stored_range(ds)
    if bits <= 8:  # 8-bit data without a window is displayed as stored
        steps.append(f"stored-range({bits} bits)")
        return np.clip((values - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    if modality in DEFAULT_WINDOWS:
        center, width = DEFAULT_WINDOWS[modality]
        steps.append(f"default-window({center:g},{width:g})")
        return _window(values, center, width, "LINEAR")
    return _auto_range(values, step=slope, full_width=hi - lo, steps=steps)


_FUNCTIONAL_GROUPS = {
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept", "RescaleType"),
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction"),
}


def frame_view(ds: Dataset, frame: int, steps: list[str]) -> Dataset:
    """The dataset as one frame sees it: rescale and window from the frame's functional group (Enhanced
    CT/MR), else the shared one, else the top level. A shallow copy; pixel data is not duplicated."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    groups = []
    if per_frame is not None and frame < len(per_frame):
        groups.append(("frame", per_frame[frame]))
    if shared:
        groups.append(("shared", shared[0]))
    if not groups:
        return ds
    view = copy.copy(ds)
    for sequence, keywords in _FUNCTIONAL_GROUPS.items():
        for label, group in groups:  # the frame's own group wins over the shared one
            items = group.get(sequence)
            if items:
                for keyword in keywords:
                    if keyword in items[0]:
                        setattr(view, keyword, items[0][keyword].value)
                steps.append(f"{sequence.removesuffix('Sequence')}({label})")
                break
    return view


def read_dataset(path: Path) -> Dataset:
    """A whole instance, pixels included; DecodeError (no PHI) when it is not DICOM. Pass the result
    to `render` to render several frames or windows of one file with one read and one decode."""
    try:
        return dcmread(path, force=True)
    except Exception as exc:
        raise DecodeError(f"file could not be parsed as DICOM ({type(exc).__name__})") from exc


def default_frame(number_of_frames: int, chosen: Sequence[int] = ()) -> int:
    """The frame to render when none is asked for: the middle one of `chosen` (the frames the selection
    rules picked, `Decision.frames` of a selected instance) that exist, else the middle frame of the
    object. Frame 0 of a multi-frame object only when it is the middle of what was chosen."""
    frames = max(int(number_of_frames or 1), 1)
    valid = [f for f in chosen if 0 <= f < frames]
    return valid[len(valid) // 2] if valid else frames // 2


def render(
    source: Path | Dataset,
    *,
    frame: int | None = None,
    max_long_edge: int = 512,
    ct_windows: Sequence[tuple[float, float]] = (),
) -> RenderedImage:
    """Render one frame to PNG; raises DecodeError (a PermanentError) with a PHI-free reason.

    `frame`: None = the middle frame of a multi-frame object (`default_frame`), 0 for a single frame.
    `ct_windows`: for CT, one (center, width) window in HU that replaces the file's own window, or three
    rendered as the R, G and B channels (e.g. lung, mediastinum, bone); () = the file's window."""
    if len(ct_windows) not in (0, 1, 3):
        raise ValueError("ct_windows takes one (center, width) pair, or three (one per colour channel)")
    steps: list[str] = []
    ds = source if isinstance(source, Dataset) else read_dataset(source)
    if "PixelData" not in ds:
        raise DecodeError("the instance has no Pixel Data element")
    file_meta = getattr(ds, "file_meta", None)
    ts = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    try:
        arr = ds.pixel_array
    except Exception as exc:
        ts_text = f"{UID(ts).name} ({ts})" if ts else "unknown transfer syntax"
        raise DecodeError(
            f"pixel data could not be decoded, transfer syntax {ts_text}: {type(exc).__name__}: {_safe_message(exc)}"
        ) from exc
    steps.append("decode")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frame is None:
        frame = default_frame(frames)
    if frames > 1:
        if not 0 <= frame < frames:
            raise DecodeError(f"frame {frame} out of range: the instance has {frames} frames")
        arr = arr[frame]
        steps.append(f"frame {frame}/{frames}")
        ds = frame_view(ds, frame, steps)
    elif frame != 0:
        raise DecodeError(f"frame {frame} out of range: the instance has 1 frame")
    photometric = _str(ds, "PhotometricInterpretation").upper()
    modality = _str(ds, "Modality").upper()
    try:
        if photometric == "PALETTE COLOR":
            rgb = apply_color_lut(arr, ds)
            if rgb.dtype != np.uint8:
                rgb = (rgb / max(float(rgb.max()), 1.0) * 255.0).round()
            rgb8 = rgb.astype(np.uint8)
            steps.append("palette")
        elif samples == 3:
            rgb8 = _to_uint8_color(arr)
            steps.append(f"color({photometric.lower() or 'rgb'})")
        elif modality == "CT" and len(ct_windows) == 1:
            hu = apply_modality_lut(arr, ds).astype(np.float64)
            (center, width), *_ = ct_windows
            grey = np.round(_window(hu, center, width, "LINEAR") * 255.0).astype(np.uint8)
            rgb8 = np.repeat(grey[..., None], 3, axis=2)
            steps.append("rescale")
            steps.append(f"ct-window({center:g}/{width:g})")
        elif modality == "CT" and ct_windows:
            hu = apply_modality_lut(arr, ds).astype(np.float64)
            channels = [_window(hu, c, w, "LINEAR") for c, w in ct_windows]
            rgb8 = np.round(np.stack(channels, axis=-1) * 255.0).astype(np.uint8)
            steps.append("rescale")
            steps.append("ct-windows-as-rgb(" + ", ".join(f"{c:g}/{w:g}" for c, w in ct_windows) + ")")
        else:
            unit = _grey_to_unit(ds, arr, modality, steps)
            if photometric == "MONOCHROME1":
                unit = 1.0 - unit
                steps.append("invert(MONOCHROME1)")
            grey = np.round(unit * 255.0).astype(np.uint8)
            rgb8 = np.repeat(grey[..., None], 3, axis=2)
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(f"pixel values could not be rendered: {type(exc).__name__}: {_safe_message(exc)}") from exc
    img = PILImage.fromarray(rgb8, mode="RGB")
    h, w = rgb8.shape[:2]
    scale = max_long_edge / max(h, w)
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = img.resize(size, PILImage.Resampling.LANCZOS)
        steps.append(f"resize({w}x{h}->{size[0]}x{size[1]})")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return RenderedImage(
        png=buf.getvalue(),
        width=img.width,
        height=img.height,
        frame=frame,
        render_version=render_version(max_long_edge, ct_windows if modality == "CT" else ()),
        steps=steps,
    )


def _to_uint8_color(arr: npt.NDArray[Any]) -> npt.NDArray[Any]:
    if arr.dtype == np.uint8:
        return arr
    hi = float(arr.max()) if arr.size else 1.0
    out: npt.NDArray[Any] = np.round(arr.astype(np.float64) / max(hi, 1.0) * 255.0).astype(np.uint8)
    return out


def _safe_message(exc: BaseException) -> str:
    """pydicom's decode messages speak of lengths and syntaxes; cap them and keep one line."""
    return " ".join(str(exc).split())[:300]


def png_to_array(png: bytes) -> npt.NDArray[Any]:
    with PILImage.open(io.BytesIO(png)) as img:
        return np.asarray(img.convert("RGB"))


def check_ct_windows(v: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(v) not in (0, 1, 3) or any(w <= 0 for _, w in v):
        raise ValueError("ct_windows takes one [center, width] pair or three (stacked as RGB), widths positive")
    return v
