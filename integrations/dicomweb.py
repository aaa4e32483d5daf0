"""DICOMweb access to a PACS with dicomweb-client: QIDO-RS discovery and WADO-RS retrieval.

`DicomWebStudySource` implements the same `StudySource` port as the DIMSE source.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import Dataset
from requests.adapters import HTTPAdapter

from integrations.errors import PeerRefused, RetrievalIncomplete, TransientError
from integrations.ports import RetrievedStudy, SeriesRef, StudyRef
from integrations.query import series_ref, studies_since, study_ref, uid_hash

log = logging.getLogger(__name__)
_WRITE_BUFFER = 1 << 20
_HEAD = 4096  # bytes kept of each part to read its File Meta Information

STUDY_FIELDS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyDescription",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedInstances",
)
SERIES_FIELDS = (
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
    "NumberOfSeriesRelatedInstances",
)


def _identity(answer: dict[str, Any]) -> str:
    """Study and series UID of a QIDO-RS answer, as one comparable string."""
    return json.dumps([answer.get("0020000D"), answer.get("0020000E")], sort_keys=True)


class _VerifyingAdapter(HTTPAdapter):
    """Verifies every HTTPS server against one CA bundle, whatever the environment says (requests lets
    REQUESTS_CA_BUNDLE override a Session's own `verify`)."""

    def __init__(self, ca_file: str) -> None:
        super().__init__()
        self.ca_file = ca_file

    def send(self, request: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs["verify"] = self.ca_file
        return super().send(request, **kwargs)


class DicomWebStudySource:
    """A PACS reached over DICOMweb (QIDO-RS, WADO-RS)."""

    def __init__(
        self,
        *,
        name: str,
        url: str,
        timeout_s: float = 30.0,
        headers: dict[str, str] | None = None,
        page_size: int = 500,
        ca_file: Path | None = None,
        auth: tuple[str, str] | None = None,
    ) -> None:
        """`ca_file` verifies an HTTPS server (default: the system's CAs); `auth` is ("bearer", token) or
        ("basic", "user:password"), sent on every request and never logged."""
        import requests
        from dicomweb_client.api import DICOMwebClient

        self.name = name
        self.url = url.rstrip("/")
        self.page_size = page_size
        self.timeout_s = timeout_s
        self._session = requests.Session()
        if headers:
            self._session.headers.update(headers)
        if ca_file is not None:  # on the adapter: REQUESTS_CA_BUNDLE would override Session.verify
            self._session.mount("https://", _VerifyingAdapter(str(ca_file)))
        if auth is not None:
            scheme, credential = auth
            if scheme == "bearer":
                self._session.headers["Authorization"] = f"Bearer {credential}"
            else:
                user, _, password = credential.partition(":")
                self._session.auth = (user, password)
        self.client = DICOMwebClient(url=self.url, session=self._session, timeout=timeout_s)
        # dicomweb_client retries every exception 5 times with exponential waits (30 s for an untrusted
        # certificate): retrying is the flows' job, which know transient from permanent
        self.client.set_http_retry_params(retry=False)

    def __enter__(self) -> DicomWebStudySource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._session.close()

    @contextmanager
    def _errors(self, operation: str) -> Iterator[None]:
        import requests

        try:
            yield
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else 0
            if code >= 500 or code in (408, 429):
                raise TransientError(f"{operation} at {self.url}: HTTP {code}") from exc
            raise PeerRefused(f"{operation} refused by {self.url}: HTTP {code}") from exc
        except requests.exceptions.SSLError as exc:  # before ConnectionError, its base: not worth a retry
            raise PeerRefused(
                f"{operation}: the TLS certificate of {self.url} is not trusted or the handshake failed"
            ) from exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise TransientError(f"{operation}: cannot reach {self.url} ({type(exc).__name__})") from exc

    def _paged(self, operation: str, search: Any) -> list[dict[str, Any]]:
        """All results of a QIDO-RS search, page by page with an explicit limit and offset, until an empty
        page. A page shorter than asked is not the end: a server may cap its pages below the limit asked
        for. (A cap on the whole answer, as Orthanc's LimitFindResults sets, no paging can get past:
        `flows.discovery` narrows the query instead.) dicomweb-client's own `get_remaining` sends only an
        offset, which some servers (Orthanc 1.10 with a ModalitiesInStudy filter) ignore, so it never
        ends; a page that repeats what we have also ends."""
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        offset = 0
        while True:
            with self._errors(operation):
                page = search(self.page_size, offset)
            fresh = [a for a in page if _identity(a) not in seen]
            seen.update(_identity(a) for a in fresh)
            out.extend(fresh)
            if not fresh:
                return out
            offset += len(page)

    def store_instances(self, datasets: Sequence[Dataset]) -> None:
        """STOW-RS our own objects (the SR) to the server."""
        with self._errors("STOW-RS"):
            self.client.store_instances(datasets=list(datasets))

    def echo(self) -> None:
        with self._errors("QIDO-RS"):
            self.client.search_for_studies(limit=1, fields=["StudyInstanceUID"])

    def _search_studies(
        self, filters: dict[str, Any], since: dt.datetime | None, modalities: Sequence[str]
    ) -> list[StudyRef]:
        if len(modalities) == 1:
            filters["ModalitiesInStudy"] = modalities[0]
        answers = self._paged(
            "QIDO-RS study search",
            lambda limit, offset: self.client.search_for_studies(
                fields=list(STUDY_FIELDS), search_filters=filters, limit=limit, offset=offset
            ),
        )
        return studies_since((study_ref(Dataset.from_json(a)) for a in answers), since=since, modalities=modalities)

    def find_studies(self, *, since: dt.datetime | None, modalities: Sequence[str] = ()) -> list[StudyRef]:
        return self._search_studies({"StudyDate": f"{since:%Y%m%d}-"} if since else {}, since, modalities)

    def find_study(self, study_instance_uid: str) -> StudyRef | None:
        """One study by its UID (a study a change feed named), or None when the PACS does not know it."""
        found = self._search_studies({"StudyInstanceUID": study_instance_uid}, None, ())
        return next((r for r in found if r.study_instance_uid == study_instance_uid), None)

    def find_studies_on(
        self, *, date: str, time_range: tuple[str, str] | None = None, modalities: Sequence[str] = ()
    ) -> list[StudyRef]:
        filters: dict[str, Any] = {"StudyDate": date}
        if time_range:
            filters["StudyTime"] = f"{time_range[0]}-{time_range[1]}"
        return self._search_studies(filters, None, modalities)

    def find_series(self, study_instance_uid: str) -> list[SeriesRef]:
        answers = self._paged(
            "QIDO-RS series search",
            lambda limit, offset: self.client.search_for_series(
                study_instance_uid=study_instance_uid, fields=list(SERIES_FIELDS), limit=limit, offset=offset
            ),
        )
        return [series_ref(Dataset.from_json(a)) for a in answers]

    def retrieve_study(self, study_instance_uid: str, *, dest: Path, expected: int | None = None) -> RetrievedStudy:
        """WADO-RS: the study's multipart response is streamed straight into one file per instance, as
        the PACS encoded it (no parse and re-encode; memory stays at one chunk, not one instance)."""
        dest.mkdir(parents=True, exist_ok=True)
        url = f"{self.url}/studies/{study_instance_uid}"
        headers = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
        with self._errors("WADO-RS study retrieval"):
            response = self._session.get(url, headers=headers, stream=True, timeout=self.timeout_s)
            response.raise_for_status()
            with response:
                events = multipart_events(
                    response.headers.get("Content-Type", ""), response.iter_content(chunk_size=1 << 20)
                )
                write_parts(events, dest)
        files = tuple(sorted(dest.glob("*.dcm")))
        if expected is not None and len(files) < expected:
            raise RetrievalIncomplete(expected=expected, received=len(files))
        return RetrievedStudy(study_instance_uid, dest, files, expected)


PART, DATA, END = "part", "data", "end"
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def multipart_events(content_type: str, chunks: Iterable[bytes]) -> Iterator[tuple[str, memoryview]]:
    """A multipart/related HTTP body (RFC 2046) as a stream of events: (PART, empty) when a part's body
    starts, (DATA, bytes of it) as they arrive, (END, empty) when the delimiter after it has arrived.
    Nothing is held back but the few bytes that could be the start of a delimiter, so a part of any
    size streams through in the chunks it came in; the views stay valid (they are of immutable bytes).
    A part without a blank line between headers and body is skipped; a body cut short yields no END."""
    media_type, *params = [p.strip() for p in content_type.split(";")]
    if media_type.lower() != "multipart/related":
        raise PeerRefused(f"expected a multipart/related answer, got {media_type or 'no content type'}")
    boundary = next((v.strip('"') for k, _, v in (p.partition("=") for p in params) if k.lower() == "boundary"), "")
    if not boundary:
        raise PeerRefused("multipart answer without a boundary")
    delimiter = b"\r\n--" + boundary.encode()
    keep = len(delimiter) - 1  # the longest tail that could be the start of a delimiter
    empty = memoryview(b"")
    tail = b"\r\n"  # so the first delimiter looks like the others
    state = "preamble"
    for chunk in chunks:
        data = tail + chunk if tail else bytes(chunk)
        view = memoryview(data)
        pos, end = 0, len(data)
        while True:
            if state in ("preamble", "body"):
                at = data.find(delimiter, pos)
                if at < 0:
                    flush = max(pos, end - keep)
                    if state == "body" and flush > pos:
                        yield DATA, view[pos:flush]
                    pos = flush
                    break
                if state == "body":
                    if at > pos:
                        yield DATA, view[pos:at]
                    yield END, empty
                pos, state = at + len(delimiter), "delimited"
            elif state == "delimited":
                if end - pos < 2:
                    break
                if data[pos : pos + 2] == b"--":  # the closing delimiter
                    return
                state = "headers"
            else:  # headers: up to the blank line
                blank = data.find(b"\r\n\r\n", pos)
                following = data.find(delimiter, pos)
                if following >= 0 and (blank < 0 or following < blank):  # no body separator: skip the part
                    pos, state = following + len(delimiter), "delimited"
                    continue
                if blank < 0:
                    break
                yield PART, empty
                pos, state = blank + 4, "body"
        tail = data[pos:]


def sop_instance_of_part10(head: bytes) -> str | None:
    """The Media Storage SOP Instance UID from the File Meta Information at the start of a DICOM file
    (always Explicit VR Little Endian, PS3.10 7.1), or None when `head` is not a Part 10 file."""
    if head[128:132] != b"DICM":
        return None
    offset = 132
    while offset + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, offset)
        if group != 0x0002:
            return None
        vr = bytes(head[offset + 4 : offset + 6])
        if vr in _LONG_VRS:
            if offset + 12 > len(head):
                return None
            length, value_at = struct.unpack_from("<I", head, offset + 8)[0], offset + 12
        else:
            length, value_at = struct.unpack_from("<H", head, offset + 6)[0], offset + 8
        if element == 0x0003:
            if value_at + length > len(head):
                return None
            return bytes(head[value_at : value_at + length]).rstrip(b"\x00 ").decode("ascii", "replace") or None
        offset = value_at + length
    return None


def write_parts(events: Iterable[tuple[str, memoryview]], dest: Path) -> int:
    """Each part into its own file, named like the DIMSE routes name theirs (a hash of the SOP Instance
    UID from its File Meta Information, so an instance sent twice is one file), `.part` until its END.
    Returns the number of parts written."""
    out: BinaryIO | None = None
    part = dest / "incoming.part"
    head = bytearray()
    written = 0
    try:
        for kind, data in events:
            if kind == PART:
                part = dest / f"incoming-{written + 1}.part"
                out = part.open("wb", buffering=_WRITE_BUFFER)
                head.clear()
            elif out is None:
                continue
            elif kind == DATA:
                out.write(data)
                if len(head) < _HEAD:
                    head += data[: _HEAD - len(head)]
            else:  # END
                out.close()
                out = None
                sop = sop_instance_of_part10(bytes(head))
                if sop is None:
                    log.warning("a WADO-RS part is not a DICOM file (no File Meta Information); kept unnamed")
                written += 1
                os.replace(part, dest / f"{uid_hash(sop) if sop else f'unnamed-{written}'}.dcm")
    finally:
        if out is not None:  # the answer was cut short in the middle of a part
            out.close()
            part.unlink(missing_ok=True)
    return written
