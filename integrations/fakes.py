"""In-memory fakes for unit tests. They pass the same contract tests as the real adapters."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from integrations.storage import ObjectNotFound, check_key


class InMemoryObjectStore:
    def __init__(self) -> None:
        self._objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def put(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> None:
        with self._lock:
            self._objects[check_key(key)] = bytes(data)

    def get(self, key: str) -> bytes:
        with self._lock:
            try:
                return self._objects[check_key(key)]
            except KeyError:
                raise ObjectNotFound(key) from None

    def exists(self, key: str) -> bool:
        with self._lock:
            return check_key(key) in self._objects

    def list(self, prefix: str = "") -> Iterator[str]:
        with self._lock:
            keys = sorted(k for k in self._objects if k.startswith(prefix))
        yield from keys

    def delete(self, key: str) -> None:
        with self._lock:
            self._objects.pop(check_key(key), None)

    def url(self, key: str) -> str:
        return f"memory://{check_key(key)}"

    def link(self, key: str, *, expires_s: int = 3600) -> str:
        if not self.exists(key):
            raise ObjectNotFound(key)
        return self.url(key)
