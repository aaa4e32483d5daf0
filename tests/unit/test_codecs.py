"""Every transfer syntax pydicom decodes with the installed plugins, on pydicom's bundled test files:
lossless encodings of one image must render to exactly the same pixels."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from flows.rules.selection import load_rules, select_images
from integrations.errors import DecodeError
from integrations.imaging import png_to_array, read_instance_info, render


def pixels(name: str) -> np.ndarray:
    return png_to_array(render(get_testdata_file(name)).png)


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
    ],
)
def test_lossless_encodings_render_identically(name):
    syntax = dcmread(get_testdata_file(name)).file_meta.TransferSyntaxUID
    assert syntax != dcmread(get_testdata_file("MR_small.dcm")).file_meta.TransferSyntaxUID
    assert np.array_equal(pixels(name), pixels("MR_small.dcm"))


def test_jpeg_baseline_ybr_matches_the_lossless_rgb_original():
    lossy = pixels("SC_rgb_jpeg_dcmtk.dcm").astype(int)
    lossless = pixels("SC_rgb_rle.dcm").astype(int)
    assert lossy.shape == lossless.shape
    assert np.abs(lossy - lossless).mean() < 3, "YBR_FULL converted to RGB, colours kept"
    assert len(np.unique(lossless.reshape(-1, 3), axis=0)) > 4, "a colour image stays in colour"


@pytest.mark.parametrize(
    "name",
    [
        "JPGExtended.dcm",
        "JPEG2000.dcm",
        "JPEGLSNearLossless_16.dcm",
        "image_dfl.dcm",
        "ExplVR_BigEnd.dcm",
        "SC_rgb_small_odd.dcm",
        "SC_rgb_jpeg_lossy_gdcm.dcm",
        "SC_rgb_dcmtk_+eb+cy+n2.dcm",
    ],
)
def test_other_transfer_syntaxes_render(name):
    out = pixels(name)
    assert out.dtype == np.uint8
    assert out.shape[2] == 3
    assert out.std() > 1, "not a blank image"


def test_a_file_no_decoder_can_read_is_a_decode_error_naming_its_syntax():
    # pydicom's JPEG-lossy.dcm: 12-bit JPEG Extended that libjpeg rejects and gdcm/Pillow do not support
    with pytest.raises(DecodeError, match=r"JPEG Extended .*1\.2\.840\.10008\.1\.2\.4\.51"):
        render(get_testdata_file("JPEG-lossy.dcm"))


def test_unsupported_transfer_syntax_is_named(tmp_path):
    ds = dcmread(get_testdata_file("MR_small_RLE.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder
    path = tmp_path / "mpeg2.dcm"
    ds.save_as(path)
    with pytest.raises(DecodeError, match=r"1\.2\.840\.10008\.1\.2\.4\.100"):
        render(path)


def test_non_image_objects_are_skipped_with_their_sop_class():
    info = read_instance_info(get_testdata_file("rtplan.dcm"))
    (decision,) = select_images([info], load_rules())
    assert not decision.selected
    assert decision.reason == "not an image object"
    assert info.sop_class_name == "RT Plan Storage"
