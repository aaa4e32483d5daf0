"""DICOMweb access to a PACS with dicomweb-client: QIDO-RS discovery and WADO-RS retrieval.

`DicomWebStudySource` implements the same `StudySource` port as the DIMSE source.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydicom import Dataset

from integrations.errors import PeerRefused, RetrievalIncomplete, TransientError
from integrations.ports import RetrievedStudy, SeriesRef, StudyRef
from integrations.query import series_ref, studies_since, study_ref

log = logging.getLogger(__name__)

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
    ) -> None:
        import requests
        from dicomweb_client.api import DICOMwebClient

        self.name = name
        self.url = url.rstrip("/")
        self.page_size = page_size
        self.timeout_s = timeout_s
        self._session = requests.Session()
        if headers:
            self._session.headers.update(headers)
        self.client = DICOMwebClient(url=self.url, session=self._session, timeout=timeout_s)

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
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise TransientError(f"{operation}: cannot reach {self.url} ({type(exc).__name__})") from exc

    def _paged(self, operation: str, search: Any) -> list[dict[str, Any]]:
        """All results of a QIDO-RS search, page by page with an explicit limit and offset.

        dicomweb-client's own `get_remaining` sends only an offset, which some servers (Orthanc 1.10 with
        a ModalitiesInStudy filter) ignore, so it never ends; a page that repeats what we have also ends."""
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        offset = 0
        while True:
            with self._errors(operation):
                page = search(self.page_size, offset)
            fresh = [a for a in page if _identity(a) not in seen]
            seen.update(_identity(a) for a in fresh)
            out.extend(fresh)
            if len(page) < self.page_size or not fresh:
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
        """WADO-RS: the study's multipart response is streamed part by part straight to files, as the
        PACS encoded them (no parse and re-encode; memory stays at one chunk, not one study)."""
        dest.mkdir(parents=True, exist_ok=True)
        url = f"{self.url}/studies/{study_instance_uid}"
        headers = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
        with self._errors("WADO-RS study retrieval"):
            response = self._session.get(url, headers=headers, stream=True, timeout=self.timeout_s)
            response.raise_for_status()
            with response:
                for part in iter_multipart(
                    response.headers.get("Content-Type", ""), response.iter_content(chunk_size=1 << 20)
                ):
                    name = hashlib.sha256(part).hexdigest()[:16]
                    (dest / f"{name}.dcm").write_bytes(part)
        files = tuple(sorted(dest.glob("*.dcm")))
        if expected is not None and len(files) < expected:
            raise RetrievalIncomplete(expected=expected, received=len(files))
        return RetrievedStudy(study_instance_uid, dest, files, expected)


def iter_multipart(content_type: str, chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The bodies of a multipart/related HTTP body, streamed (RFC 2046): each is yielded as soon as
    the delimiter after it has arrived."""
    media_type, *params = [p.strip() for p in content_type.split(";")]
    if media_type.lower() != "multipart/related":
        raise PeerRefused(f"expected a multipart/related answer, got {media_type or 'no content type'}")
    boundary = next((v.strip('"') for k, _, v in (p.partition("=") for p in params) if k.lower() == "boundary"), "")
    if not boundary:
        raise PeerRefused("multipart answer without a boundary")
    delimiter = b"\r\n--" + boundary.encode()
    buffer = bytearray(b"\r\n")  # so the first delimiter looks like the others
    search_from = 0
    started = False
    for chunk in chunks:
        buffer += chunk
        while True:
            at = buffer.find(delimiter, search_from)
            if at < 0:
                search_from = max(0, len(buffer) - len(delimiter))
                break
            if started:
                part = bytes(buffer[:at])
                _headers, sep, body = part.partition(b"\r\n\r\n")
                if sep:
                    yield body
            started = True
            del buffer[: at + len(delimiter)]
            search_from = 0
            if buffer.startswith(b"--"):  # the closing delimiter
                return
