from __future__ import annotations

import pytest

from integrations.dicomweb import iter_multipart
from integrations.errors import PeerRefused

CT = 'multipart/related; type="application/dicom"; boundary="b0und"'


def message(parts: list[bytes]) -> bytes:
    body = b"".join(b"--b0und\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in parts)
    return body + b"--b0und--\r\n"


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 10_000])
def test_parts_survive_any_chunking(chunk):
    parts = [b"DICM" + bytes(range(256)) * 3, b"", b"\r\n--b0un not a delimiter \r\n", b"x" * 1000]
    data = message(parts)
    chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    assert list(iter_multipart(CT, chunks)) == parts


def test_not_multipart_or_no_boundary_is_refused():
    with pytest.raises(PeerRefused, match="multipart/related"):
        list(iter_multipart("application/json", [b"{}"]))
    with pytest.raises(PeerRefused, match="boundary"):
        list(iter_multipart("multipart/related", [b""]))
