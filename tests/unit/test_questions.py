from __future__ import annotations

import pytest

from flows.rules.questions import load_bank
from integrations.errors import ConfigurationError

CODE = "code: {scheme: 99NIGHTREAD, value: T, meaning: Test}"


def test_bundled_bank_covers_the_modalities():
    bank = load_bank()
    closed = lambda m, b: [q for q in bank.for_image(modality=m, body_part=b) if q.kind == "closed"]  # noqa: E731
    assert len(closed("DX", "CHEST")) >= 6
    assert len(closed("CR", "")) >= 6
    assert len(closed("CT", "CHEST")) >= 3
    assert len(closed("MR", "BRAIN")) >= 2
    assert all(q.flag_threshold is not None for q in closed("DX", "CHEST"))


def test_version_is_the_sha_of_the_file(tmp_path):
    text = (
        'name: t\nquestions:\n  - {id: a, text: "Is there a thing?", modalities: [CT], flag_threshold: 0.5, '
        + CODE
        + "}\n"
    )
    f = tmp_path / "bank.yaml"
    f.write_text(text)
    v1 = load_bank(f).version
    f.write_text(text.replace("0.5", "0.6"))
    v2 = load_bank(f).version
    assert v1 != v2
    assert len(v1) == 12


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ('questions:\n  - {id: a, text: "Is it?", modalities: [CT], ' + CODE + "}\n", "name"),
        ('name: t\nquestions:\n  - {id: A-bad, text: "Is it?", modalities: [CT], ' + CODE + "}\n", "questions.0.id"),
        (
            'name: t\nquestions:\n  - {id: a, text: "Is it?", modalities: [CT], flag_threshold: 2, ' + CODE + "}\n",
            "flag_threshold",
        ),
        (
            'name: t\nquestions:\n  - {id: a, text: "What?", kind: open, modalities: [CT], flag_threshold: 0.5, '
            + CODE
            + "}\n",
            "closed questions only",
        ),
        (
            'name: t\nquestions:\n  - {id: a, text: "Is it?", modalities: [CT], '
            + CODE
            + '}\n  - {id: a, text: "Is it?", '
            "modalities: [MR], " + CODE + "}\n",
            "appears twice",
        ),
        (
            'name: t\nquestions:\n  - {id: no_code, text: "Is it?", modalities: [CT]}\n',
            'question "no_code": `code` is required',
        ),
        (
            'name: t\nquestions:\n  - {id: a, text: "Is it?", modalities: [CT],\n'
            '     code: {scheme: LN, value: "1", meaning: x}}\n',
            "questions.0.code.scheme",
        ),
        (
            'name: t\nquestions:\n  - {id: a, text: "Is it?", modalities: [CT],\n'
            "     code: {scheme: SCT, value: X1, meaning: x}}\n",
            "not a concept id",
        ),
    ],
)
def test_invalid_banks_name_what_is_wrong(tmp_path, body, needle):
    f = tmp_path / "bank.yaml"
    f.write_text(body)
    with pytest.raises(ConfigurationError, match=needle):
        load_bank(f)


def test_body_part_filter():
    bank = load_bank()
    ids = {q.id for q in bank.for_image(modality="CT", body_part="HEAD")}
    assert "ct_intracranial_hemorrhage" in ids
    assert "ct_intracranial_hemorrhage" not in {q.id for q in bank.for_image(modality="CT", body_part="CHEST")}


def test_ct_questions_are_asked_on_their_own_window():
    bank = load_bank()
    sets = bank.ct_window_sets(body_part="CHEST", default_windows=[])
    assert sets == [[], [(-600.0, 1500.0)], [(400.0, 1800.0)]]  # default first; the head-only brain window absent
    assert [(40.0, 80.0)] in bank.ct_window_sets(body_part="HEAD", default_windows=[])

    def ids(window: str, default: str = "") -> list[str]:
        return [
            q.id for q in bank.for_image(modality="CT", body_part="CHEST", ct_window=window, default_windows=default)
        ]

    assert ids("") == ["ct_pleural_effusion"]
    assert ids("-600x1500") == ["ct_lung_nodule"]
    assert ids("400x1800") == ["ct_fracture"]
    # a stacked default setting: the questions naming no window are asked on it
    assert ids("-600x1500_40x400_400x1800", default="-600x1500_40x400_400x1800") == ["ct_pleural_effusion"]
    # other modalities ignore windows
    assert len(bank.for_image(modality="MR", body_part="", ct_window=None)) == 3


def test_a_question_with_two_windows_is_refused(tmp_path):
    f = tmp_path / "bank.yaml"
    f.write_text(
        "name: x\nquestions:\n  - {id: a, text: Is it?, modalities: [CT], ct_windows: [[40, 400], [0, 100]], "
        + CODE
        + "}\n"
    )
    with pytest.raises(ConfigurationError, match="ct_windows"):
        load_bank(f)


def test_every_bundled_question_is_coded():
    bank = load_bank()
    for q in bank.questions:
        assert q.code.scheme in {"SCT", "RADLEX", "99NIGHTREAD"}, q.id
        if q.kind == "open":
            assert q.code.scheme == "99NIGHTREAD", q.id
    by_id = {q.id: q for q in bank.questions}
    assert by_id["pleural_effusion"].code.value == "60046008"
    assert by_id["pneumothorax"].finding_type is not None
    assert by_id["cardiomegaly"].finding_site is not None
    assert by_id["cardiomegaly"].finding_site.meaning == "Heart"
