from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from flows.rules.selection import load_rules, select_images
from integrations.errors import ConfigurationError
from integrations.imaging import InstanceInfo

CR = "1.2.840.10008.5.1.4.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
SR = "1.2.840.10008.5.1.4.1.1.88.33"


def info(
    n: int,
    *,
    modality: str = "CT",
    view: str = "",
    series: str = "s1",
    image_type=("ORIGINAL", "PRIMARY"),
    z: float | None = None,
    sop_class: str = CT,
) -> InstanceInfo:
    return InstanceInfo(
        path=Path(f"/x/{n}.dcm"),
        sop_class_uid=sop_class,
        sop_instance_uid=f"1.{n}",
        series_instance_uid=series,
        study_instance_uid="9",
        modality=modality,
        view_position=view,
        image_type=tuple(image_type),
        instance_number=n,
        slice_position=z,
        has_pixels=True,
        rows=8,
        columns=8,
    )


def test_chest_frontal_and_lateral_selected_and_paired():
    rules = load_rules()
    d = select_images(
        [
            info(1, modality="CR", view="PA", sop_class=CR),
            info(2, modality="CR", view="LL", sop_class=CR),
            info(3, modality="DX", view="AP", sop_class=CR),
            info(4, modality="DX", view="", sop_class=CR),
            info(5, modality="DX", view="OBL", sop_class=CR),
        ],
        rules,
    )
    assert [x.selected for x in d] == [True, True, True, True, False]
    assert [x.role for x in d[:4]] == ["frontal", "lateral", "frontal", "frontal"]
    # the first frontal (by instance number) is paired with the one lateral, both ways; the rest stand alone
    assert (d[0].paired_with, d[1].paired_with) == ("1.2", "1.1")
    assert d[2].paired_with is None
    assert d[3].paired_with is None
    assert d[4].reason == "not a frontal or lateral view"


def test_pairs_stay_within_a_study():
    rules = load_rules()
    frontal = info(1, modality="DX", view="PA", sop_class=CR)
    lateral = replace(info(2, modality="DX", view="LL", sop_class=CR), study_instance_uid="other")
    assert [x.paired_with for x in select_images([frontal, lateral], rules)] == [None, None]


def test_a_pair_naming_a_role_no_rule_has_is_refused(tmp_path):
    f = tmp_path / "rules.yaml"
    f.write_text("pair: [frontal, oblique]\nrules:\n  - {name: a, action: select, role: frontal}\n")
    with pytest.raises(ConfigurationError, match="oblique"):
        load_rules(f)


def test_ct_representative_slices_evenly_spaced_by_position_not_file_order():
    rules = load_rules()
    slices = [info(i, z=float(-i)) for i in range(33)]  # positions run opposite to instance numbers
    chosen = [x.info.instance_number for x in select_images(slices, rules) if x.selected]
    assert len(chosen) == 3
    # by position (ascending z = descending instance number): quartiles of 33 slices
    assert sorted(chosen) == [8, 16, 24]


def test_representative_per_series():
    rules = load_rules()
    instances = [info(i, series="a", z=float(i)) for i in range(10)] + [
        info(i, series="b", z=float(i)) for i in range(10, 20)
    ]
    chosen = [x for x in select_images(instances, rules) if x.selected]
    assert len(chosen) == 6
    assert {x.info.series_instance_uid for x in chosen} == {"a", "b"}


def test_short_series_keeps_every_slice():
    assert sum(x.selected for x in select_images([info(1, z=0.0), info(2, z=1.0)], load_rules())) == 2


def test_localizer_and_derived_excluded():
    d = select_images(
        [info(1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")), info(2, image_type=("DERIVED", "SECONDARY"))],
        load_rules(),
    )
    assert [(x.selected, x.reason) for x in d] == [(False, "localizer/scout"), (False, "derived or secondary image")]


def test_non_image_objects_skipped_not_failed():
    sr = InstanceInfo(
        path=Path("/x/sr.dcm"),
        sop_class_uid=SR,
        sop_instance_uid="1.9",
        series_instance_uid="s",
        study_instance_uid="9",
        modality="SR",
    )
    (d,) = select_images([sr], load_rules())
    assert not d.selected
    assert d.reason == "not an image object"


def test_unknown_modality_says_so():
    (d,) = select_images([info(1, modality="XC", sop_class=CR)], load_rules())
    assert not d.selected
    assert "XC" in d.reason


def test_bad_rules_file_names_the_field(tmp_path):
    bad = tmp_path / "rules.yaml"
    bad.write_text("rules:\n  - name: ct\n    match: {modalities: [CT]}\n    action: representative\n")
    with pytest.raises(ConfigurationError, match="needs a count"):
        load_rules(bad)
    bad.write_text("rules:\n  - name: x\n    match: {modality: [CT]}\n    action: select\n")
    with pytest.raises(ConfigurationError, match=r"rules\.0\.match\.modality"):
        load_rules(bad)
    bad.write_text("rules: [")
    with pytest.raises(ConfigurationError, match="not valid YAML"):
        load_rules(bad)
    with pytest.raises(ConfigurationError, match="cannot be read"):
        load_rules(tmp_path / "missing.yaml")


def test_slice_thickness_and_orientation_rules(tmp_path):
    f = tmp_path / "rules.yaml"
    f.write_text(
        "rules:\n"
        "  - {name: thin-axial, match: {modalities: [CT], slice_thickness: [null, 1.5], orientations: [axial]},"
        " action: representative, count: 1}\n"
        "  - {name: rest, action: skip, reason: other}\n"
    )
    rules = load_rules(f)
    thin_axial = replace(info(1, z=0.0), slice_thickness=1.0, orientation="AXIAL")
    thick = replace(info(2, series="b", z=0.0), slice_thickness=5.0, orientation="AXIAL")
    coronal = replace(info(3, series="c", z=0.0), slice_thickness=1.0, orientation="CORONAL")
    unknown = info(4, series="d", z=0.0)  # no SliceThickness: does not fit a thickness range
    assert [d.rule for d in select_images([thin_axial, thick, coronal, unknown], rules)] == [
        "thin-axial",
        "rest",
        "rest",
        "rest",
    ]


@pytest.mark.parametrize(
    ("iop", "plane"),
    [
        ([1, 0, 0, 0, 1, 0], "AXIAL"),
        ([1, 0, 0, 0, 0, -1], "CORONAL"),
        ([0, 1, 0, 0, 0, -1], "SAGITTAL"),
        ([1, 0, 0, 0, 0.7071, 0.7071], "OBLIQUE"),
    ],
)
def test_orientation_is_read_from_image_orientation_patient(tmp_path, iop, plane):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    from integrations.imaging import read_instance_info

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "CT"
    ds.ImageOrientationPatient, ds.SliceThickness = iop, "1.25"
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    read = read_instance_info(tmp_path / "x.dcm")
    assert (read.orientation, read.slice_thickness) == (plane, 1.25)
