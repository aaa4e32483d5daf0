"""Fuzzing the read → select → render path: whatever bytes arrive, the outcome is rendered, skipped or a
DecodeError (recorded as a failure) — never another exception escaping into the task."""

from __future__ import annotations

import io
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmwrite

from flows.rules.selection import load_rules, select_images
from integrations.errors import DecodeError
from integrations.imaging import read_instance_info, render
from integrations.sample_pacs import generate_studies

BUDGET = int(os.environ.get("NIGHTREAD_FUZZ_EXAMPLES", "60"))
_STUDIES = generate_studies(seed=9, xr_size=64, ct_size=32, ct_slices=30)
SEEDS = []
for _ds in (_STUDIES[0].instances[0], _STUDIES[3].instances[5], _STUDIES[4].instances[0]):
    _buf = io.BytesIO()
    dcmwrite(_buf, _ds, enforce_file_format=True)
    SEEDS.append(_buf.getvalue())
RULES = load_rules()


def outcome(path) -> str:
    try:
        info = read_instance_info(path)
    except DecodeError:
        return "failed"
    (decision,) = select_images([info], RULES)
    if not decision.selected:
        return "skipped"
    try:
        for frame in decision.frames:
            render(path, frame=frame, max_long_edge=64)
    except DecodeError:
        return "failed"
    return "rendered"


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "truncate", "splice", "zero"]))
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del data[at:]
            if not data:
                data = bytearray(b"\0")
        elif kind == "splice":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[at : at + 8] = b"\0" * len(data[at : at + 8])
    return bytes(data)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about every mangled value
@settings(max_examples=BUDGET, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=mutated())
def test_any_bytes_get_an_outcome(tmp_path, data):
    path = tmp_path / "fuzz.dcm"
    path.write_bytes(data)
    assert outcome(path) in ("rendered", "skipped", "failed")


def test_the_unmutated_seeds_render():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        for i, data in enumerate(SEEDS):
            path = Path(d) / f"{i}.dcm"
            path.write_bytes(data)
            assert outcome(path) == "rendered"
