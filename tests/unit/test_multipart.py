"""The WADO-RS multipart stream: split into parts whatever the chunking, and each part written to its own
file named by its SOP Instance UID, with nothing half-written when the answer is cut short."""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator

import pytest
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from integrations.dicomweb import DATA, END, PART, multipart_events, sop_instance_of_part10, write_parts
from integrations.errors import PeerRefused
from integrations.query import uid_hash

CT = 'multipart/related; type="application/dicom"; boundary="b0und"'


def message(parts: list[bytes]) -> bytes:
    body = b"".join(b"--b0und\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in parts)
    return body + b"--b0und--\r\n"


def chunked(data: bytes, size: int) -> Iterator[bytes]:
    return (data[i : i + size] for i in range(0, len(data), size))


def parts_of(content_type: str, chunks: Iterable[bytes]) -> list[bytes]:
    parts: list[bytes] = []
    body = bytearray()
    for kind, data in multipart_events(content_type, chunks):
        if kind == PART:
            body = bytearray()
        elif kind == DATA:
            body += data
        else:
            assert kind == END
            parts.append(bytes(body))
    return parts


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 10_000])
def test_parts_survive_any_chunking(chunk):
    parts = [b"DICM" + bytes(range(256)) * 3, b"", b"\r\n--b0un not a delimiter \r\n", b"x" * 1000]
    assert parts_of(CT, chunked(message(parts), chunk)) == parts


def test_a_part_without_a_body_separator_is_skipped_and_a_cut_short_body_is_not_ended():
    data = b"--b0und\r\nno separator here\r\n--b0und\r\n\r\nkept\r\n--b0und\r\n\r\ncut sh"
    events = list(multipart_events(CT, chunked(data, 5)))
    assert parts_of(CT, chunked(data, 5)) == [b"kept"]
    assert [k for k, _ in events].count(PART) == 2, "the cut-short part started but never ended"


def test_not_multipart_or_no_boundary_is_refused():
    with pytest.raises(PeerRefused, match="multipart/related"):
        list(multipart_events("application/json", [b"{}"]))
    with pytest.raises(PeerRefused, match="boundary"):
        list(multipart_events("multipart/related", [b""]))


def part10(sop_uid: str, pixels: bytes = b"\x00" * 5000) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = sop_uid
    ds.BitsAllocated = 8
    ds.PixelData = pixels
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def test_the_sop_instance_uid_is_read_from_the_file_meta_information():
    uid = generate_uid()
    assert sop_instance_of_part10(part10(uid)) == uid
    assert sop_instance_of_part10(part10(uid)[:140]) is None, "too short to hold it"
    assert sop_instance_of_part10(b"\x00" * 128 + b"NOPE") is None


@pytest.mark.parametrize("chunk", [3, 4096, 1 << 20])
def test_each_part_becomes_a_file_named_by_its_instance(tmp_path, chunk):
    uids = [generate_uid() for _ in range(3)]
    files = [part10(uid, bytes([i]) * 20_000) for i, uid in enumerate(uids)]
    assert write_parts(multipart_events(CT, chunked(message([*files, files[0]]), chunk)), tmp_path) == 4
    written = sorted(tmp_path.iterdir())
    assert sorted(p.name for p in written) == sorted(f"{uid_hash(u)}.dcm" for u in uids), "sent twice, filed once"
    for uid, data in zip(uids, files, strict=True):
        path = tmp_path / f"{uid_hash(uid)}.dcm"
        assert path.read_bytes() == data
        assert dcmread(path).SOPInstanceUID == uid


def test_an_answer_cut_short_leaves_no_partial_file(tmp_path):
    whole = part10(generate_uid())
    data = message([whole, part10(generate_uid())])
    cut = data[: len(data) - 3000]  # in the middle of the second part
    assert write_parts(multipart_events(CT, chunked(cut, 1000)), tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == [f"{uid_hash(sop_instance_of_part10(whole) or '')}.dcm"]
