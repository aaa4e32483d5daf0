"""Object storage: LocalObjectStore (a folder) and S3ObjectStore (MinIO SDK, any S3).

Keys are relative, '/'-separated and never contain PHI (the flows build them from hashes).
Writes are atomic: a reader never sees half an object.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import TypeVar

from integrations.errors import ConfigurationError, PermanentError, TransientError

T = TypeVar("T")
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/]{0,511}$")


def check_key(key: str) -> str:
    if not _KEY.match(key) or ".." in key.split("/") or "//" in key or key.endswith("/"):
        raise ValueError(f"invalid object key {key!r}: use relative a/b/c.ext with letters, digits, . _ - /")
    return key


class ObjectNotFound(PermanentError, KeyError):
    def __init__(self, key: str) -> None:
        PermanentError.__init__(self, f"no object with key {key!r}")

    def __str__(self) -> str:  # KeyError would quote the message again
        return str(self.args[0])


class LocalObjectStore:
    """A folder on disk (the embedded default)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _folders(self, folder: Path) -> None:
        """The key's folders under the root, each 0700 (mkdir -p would give the ones above the last the
        default mode); objects are rendered images and reports of patients."""
        if folder.is_dir():
            return
        current = self.root
        for part in folder.relative_to(self.root).parts:
            current = current / part
            with suppress(FileExistsError):
                current.mkdir(mode=0o700)

    def put(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> None:
        path = self._path(key)
        self._folders(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")  # mode 0600
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[str]:
        for path in sorted(self.root.rglob("*")):
            if path.is_file() and not path.name.startswith(".tmp-"):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield key

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def url(self, key: str) -> str:
        return self._path(key).as_uri()

    def link(self, key: str, *, expires_s: int = 3600) -> str:
        """A link a reader can open: the file's URI (a local folder has no expiring links)."""
        if not self.exists(key):
            raise ObjectNotFound(key)
        return self.url(key)


class S3ObjectStore:
    """A bucket on MinIO or any S3 endpoint, through the minio SDK. The bucket is created if missing."""

    def __init__(
        self,
        *,
        endpoint: str,
        bucket: str,
        access_key: str,
        secret_key: str,
        secure: bool = True,
        region: str | None = None,
        create_bucket: bool = True,
    ) -> None:
        from minio import Minio

        if not endpoint or "/" in endpoint.removeprefix("http://").removeprefix("https://"):
            raise ConfigurationError(f"storage endpoint must be host:port, not {endpoint!r}")
        self.bucket = bucket
        self.client = Minio(
            endpoint.removeprefix("http://").removeprefix("https://"),
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
        )
        if create_bucket:
            self._call(self._ensure_bucket)

    def _ensure_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            self.client.make_bucket(self.bucket)

    def _call(self, fn: Callable[[], T], key: str = "") -> T:
        """Run one SDK call, mapping its errors onto ours (`key` names the object in messages)."""
        from minio.error import S3Error
        from urllib3.exceptions import HTTPError

        try:
            return fn()
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise ObjectNotFound(key) from None
            if exc.code in ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"):
                raise TransientError(f"object store busy: {exc.code}") from exc
            raise PermanentError(f"object store refused the request: {exc.code}") from exc
        except (HTTPError, OSError) as exc:
            raise TransientError(f"object store unreachable: {type(exc).__name__}") from exc

    def put(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> None:
        check_key(key)
        self._call(
            lambda: self.client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=content_type)
        )

    def get(self, key: str) -> bytes:
        check_key(key)

        def fetch() -> bytes:
            response = self.client.get_object(self.bucket, key)
            try:
                return bytes(response.read())
            finally:
                response.close()
                response.release_conn()

        return self._call(fetch, key=key)

    def exists(self, key: str) -> bool:
        check_key(key)
        try:
            self._call(lambda: self.client.stat_object(self.bucket, key), key=key)
            return True
        except ObjectNotFound:
            return False

    def list(self, prefix: str = "") -> Iterator[str]:
        objects = self._call(lambda: list(self.client.list_objects(self.bucket, prefix=prefix, recursive=True)))
        yield from sorted(o.object_name for o in objects)

    def delete(self, key: str) -> None:
        check_key(key)
        self._call(lambda: self.client.remove_object(self.bucket, key))

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{check_key(key)}"

    def link(self, key: str, *, expires_s: int = 3600) -> str:
        """A presigned GET URL valid for `expires_s` seconds (at most 7 days, S3's limit)."""
        import datetime as dt

        if not 1 <= expires_s <= 7 * 24 * 3600:
            raise ValueError("a presigned link expires after 1 s to 7 days")
        if not self.exists(key):
            raise ObjectNotFound(key)
        return self._call(
            lambda: self.client.presigned_get_object(
                self.bucket, check_key(key), expires=dt.timedelta(seconds=expires_s)
            ),
            key,
        )
