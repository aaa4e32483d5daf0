"""Multi-frame objects: frame selection by rule, and per-frame functional groups for rescale and window."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

from flows.rules.selection import Rule
from integrations.imaging import png_to_array, render


def enhanced_ct(intercepts: list[float]) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.Modality = "CT"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.NumberOfFrames = len(intercepts)
    ds.PixelData = np.full((len(intercepts), 16, 16), 1000, dtype="<u2").tobytes()
    per_frame = []
    for intercept in intercepts:
        transform = Dataset()
        transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 1, intercept, "HU"
        group = Dataset()
        group.PixelValueTransformationSequence = Sequence([transform])
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    window = Dataset()
    window.WindowCenter, window.WindowWidth = 1000, 200
    shared = Dataset()
    shared.FrameVOILUTSequence = Sequence([window])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    return ds


def test_per_frame_rescale_and_shared_window_are_honoured():
    ds = enhanced_ct([-1000, 0, 1000])  # the same stored value means HU 0, 1000 and 2000
    means = []
    for frame in range(3):
        r = render(ds, frame=frame)
        assert "PixelValueTransformation(frame)" in r.steps
        assert "FrameVOILUT(shared)" in r.steps
        means.append(png_to_array(r.png).mean())
    assert means[0] < 5, "HU 0 is below a 900..1100 window: black"
    assert 110 < means[1] < 145, "HU 1000 is the window's centre: mid grey"
    assert means[2] > 250, "HU 2000 is above the window: white"


def test_frame_out_of_range_is_a_decode_error():
    from integrations.errors import DecodeError

    with pytest.raises(DecodeError, match="frame 5 out of range"):
        render(enhanced_ct([0, 0]), frame=5)


@pytest.mark.parametrize(
    ("frames", "step", "cap", "n", "expected"),
    [
        ("middle", 1, 16, 1, (0,)),
        ("middle", 1, 16, 9, (4,)),
        ("every", 3, 16, 10, (0, 3, 6, 9)),
        ("all", 1, 16, 5, (0, 1, 2, 3, 4)),
        ("all", 1, 3, 9, (0, 4, 8)),  # the cap spreads over the whole object
        ("every", 2, 1, 9, (4,)),
    ],
)
def test_frame_rules(frames, step, cap, n, expected):
    rule = Rule(name="r", action="select", frames=frames, frame_step=step, max_frames=cap)
    assert rule.frame_indices(n) == expected
