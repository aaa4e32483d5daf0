"""Orthanc's change feed (`GET /changes`): the studies that became stable since a sequence number.

A PACS that can tell what arrived recently finds late arrivals whatever their StudyDate, beyond the
re-query window of discovery. Orthanc's REST API is not DICOM; only its `/changes` and `/studies/{id}`
are read, with the source's credentials and CA bundle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from integrations.errors import PeerRefused, TransientError

MAX_PAGES = 100  # 100 × 1000 changes a discovery at most; the rest the next night


class OrthancChanges:
    def __init__(
        self,
        *,
        url: str,
        auth: tuple[str, str] | None = None,
        ca_file: Path | None = None,
        timeout_s: float = 30.0,
        page: int = 1000,
    ) -> None:
        import requests

        self.url, self.timeout_s, self.page = url.rstrip("/"), timeout_s, page
        self._session = requests.Session()
        if auth is not None:
            self._session.auth = auth
        if ca_file is not None:
            self._session.verify = str(ca_file)

    def _get(self, path: str, **params: Any) -> Any:
        import requests

        try:
            response = self._session.get(f"{self.url}{path}", params=params, timeout=self.timeout_s)
            response.raise_for_status()
            return response.json()
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else 0
            if code >= 500 or code in (408, 429):
                raise TransientError(f"Orthanc changes at {self.url}: HTTP {code}") from exc
            raise PeerRefused(f"Orthanc at {self.url} refused {path.split('?')[0]}: HTTP {code}") from exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise TransientError(f"Orthanc changes: cannot reach {self.url} ({type(exc).__name__})") from exc
        except ValueError as exc:  # not JSON: not an Orthanc
            raise PeerRefused(f"{self.url} does not answer like Orthanc's REST API") from exc

    def last(self) -> int:
        """The sequence number of the latest change (where a first discovery starts reading)."""
        return int(self._get("/changes", last="")["Last"])

    def stable_studies_since(self, since: int) -> tuple[list[str], int]:
        """(Study Instance UIDs of the studies that became stable after change `since`, the last change
        read)."""
        uids: list[str] = []
        for _ in range(MAX_PAGES):
            answer = self._get("/changes", since=since, limit=self.page)
            for change in answer.get("Changes", []):
                if change.get("ChangeType") == "StableStudy":
                    tags = self._get(f"/studies/{change['ID']}").get("MainDicomTags", {})
                    if tags.get("StudyInstanceUID"):
                        uids.append(str(tags["StudyInstanceUID"]))
            since = int(answer.get("Last", since))
            if answer.get("Done", True):
                break
        return list(dict.fromkeys(uids)), since

    def close(self) -> None:
        self._session.close()
