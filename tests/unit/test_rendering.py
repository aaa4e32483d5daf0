"""Rendering asserts on pixel values of the output, not on the steps' names alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from flows.annotate import object_key
from integrations.errors import DecodeError
from integrations.imaging import (
    RENDER_PIPELINE_VERSION,
    default_frame,
    png_to_array,
    read_instance_info,
    render,
    render_version,
)
from integrations.storage import check_key


def _ds(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    modality: str = "DX",
    signed: bool = False,
    sop_class=SecondaryCaptureImageStorage,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = modality
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = pixels.astype("<i2" if signed else "<u2").tobytes()
    return ds


def _stripe(value_bg: int, value_stripe: int) -> np.ndarray:
    img = np.full((64, 64), value_bg, dtype=np.uint16)
    img[:, 28:36] = value_stripe
    return img


def test_monochrome1_bone_stripe_renders_bright():
    # MONOCHROME1: the minimum stored value is displayed white. Bone is stored LOW.
    ds = _ds(_stripe(3500, 200), photometric="MONOCHROME1")
    out = png_to_array(render(ds).png)
    assert out[:, 30].mean() > 200, "the bone stripe must be bright"
    assert out[:, 5].mean() < 60, "the background must be dark"


def test_monochrome2_same_pixels_render_the_other_way_round():
    out = png_to_array(render(_ds(_stripe(3500, 200))).png)
    assert out[:, 30].mean() < 60
    assert out[:, 5].mean() > 200


def test_ct_lung_window_follows_the_dicom_linear_formula():
    hu = np.full((64, 64), -1000, dtype=np.int32)  # air
    hu[:, 32:] = 40  # soft tissue
    ds = _ds((hu + 1024).astype(np.uint16), modality="CT", sop_class=CTImageStorage)
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.WindowCenter, ds.WindowWidth = -600, 1500  # lung window
    out = png_to_array(render(ds).png)
    # PS3.3 C.11.2.1.2 LINEAR: y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255
    air = ((-1000 - (-600 - 0.5)) / 1499 + 0.5) * 255  # 60
    tissue = ((40 - (-600 - 0.5)) / 1499 + 0.5) * 255  # 236
    assert abs(out[:, :30].mean() - air) < 1.5, "air is dark grey in a lung window"
    assert abs(out[:, 40:].mean() - tissue) < 1.5, "soft tissue is near white in a lung window"
    assert out[:, :30].mean() < 70


def test_negative_hounsfield_units_are_not_clipped_with_signed_pixels():
    hu = np.full((32, 32), -1000, dtype=np.int16)
    hu[:, 16:] = 0
    ds = _ds(hu, modality="CT", signed=True, sop_class=CTImageStorage)
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    ds.WindowCenter, ds.WindowWidth = -500, 1000  # -1000 -> black, 0 -> white
    out = png_to_array(render(ds).png)
    assert out[:, :14].max() < 10
    assert out[:, 18:].min() > 245


def test_ct_without_window_uses_the_modality_default():
    hu = np.full((32, 32), 40, dtype=np.int32)  # soft tissue at the default window's centre
    ds = _ds((hu + 1024).astype(np.uint16), modality="CT", sop_class=CTImageStorage)
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    r = render(ds)
    assert any(s.startswith("default-window") for s in r.steps)
    assert 110 < png_to_array(r.png).mean() < 145


def test_multivalued_window_takes_the_first_value():
    hu = np.full((32, 32), -600, dtype=np.int32)
    ds = _ds((hu + 1024).astype(np.uint16), modality="CT", sop_class=CTImageStorage)
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.WindowCenter, ds.WindowWidth = [-600, 40], [1500, 400]  # lung first: -600 sits mid-grey
    assert 110 < png_to_array(render(ds).png).mean() < 145


def test_long_edge_is_capped_and_aspect_ratio_kept():
    ds = _ds(np.zeros((400, 200), dtype=np.uint16))
    r = render(ds, max_long_edge=100)
    assert (r.width, r.height) == (50, 100)
    assert r.render_version == render_version(100)
    assert png_to_array(r.png).shape == (100, 50, 3)


def test_output_is_8_bit_rgb():
    arr = png_to_array(render(_ds(_stripe(100, 4000))).png)
    assert arr.dtype == np.uint8
    assert arr.shape[2] == 3


def test_no_pixel_data_is_a_clear_decode_error():
    ds = _ds(np.zeros((8, 8), dtype=np.uint16))
    del ds.PixelData
    with pytest.raises(DecodeError, match="no Pixel Data"):
        render(ds)


def test_truncated_pixel_data_names_the_transfer_syntax_and_no_identifiers():
    ds = _ds(np.zeros((64, 64), dtype=np.uint16))
    ds.PatientName = "DOE^JANE"
    ds.PatientID = "MRN12345"
    ds.PixelData = b"\x00" * 100
    with pytest.raises(DecodeError) as info:
        render(ds)
    message = str(info.value)
    assert "1.2.840.10008.1.2.1" in message
    assert "DOE" not in message
    assert "MRN12345" not in message
    assert ds.SOPInstanceUID not in message


def test_garbage_file_is_a_decode_error(tmp_path):
    path = tmp_path / "junk.dcm"
    path.write_bytes(b"this is not dicom at all")
    with pytest.raises(DecodeError):
        read_instance_info(path)
    with pytest.raises(DecodeError):
        render(path)


def test_instance_info_reads_selection_tags_without_pixels(tmp_path):
    ds = _ds(np.zeros((16, 16), dtype=np.uint16), modality="CR")
    ds.ViewPosition, ds.BodyPartExamined, ds.ImageType = "PA", "CHEST", ["ORIGINAL", "PRIMARY"]
    path = tmp_path / "a.dcm"
    ds.save_as(path, enforce_file_format=True)
    info = read_instance_info(path)
    assert (info.modality, info.view_position, info.body_part) == ("CR", "PA", "CHEST")
    assert info.has_pixels
    assert info.is_image_sop_class
    assert info.image_type == ("ORIGINAL", "PRIMARY")


def test_ct_three_windows_become_the_rgb_channels():
    hu = np.zeros((30, 30), dtype=np.int32)
    hu[:, :10], hu[:, 10:20], hu[:, 20:] = -1000, 40, 1000  # air, soft tissue, bone
    ds = _ds((hu + 1024).astype(np.uint16), modality="CT", sop_class=CTImageStorage)
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    windows = [(-600.0, 1500.0), (40.0, 400.0), (400.0, 1800.0)]  # lung, mediastinum, bone
    r = render(ds, ct_windows=windows)
    out = png_to_array(r.png).astype(int)

    def expected(value: float) -> list[int]:
        return [round(min(max(((value - (c - 0.5)) / (w - 1) + 0.5), 0), 1) * 255) for c, w in windows]

    for columns, value in ((slice(0, 10), -1000), (slice(10, 20), 40), (slice(20, 30), 1000)):
        assert np.abs(out[:, columns].reshape(-1, 3).mean(axis=0) - expected(value)).max() <= 1.5
    assert r.render_version == f"{RENDER_PIPELINE_VERSION}-512-w-600x1500_40x400_400x1800"
    check_key(object_key(study_uid="1.2", sop_uid="1.2.3", frame=0, render_version=r.render_version))
    assert render(ds).render_version == f"{RENDER_PIPELINE_VERSION}-512", "one grey window is another render version"


def test_three_windows_do_not_touch_other_modalities():
    ds = _ds(_stripe(3500, 200), photometric="MONOCHROME1")
    r = render(ds, ct_windows=[(0.0, 1.0), (0.0, 1.0), (0.0, 1.0)])
    assert r.render_version == f"{RENDER_PIPELINE_VERSION}-512"
    out = png_to_array(r.png)
    assert (out[..., 0] == out[..., 1]).all()


def test_palette_colour_keeps_its_colours():
    ds = _ds(np.array([[0, 1], [2, 3]], dtype=np.uint16).repeat(8, 0).repeat(8, 1), photometric="PALETTE COLOR")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = np.array([[0, 1], [2, 3]], dtype=np.uint8).repeat(8, 0).repeat(8, 1).tobytes()
    red, green, blue = [255, 0, 0, 255], [0, 255, 0, 255], [0, 0, 255, 255]  # index 3 is white
    for colour, table in (("Red", red), ("Green", green), ("Blue", blue)):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [4, 0, 8])
        setattr(ds, f"{colour}PaletteColorLookupTableData", bytes(table))
    out = png_to_array(render(ds).png)
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 15]) == (0, 255, 0)
    assert tuple(out[15, 0]) == (0, 0, 255)
    assert tuple(out[15, 15]) == (255, 255, 255)


@pytest.mark.parametrize("planar", [0, 1])
def test_rgb_planar_configuration(planar):
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 0], rgb[:, 4:, 2] = 200, 100
    ds = _ds(np.zeros((8, 8), dtype=np.uint16), photometric="RGB")
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, planar
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = (rgb.transpose(2, 0, 1) if planar else rgb).tobytes()
    out = png_to_array(render(ds).png)
    assert tuple(out[0, 0]) == (200, 0, 0)
    assert tuple(out[0, 7]) == (200, 0, 100)


def test_one_ct_window_replaces_the_files_own_window():
    hu = np.zeros((30, 30), dtype=np.int32)
    hu[:, :10], hu[:, 10:20], hu[:, 20:] = 0, 60, 120
    ds = _ds((hu + 1024).astype(np.uint16), modality="CT", sop_class=CTImageStorage)
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.WindowCenter, ds.WindowWidth = 40, 400  # the file's own (mediastinum) window
    brain = render(ds, ct_windows=[(40.0, 80.0)])  # 0..80 HU spread over the full grey range
    out = png_to_array(brain.png).astype(int)
    assert out[:, :10].max() <= 1
    assert out[:, 20:].min() >= 254
    assert 140 < out[0, 15, 0] < 225
    assert brain.render_version == f"{RENDER_PIPELINE_VERSION}-512-w40x80"
    assert "ct-window(40/80)" in brain.steps
    assert (out[..., 0] == out[..., 2]).all(), "one window stays grey"


def test_ybr_full_422_uncompressed_becomes_rgb():
    """pydicom's YBR_FULL_422 file: 4:2:2 subsampled luminance/chrominance, in bands of known colour."""
    out = png_to_array(render(Path(get_testdata_file("SC_ybr_full_422_uncompressed.dcm"))).png).astype(int)
    expected = {0: (255, 0, 0), 20: (0, 255, 0), 40: (0, 0, 255), 60: (0, 0, 0), 70: (64, 64, 64), 90: (255, 255, 255)}
    for row, colour in expected.items():
        assert np.abs(out[row, 50] - colour).max() <= 3, row


@pytest.mark.parametrize("signed", [False, True])
def test_12_bits_stored_in_16_ignores_the_unused_high_bits(signed):
    """12 bits stored, high bit 11: bits 12-15 may hold anything (overlays, garbage) and must not leak
    into the values; signed 12-bit values are sign-extended from bit 11."""
    low, high = (-2048, 2047) if signed else (0, 4095)
    values = np.tile(np.linspace(low, high, 64).round().astype(np.int32), (8, 1))
    stored = (values & 0x0FFF) | 0xA000  # junk in the 4 unused bits
    ds = _ds(np.zeros((8, 64), dtype=np.uint16), signed=signed)
    ds.PixelData = stored.astype("<u2").tobytes()
    ds.WindowCenter, ds.WindowWidth = (low + high) / 2, high - low + 1
    out = png_to_array(render(ds).png)[..., 0].astype(int)
    assert out[0, 0] <= 1
    assert out[0, -1] >= 254
    assert (np.diff(out[0]) >= 0).all(), "a ramp renders as a ramp: no wrap-around from the junk bits"


# --- no window: 8-bit data as stored, degenerate ranges never black, the middle frame by default ----------


def _ds8(frames: np.ndarray, *, photometric: str = "MONOCHROME2") -> Dataset:
    """An 8-bit secondary capture, one frame (rows, cols) or several (frames, rows, cols), no window."""
    ds = _ds(np.zeros(frames.shape[-2:], dtype=np.uint16), photometric=photometric, modality="OT")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    if frames.ndim == 3:
        ds.NumberOfFrames = frames.shape[0]
    ds.PixelData = frames.astype(np.uint8).tobytes()
    return ds


def test_8_bit_data_without_a_window_renders_as_stored():
    ramp = np.tile(np.array([0, 1, 64, 128, 200, 255], dtype=np.uint8).repeat(4), (8, 1))
    r = render(_ds8(ramp))
    assert "stored-range(8 bits)" in r.steps
    assert (png_to_array(r.png)[..., 0] == ramp).all(), "each stored value is its own grey level"


@pytest.mark.parametrize("level", [3, 100, 254])
def test_a_nearly_uniform_8_bit_frame_keeps_its_grey(level):
    frame = np.full((64, 64), level, dtype=np.uint8)
    frame[0, :5] = level + 1 if level < 255 else level - 1  # a few pixels off: the percentiles collapse
    out = png_to_array(render(_ds8(frame)).png)[..., 0]
    assert abs(int(np.median(out)) - level) <= 1


def test_monochrome1_8_bit_is_inverted_as_stored():
    frame = np.full((8, 8), 200, dtype=np.uint8)
    assert abs(int(png_to_array(render(_ds8(frame, photometric="MONOCHROME1")).png).mean()) - 55) <= 1


@pytest.mark.parametrize("value", [0, 1000, 4095])
def test_a_degenerate_range_is_never_black(value):
    """12-bit data, no window, all pixels (but 0.2 %) equal: the auto-range collapses. The frame's level
    renders mid-grey, the few brighter pixels brighter."""
    pixels = np.full((50, 100), value, dtype=np.uint16)
    pixels[0, :10] = min(value + 400, 4095)
    r = render(_ds(pixels))
    out = png_to_array(r.png)[..., 0].astype(int)
    assert any(s.startswith("auto-range(degenerate") for s in r.steps)
    assert 120 <= int(np.median(out)) <= 136
    if value < 4095:
        assert out[0, :10].min() > np.median(out), "outliers still show"


def test_a_flat_frame_through_a_voi_lut_is_not_black():
    ds = _ds(np.full((16, 16), 500, dtype=np.uint16))
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 8]
    item.LUTData = (np.arange(4096) // 16).astype(np.uint16).tolist()
    ds.VOILUTSequence = [item]
    assert 120 <= png_to_array(render(ds).png).mean() <= 136


def test_a_real_ramp_still_uses_the_percentile_range():
    values = np.tile(np.linspace(1000, 1100, 64).round().astype(np.uint16), (8, 1))
    r = render(_ds(values))
    out = png_to_array(r.png)[..., 0].astype(int)
    assert "auto-range(p0.5-p99.5)" in r.steps
    assert out[0, 0] <= 3
    assert out[0, -1] >= 252


def test_a_multi_frame_object_renders_its_middle_frame_by_default():
    frames = np.stack([np.full((8, 8), v, dtype=np.uint8) for v in (10, 60, 110, 160, 210)])
    ds = _ds8(frames)
    r = render(ds)
    assert r.frame == 2
    assert int(png_to_array(r.png).mean()) == 110
    assert int(png_to_array(render(ds, frame=0).png).mean()) == 10, "an explicit frame is rendered"


@pytest.mark.parametrize(
    ("number_of_frames", "chosen", "expected"),
    [
        (1, (), 0),
        (1, (0,), 0),
        (5, (), 2),
        (10, (), 5),
        (10, (5,), 5),
        (10, (0, 3, 6, 9), 6),
        (10, (0, 12), 0),  # frames the object does not have are ignored
        (0, (), 0),
    ],
)
def test_default_frame(number_of_frames, chosen, expected):
    assert default_frame(number_of_frames, chosen) == expected
