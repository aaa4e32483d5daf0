"""C-STORE receiver: a storage SCP that files studies pushed by allow-listed AE titles into an inbox,
and `InboxStudySource`, the StudySource that hands those files to the flows.

Inbox layout: `INBOX/<study hash>/<sop hash>.dcm` (no UIDs in paths); a file appears under its final
name only once it is complete. The callback lets the caller (the flows layer) record each arrival.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from integrations.dimse import (
    EdgePolicy,
    Placement,
    StoreRequest,
    encoded_instance,
    quiet_pynetdicom,
    receiver_choice,
    storage_scp,
)
from integrations.dimse.tls import TlsConfig, server_context
from integrations.errors import ConfigurationError, RetrievalIncomplete
from integrations.pacs import STORAGE_SCP_CLASSES, TRANSFER_SYNTAXES
from integrations.ports import RetrievedStudy, SeriesRef, StudyRef
from integrations.query import uid_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arrival:
    """One instance filed in the inbox (what the receiver's callback is told)."""

    study_instance_uid: str
    sender_ae: str
    study_folder: Path
    received: int  # instances of this study in the inbox now
    study_date: str = ""
    study_time: str = ""
    modality: str = ""
    accession_number: str = ""


def study_folder(inbox: Path, study_instance_uid: str) -> Path:
    return inbox / uid_hash(study_instance_uid)


class StoreReceiver:
    """`with StoreReceiver(...) as r:` listens on `r.port` until the block ends."""

    def __init__(
        self,
        *,
        inbox: Path,
        allowed_aes: Sequence[str],
        ae_title: str = "NIGHTREAD",
        host: str = "127.0.0.1",
        port: int = 0,
        on_arrival: Callable[[Arrival], None] | None = None,
        dimse_receiver: str = "direct",
        timeout_s: float = 60.0,
        allowed_hosts: Sequence[str] = (),
        max_associations: int = 16,
        artim_s: float = 10.0,
        tls: TlsConfig | None = None,
    ) -> None:
        receiver_choice(dimse_receiver)
        if not allowed_aes:
            raise ConfigurationError("the C-STORE receiver needs at least one allowed calling AE title")
        self.inbox = Path(inbox)
        self.allowed = [a.strip() for a in allowed_aes]
        self.ae_title = ae_title
        self.host = host
        self._requested_port = port
        self.on_arrival = on_arrival
        self.dimse_receiver = dimse_receiver
        self.timeout_s = timeout_s
        self.policy = EdgePolicy(
            allowed_aes=frozenset(self.allowed),
            allowed_hosts=frozenset(allowed_hosts) if allowed_hosts else None,
            max_associations=max_associations,
            artim_s=artim_s,
        )
        self.tls = tls  # DICOM TLS: every push arrives over TLS (mutual with tls.require_client_cert)
        self._server: Any = None
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the receiver is not running")
        return int(self._server.server_address[1])

    def __enter__(self) -> StoreReceiver:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        quiet_pynetdicom()
        self.inbox.mkdir(parents=True, exist_ok=True, mode=0o700)
        ssl_context = server_context(self.tls) if self.tls is not None else None
        staging = self.inbox / ".incoming"  # on the inbox's file system: filing is a rename
        if self.dimse_receiver == "direct":
            staging.mkdir(exist_ok=True, mode=0o700)
            for leftover in staging.glob("*.part"):  # from a receiver that was killed mid-instance
                leftover.unlink(missing_ok=True)
        self._server = storage_scp(
            self.dimse_receiver,
            ae_title=self.ae_title,
            host=self.host,
            port=self._requested_port,
            storage_classes=STORAGE_SCP_CLASSES,
            transfer_syntaxes=TRANSFER_SYNTAXES,
            timeout_s=self.timeout_s,
            policy=self.policy,  # anyone else is rejected at association time
            ssl_context=ssl_context,
            place=lambda _request: Placement(staging / f"{uuid.uuid4().hex}.dcm", check=True),
            on_stored=self._on_stored,
            on_store=self._on_store,
        )
        log.info("C-STORE receiver %s on %s:%d accepts %s", self.ae_title, self.host, self.port, self.allowed)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_store(self, event: Any) -> int:
        """pynetdicom's receiver: the instance is in memory, written under a temporary name first."""
        try:
            ds = event.dataset
        except Exception:  # unparseable: refuse this instance, keep serving the others
            log.warning("refused a pushed instance whose dataset could not be parsed")
            return 0xC210

        encoded = encoded_instance(event)
        if encoded is None:
            return 0xA700  # cut short: never filed, never replaces a good copy

        def write(target: Path) -> None:
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(encoded)
                os.replace(tmp, target)
            except OSError:
                Path(tmp).unlink(missing_ok=True)
                raise

        return self._file(ds, str(event.assoc.requestor.ae_title).strip(), write)

    def _on_stored(self, path: Path, request: StoreRequest) -> int:
        """nightread's receiver: the instance is already on disk in the staging folder; its header says
        which study folder it goes into."""
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except Exception:  # unparseable: refuse this instance, keep serving the others
            path.unlink(missing_ok=True)
            log.warning("refused a pushed instance whose dataset could not be parsed")
            return 0xC210
        try:
            return self._file(ds, request.calling_ae, lambda target: os.replace(path, target))
        finally:
            path.unlink(missing_ok=True)  # filed (renamed away) or refused

    def _file(self, ds: Dataset, sender_ae: str, write: Callable[[Path], None]) -> int:
        """File one pushed instance into its study's inbox folder and record the arrival."""
        study_uid = str(ds.get("StudyInstanceUID", ""))
        sop_uid = str(ds.get("SOPInstanceUID", ""))
        if not study_uid or not sop_uid:
            return 0xC211  # no identifiers to file it under
        folder = study_folder(self.inbox, study_uid)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write(folder / f"{uid_hash(sop_uid)}.dcm")
        except OSError:
            log.exception("could not file a pushed instance")
            return 0xA700  # out of resources: the sender may retry
        if self.on_arrival is not None:
            with self._lock:
                received = len(list(folder.glob("*.dcm")))
                arrival = Arrival(
                    study_instance_uid=study_uid,
                    sender_ae=sender_ae,
                    study_folder=folder,
                    received=received,
                    study_date=str(ds.get("StudyDate", "")),
                    study_time=str(ds.get("StudyTime", "")),
                    modality=str(ds.get("Modality", "")),
                    accession_number=str(ds.get("AccessionNumber", "")),
                )
                try:
                    self.on_arrival(arrival)
                except Exception:  # the file is safe in the inbox; the next arrival or run records it
                    log.exception("recording a pushed instance failed")
        return 0x0000


class InboxStudySource:
    """The StudySource of pushed studies: nothing to query; 'retrieval' moves files out of the inbox."""

    def __init__(self, *, name: str, inbox: Path) -> None:
        self.name = name
        self.inbox = Path(inbox)

    def echo(self) -> None:
        if not self.inbox.is_dir():
            raise ConfigurationError(f"inbox {self.inbox} does not exist (is `nightread listen` running here?)")

    def find_studies(self, *, since: dt.datetime | None, modalities: Sequence[str] = ()) -> list[StudyRef]:
        return []  # pushed studies are registered by the receiver as they arrive

    def find_studies_on(
        self, *, date: str, time_range: tuple[str, str] | None = None, modalities: Sequence[str] = ()
    ) -> list[StudyRef]:
        return []  # nothing to query: a push source has no archive

    def find_series(self, study_instance_uid: str) -> list[SeriesRef]:
        return []

    def retrieve_study(self, study_instance_uid: str, *, dest: Path, expected: int | None = None) -> RetrievedStudy:
        folder = study_folder(self.inbox, study_instance_uid)
        files = sorted(folder.glob("*.dcm")) if folder.is_dir() else []
        if expected is not None and len(files) < expected:
            raise RetrievalIncomplete(expected=expected, received=len(files))
        dest.mkdir(parents=True, exist_ok=True)
        copied = []
        for f in files:  # copy, not move: the inbox is removed only after the study is recorded
            target = dest / f.name
            shutil.copyfile(f, target)
            copied.append(target)
        return RetrievedStudy(study_instance_uid, dest, tuple(copied), expected)

    def forget(self, study_instance_uid: str) -> None:
        """Remove a study's inbox folder once its results are recorded."""
        shutil.rmtree(study_folder(self.inbox, study_instance_uid), ignore_errors=True)
