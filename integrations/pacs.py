"""DIMSE access to a PACS: C-ECHO, C-FIND, C-GET and C-MOVE (with our own storage SCP).

`DimseStudySource` implements the `StudySource` port. Queries and requests go through pynetdicom;
instances are received on the DIMSE edge's streaming path (`integrations.dimse`; or pynetdicom's,
`dimse_receiver="pynetdicom"`).
Every association is a context manager that always releases or aborts. pynetdicom's identifier
logging (PHI) is switched off.
"""

from __future__ import annotations

import datetime as dt
import logging
import multiprocessing as mp
import secrets
import shutil
import tempfile
import threading
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from functools import partial
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, build_role, evt
from pynetdicom import sop_class as sc
from pynetdicom.pdu_primitives import A_ABORT

from integrations import dimse
from integrations.dimse import abort_after, encoded_instance, framing, nightread_ae, quiet_pynetdicom, tune_association
from integrations.dimse.tls import TlsConfig, client_context, server_context
from integrations.errors import PeerRefused, ResultsCapped, RetrievalIncomplete, TransientError
from integrations.ports import RetrievedStudy, SeriesRef, StudyRef
from integrations.query import int_of, series_ref, studies_since, study_ref, text_of, uid_hash

log = logging.getLogger(__name__)

TRANSFER_SYNTAXES: list[UID] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]

# The storage SOP classes a C-GET asks for (C-GET allows at most 128 presentation contexts in all, one
# of them the query model): every image class a study may hold, with the SRs, presentation states and
# documents that travel with it. Instances of any class are filed; selection decides what is rendered
# (a dose SR or a PDF is kept with its study and never rendered).
RETRIEVE_STORAGE_CLASSES: list[UID] = [
    UID(getattr(sc, name))
    for name in (
        "ComputedRadiographyImageStorage",
        "DigitalXRayImageStorageForPresentation",
        "DigitalXRayImageStorageForProcessing",
        "DigitalMammographyXRayImageStorageForPresentation",
        "DigitalMammographyXRayImageStorageForProcessing",
        "DigitalIntraOralXRayImageStorageForPresentation",
        "BreastTomosynthesisImageStorage",
        "BreastProjectionXRayImageStorageForPresentation",
        "CTImageStorage",
        "EnhancedCTImageStorage",
        "LegacyConvertedEnhancedCTImageStorage",
        "MRImageStorage",
        "EnhancedMRImageStorage",
        "EnhancedMRColorImageStorage",
        "LegacyConvertedEnhancedMRImageStorage",
        "UltrasoundImageStorage",
        "UltrasoundMultiFrameImageStorage",
        "EnhancedUSVolumeStorage",
        "SecondaryCaptureImageStorage",
        "MultiFrameSingleBitSecondaryCaptureImageStorage",
        "MultiFrameGrayscaleByteSecondaryCaptureImageStorage",
        "MultiFrameGrayscaleWordSecondaryCaptureImageStorage",
        "MultiFrameTrueColorSecondaryCaptureImageStorage",
        "XRayAngiographicImageStorage",
        "EnhancedXAImageStorage",
        "XRayRadiofluoroscopicImageStorage",
        "EnhancedXRFImageStorage",
        "XRay3DAngiographicImageStorage",
        "XRay3DCraniofacialImageStorage",
        "NuclearMedicineImageStorage",
        "PositronEmissionTomographyImageStorage",
        "EnhancedPETImageStorage",
        "LegacyConvertedEnhancedPETImageStorage",
        "VLEndoscopicImageStorage",
        "VLPhotographicImageStorage",
        "VLMicroscopicImageStorage",
        "VLSlideCoordinatesMicroscopicImageStorage",
        "VLWholeSlideMicroscopyImageStorage",
        "OphthalmicPhotography8BitImageStorage",
        "OphthalmicPhotography16BitImageStorage",
        "BasicTextSRStorage",
        "EnhancedSRStorage",
        "ComprehensiveSRStorage",
        "Comprehensive3DSRStorage",
        "KeyObjectSelectionDocumentStorage",
        "XRayRadiationDoseSRStorage",
        "EnhancedXRayRadiationDoseSRStorage",
        "RadiopharmaceuticalRadiationDoseSRStorage",
        "PatientRadiationDoseSRStorage",
        "AcquisitionContextSRStorage",
        "GrayscaleSoftcopyPresentationStateStorage",
        "ColorSoftcopyPresentationStateStorage",
        "EncapsulatedPDFStorage",
        "SegmentationStorage",
        "RTStructureSetStorage",
        "RTDoseStorage",
        "RTPlanStorage",
        "RTImageStorage",
        "TwelveLeadECGWaveformStorage",
    )
]
# A storage SCP (the C-MOVE destination, `nightread listen`) has no such limit: it accepts every
# storage class pynetdicom knows.
STORAGE_SCP_CLASSES: list[UID] = [UID(cx.abstract_syntax) for cx in AllStoragePresentationContexts]


class AbortWatch:
    """How an association ended, as far as the peer told us: whether an A-ABORT PDU came from it
    (`peer_aborted`) and how many DIMSE messages it had answered before (`answers`). An A-P-ABORT
    (the connection lost or reset) or our own abort on a timeout leaves `peer_aborted` False."""

    def __init__(self) -> None:
        self.peer_aborted = False
        self.answers = 0

    def _acse(self, event: Any) -> None:
        if isinstance(event.primitive, A_ABORT):
            self.peer_aborted = True

    def _dimse(self, event: Any) -> None:
        self.answers += 1

    def handlers(self) -> list[tuple[Any, Callable[[Any], None]]]:
        return [(evt.EVT_ACSE_RECV, self._acse), (evt.EVT_DIMSE_RECV, self._dimse)]

    def settle(self, assoc: Any) -> None:
        """Once a request ended without a status: let the association's own thread take what ended it
        off the queue (an A-ABORT fires EVT_ACSE_RECV there), briefly, so `peer_aborted` is known."""
        with suppress(Exception):  # pynetdicom internals: a peek that fails only means "not known"
            if assoc.acse.is_aborted("a-abort"):
                self.peer_aborted = True
                return
        if assoc.is_alive():
            assoc.join(timeout=2.0)

    @property
    def refused(self) -> bool:
        """The peer aborted before answering anything: what a PACS such as Orthanc does to a caller it
        does not know (permanent); an abort after answers, or a lost connection, may pass (transient)."""
        return self.peer_aborted and self.answers == 0


@contextmanager
def association(ae: AE, *, host: str, port: int, called_ae: str, **kwargs: Any) -> Iterator[Any]:
    """An established association, released (or aborted on error) when the block ends. The association
    carries an `AbortWatch` (`watch_of(assoc)`) for telling a refusal from a lost connection."""
    watch = AbortWatch()
    kwargs["evt_handlers"] = [*kwargs.get("evt_handlers", []), *watch.handlers()]
    try:
        assoc = ae.associate(host, port, ae_title=called_ae, **kwargs)
    except OSError as exc:  # pragma: no cover - pynetdicom reports most failures via assoc state
        raise TransientError(f"cannot connect to PACS {called_ae} at {host}:{port}: {exc}") from exc
    if not assoc.is_established:
        if assoc.is_rejected:
            rejection = getattr(getattr(assoc, "acceptor", None), "primitive", None)
            if getattr(rejection, "result", None) == 0x02:  # rejected-transient: e.g. too many associations
                raise TransientError(f"PACS {called_ae} at {host}:{port} is busy (association rejected, transient)")
            raise PeerRefused(
                f"PACS {called_ae} at {host}:{port} rejected the association "
                f"(check the called AE title and that our AE title is known to it)"
            )
        hint = "; with TLS, check both sides' certificates" if kwargs.get("tls_args") else ""
        raise TransientError(f"cannot associate with PACS {called_ae} at {host}:{port} (no answer or aborted{hint})")
    tune_association(assoc)
    _WATCHES[assoc] = watch
    ok = False
    try:
        yield assoc
        ok = True
    finally:
        if assoc.is_established:
            if ok:
                assoc.release()
            else:
                assoc.abort()


_WATCHES: weakref.WeakKeyDictionary[Any, AbortWatch] = weakref.WeakKeyDictionary()


def watch_of(assoc: Any) -> AbortWatch | None:
    return _WATCHES.get(assoc)


def _status_error(operation: str, status: Dataset, called_ae: str, calling_ae: str, assoc: Any = None) -> Exception:
    if "Status" not in status:
        watch = watch_of(assoc) if assoc is not None else None
        if watch is not None:
            watch.settle(assoc)
        if watch is not None and not watch.refused:
            how = "aborted it" if watch.peer_aborted else "the connection was lost or went silent"
            return TransientError(f"{operation} with PACS {called_ae} ended without a status ({how})")
        return PeerRefused(
            f"PACS {called_ae} aborted the association during {operation} without a status; "
            f"PACS such as Orthanc do this when the calling AE title {calling_ae!r} is not declared "
            f"among their DICOM modalities"
        )
    code = int(status.Status)
    if code in (0xA701, 0xA702, 0xA700):
        return TransientError(f"{operation} failed: PACS {called_ae} is out of resources (0x{code:04X})")
    if code == 0xA801:
        return PeerRefused(f"{operation} failed: PACS {called_ae} does not know the move destination (0xA801)")
    return PeerRefused(f"{operation} failed with status 0x{code:04X} from PACS {called_ae}")


def _file_name(sop_uid: str) -> str:
    """A received instance's file name: no UIDs in it."""
    return f"{uid_hash(sop_uid)}.dcm"


def _write_instance(event: Any, folder: Path, sop_uid: str) -> int:
    """File one received instance as it was encoded, under a name without UIDs."""
    encoded = encoded_instance(event)
    if encoded is None:
        return framing.OUT_OF_RESOURCES
    with (folder / _file_name(sop_uid)).open("wb") as fh:
        fh.write(encoded)
    return 0x0000


def _store_into(folder: Path, event: Any) -> int:
    """C-STORE handler of one C-GET association: everything it receives belongs in `folder`; the SOP
    Instance UID comes from the request, so the dataset is never decoded here."""
    sop_uid = str(event.request.AffectedSOPInstanceUID or "")
    if not sop_uid:
        return 0xC211
    return _write_instance(event, folder, sop_uid)


def _chunks(items: Sequence[str], n: int) -> list[list[str]]:
    size = -(-len(items) // n)
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


class _StoreSink:
    """Writes received instances into the folder registered for their study."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._folders: dict[str, tuple[Path, int]] = {}  # study UID -> (folder, retrievals under way)
        self._moves: dict[int, tuple[Path, str]] = {}  # our C-MOVE's Message ID -> (folder, study UID)
        self.rejected = 0
        self.ae_title = ""  # ours, as the PACS names it in Move Originator AE Title
        self.staging: Path | None = None  # instances of unknown origin wait here (made with the SCP, gone on close)

    def register(self, study_uid: str, folder: Path) -> None:
        with self._lock:
            known, count = self._folders.get(study_uid, (folder, 0))
            if count and known != folder:
                raise RuntimeError("the same study is being moved into two folders at once")
            self._folders[study_uid] = (folder, count + 1)

    def unregister(self, study_uid: str) -> None:
        with self._lock:
            folder, count = self._folders.get(study_uid, (None, 0))
            if count <= 1:
                self._folders.pop(study_uid, None)
            elif folder is not None:
                self._folders[study_uid] = (folder, count - 1)

    def handle(self, event: Any) -> int:
        try:
            ds = event.dataset
            study_uid = str(ds.get("StudyInstanceUID", ""))
            sop_uid = str(ds.get("SOPInstanceUID", ""))
        except Exception:  # a dataset pydicom cannot even parse: refuse it, do not crash the SCP
            log.warning("refused an instance whose dataset could not be parsed")
            return 0xC210
        folder = self._folder_of(study_uid)
        if folder is None or not sop_uid:
            return 0xA700  # not a study we asked for
        return _write_instance(event, folder, sop_uid)

    def _folder_of(self, study_uid: str) -> Path | None:
        """The folder of a study a retrieval under way asked for; None (and counted) for any other."""
        with self._lock:
            folder = self._folders.get(study_uid, (None, 0))[0]
            if folder is None:
                self.rejected += 1
            return folder

    def expect(self, folder: Path, study_uid: str) -> int:
        """A random Message ID, unique among our C-MOVEs under way, for a C-MOVE of `study_uid`: the
        instances sent on its behalf go straight into `folder` (those of another study are refused)."""
        with self._lock:
            while True:
                message_id = 1 + secrets.randbelow(0xFFFF)
                if message_id not in self._moves:
                    self._moves[message_id] = (folder, study_uid)
                    return message_id

    def forget(self, message_id: int) -> None:
        with self._lock:
            self._moves.pop(message_id, None)

    def place(self, request: dimse.StoreRequest) -> dimse.Placement:
        """For nightread's own storage SCP: an instance a PACS sends for one of our C-MOVEs (Move
        Originator AE title and Message ID, PS3.7 9.1.1.1) is written straight into that retrieval's
        folder if its header names the study that C-MOVE asked for; anything else into the staging
        folder, filed by its header once complete."""
        with self._lock:
            ours = request.move_originator_ae == self.ae_title and request.move_originator_id is not None
            move = self._moves.get(request.move_originator_id or 0) if ours else None
        if move is not None and request.sop_instance:
            folder, study_uid = move
            return dimse.Placement(folder / _file_name(request.sop_instance), study=study_uid)
        assert self.staging is not None
        return dimse.Placement(self.staging / f"{uuid.uuid4().hex}.dcm", check=True)

    def file(self, path: Path, request: dimse.StoreRequest) -> int:
        """A complete file in the staging folder goes into its study's folder (read from its header),
        or is deleted if no retrieval under way asked for its study."""
        sop_uid = request.sop_instance
        try:
            study_uid = str(dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]).StudyInstanceUID)
        except Exception:  # not a dataset pydicom can read: refuse it, do not crash the SCP
            path.unlink(missing_ok=True)
            log.warning("refused an instance whose dataset could not be parsed")
            return 0xC210
        folder = self._folder_of(study_uid)
        if folder is None:
            path.unlink(missing_ok=True)
            return 0xA700  # not a study we asked for
        try:
            shutil.move(path, folder / _file_name(sop_uid))  # a rename when both are on one file system
        except OSError as exc:
            path.unlink(missing_ok=True)
            log.warning("could not file a received instance: %s", exc.strerror or type(exc).__name__)
            return 0xA700
        return 0x0000


def _c_get_in_worker(config: dict[str, Any], identifier: Dataset, dest: str, deadline_s: float | None) -> None:
    """One C-GET in a worker process (module level, so a spawned process can import it)."""
    source = DimseStudySource(**config, retrieve="get", parallel=1)
    source._c_get(identifier, dest=Path(dest), deadline_s=deadline_s)


class DimseStudySource:
    """A PACS reached over DIMSE. Use as a context manager when retrieving by C-MOVE."""

    def __init__(
        self,
        *,
        name: str,
        host: str,
        port: int,
        called_ae: str,
        calling_ae: str = "NIGHTREAD",
        retrieve: str = "get",
        move_port: int = 0,
        timeout_s: float = 30.0,
        parallel: int = 1,
        dimse_receiver: str = "direct",
        move_bind_host: str = "",
        move_allowed_aes: Sequence[str] = (),
        move_allowed_hosts: Sequence[str] = (),
        tls: TlsConfig | None = None,
        stop: threading.Event | None = None,
        staging_root: Path | None = None,
        deadline_base_s: float | None = None,
        deadline_per_instance_s: float = 0.0,
        query_deadline_s: float = 300.0,
        association_gate: Callable[[], AbstractContextManager[Any]] | None = None,
        query_gate: Callable[[], None] | None = None,
    ) -> None:
        """`stop`: set, it ends a direct C-GET at its next PDU (Interrupted). `staging_root`: where the
        C-MOVE destination stages stray instances (default: the system's temporary folder).
        `deadline_base_s` + `deadline_per_instance_s` × the instances expected: how long one study's
        retrieval may take in all, however slowly the PACS sends (None: no deadline).
        `query_deadline_s`: how long one query (C-FIND, C-ECHO, C-STORE) may take in all: a read times
        out after `timeout_s` of silence, but a PACS that drips, or stalls inside a PDU, is cut off here.
        `association_gate`: held around every association with the PACS (a slot of a shared limit);
        `query_gate`: called before every query (a rate limit)."""
        if retrieve not in ("get", "move"):
            raise ValueError(f'retrieve must be "get" or "move", not {retrieve!r}')
        self.dimse_receiver = dimse.receiver_choice(dimse_receiver)
        self.move_bind_host = move_bind_host or ("127.0.0.1" if host in ("127.0.0.1", "localhost") else "0.0.0.0")
        # who may send us C-MOVE sub-operations: the PACS's AE title (and any other it sends from)
        self.move_allowed_aes = frozenset([called_ae, *move_allowed_aes])
        self.move_allowed_hosts = frozenset(move_allowed_hosts) if move_allowed_hosts else None
        self.tls = tls  # DICOM TLS for every association with this PACS, and for our C-MOVE SCP
        self._tls_client: Any = None
        self.stop = stop
        self.staging_root = staging_root
        self.deadline_base_s, self.deadline_per_instance_s = deadline_base_s, deadline_per_instance_s
        self._association_gate, self._query_gate = association_gate, query_gate
        self.name = name
        self.host, self.port = host, port
        self.called_ae, self.calling_ae = called_ae, calling_ae
        self.retrieve = retrieve
        self.timeout_s = timeout_s
        self.query_deadline_s = query_deadline_s
        if parallel < 1:
            raise ValueError("parallel must be at least 1")
        self.parallel = parallel
        self._move_port = move_port
        self._move_server: Any = None
        self._sink = _StoreSink()
        self._pool: ProcessPoolExecutor | None = None
        self._server_lock = threading.Lock()

    # --- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> DimseStudySource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._server_lock:
            if self._move_server is not None:
                self._move_server.shutdown()
                self._move_server = None
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            if self._sink.staging is not None:
                shutil.rmtree(self._sink.staging, ignore_errors=True)
                self._sink.staging = None

    def _process_pool(self) -> ProcessPoolExecutor:
        """Worker processes for parallel C-GET (started once, kept until close())."""
        with self._server_lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(max_workers=self.parallel, mp_context=mp.get_context("spawn"))
            return self._pool

    def _worker_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "host": self.host,
            "port": self.port,
            "called_ae": self.called_ae,
            "calling_ae": self.calling_ae,
            "timeout_s": self.timeout_s,
            "dimse_receiver": self.dimse_receiver,
            "tls": self.tls,
            "deadline_base_s": self.deadline_base_s,
            "deadline_per_instance_s": self.deadline_per_instance_s,
        }

    def _ae(self) -> AE:
        quiet_pynetdicom()
        ae = nightread_ae(self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.maximum_pdu_size = 0
        return ae

    def _client_tls(self) -> Any:
        """The TLS context of our associations with this PACS (None without TLS), made once."""
        if self.tls is not None and self._tls_client is None:
            self._tls_client = client_context(self.tls)
        return self._tls_client

    def _gate(self) -> AbstractContextManager[Any]:
        """A slot of the PACS's association limit, held while an association lasts (none: no limit)."""
        return self._association_gate() if self._association_gate is not None else nullcontext()

    @contextmanager
    def _connect(self, ae: AE, **kwargs: Any) -> Iterator[Any]:
        tls = self._client_tls()
        if tls is not None:
            kwargs["tls_args"] = (tls, self.host)
        with self._gate(), association(ae, host=self.host, port=self.port, called_ae=self.called_ae, **kwargs) as assoc:
            yield assoc

    @contextmanager
    def _query(self, ae: AE, operation: str) -> Iterator[Any]:
        """An association for one query, aborted when `query_deadline_s` has passed (then TransientError)."""
        with self._connect(ae) as assoc, abort_after(assoc, self.query_deadline_s) as passed:
            try:
                yield assoc
            except (TransientError, PeerRefused):
                if passed.is_set():
                    raise self._too_slow(operation) from None
                raise
            if passed.is_set():
                raise self._too_slow(operation)

    def _too_slow(self, operation: str) -> TransientError:
        return TransientError(
            f"{operation} with PACS {self.called_ae} did not finish within "
            f"{self.query_deadline_s:.0f} s (query deadline)"
        )

    # --- verification and query ----------------------------------------------------------------------
    def echo(self) -> None:
        ae = self._ae()
        ae.add_requested_context(sc.Verification)
        with self._query(ae, "C-ECHO") as assoc:
            status = assoc.send_c_echo()
            if "Status" not in status or int(status.Status) != 0:
                raise _status_error("C-ECHO", status, self.called_ae, self.calling_ae, assoc)

    def store_instances(self, datasets: Sequence[Dataset]) -> None:
        """C-STORE our own objects (the SR) to the PACS; a refusal names the status."""
        ae = self._ae()
        for sop_class in {str(ds.SOPClassUID) for ds in datasets}:
            ae.add_requested_context(sop_class, [str(ds.file_meta.TransferSyntaxUID) for ds in datasets][:1])
        with self._query(ae, "C-STORE") as assoc:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                if "Status" not in status or int(status.Status) not in (0x0000, 0xB000, 0xB007, 0xB006):
                    raise _status_error("C-STORE", status, self.called_ae, self.calling_ae, assoc)

    def _find(self, identifier: Dataset) -> list[Dataset]:
        if self._query_gate is not None:
            self._query_gate()
        ae = self._ae()
        ae.add_requested_context(sc.StudyRootQueryRetrieveInformationModelFind)
        out: list[Dataset] = []
        with self._query(ae, "C-FIND") as assoc:
            for status, ds in assoc.send_c_find(identifier, sc.StudyRootQueryRetrieveInformationModelFind):
                if "Status" not in status:
                    raise _status_error("C-FIND", status, self.called_ae, self.calling_ae, assoc)
                code = int(status.Status)
                if code in (0xFF00, 0xFF01):
                    if ds is not None:
                        out.append(ds)
                elif code == 0xFE00:  # "cancelled", though we never cancel: the PACS's result cap
                    raise ResultsCapped(operation=f"C-FIND at PACS {self.called_ae}", partial=out)
                elif code != 0x0000:
                    raise _status_error("C-FIND", status, self.called_ae, self.calling_ae, assoc)
        return out

    def _studies(self, date: str, time: str, modalities: Sequence[str], since: dt.datetime | None) -> list[StudyRef]:
        """A study-level C-FIND as refs; a capped answer raises ResultsCapped with the refs it holds."""
        try:
            answers = self._study_query(date, time, modalities)
        except ResultsCapped as capped:
            partial = studies_since((study_ref(ds) for ds in capped.partial), since=since, modalities=modalities)
            raise ResultsCapped(operation=f"C-FIND at PACS {self.called_ae}", partial=partial) from None
        return studies_since((study_ref(ds) for ds in answers), since=since, modalities=modalities)

    def _study_query(
        self, date: str, time: str, modalities: Sequence[str], study_instance_uid: str = ""
    ) -> list[Dataset]:
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = study_instance_uid
        q.StudyDate = date
        q.StudyTime = time
        q.AccessionNumber = ""
        q.StudyDescription = ""
        q.ModalitiesInStudy = modalities[0] if len(modalities) == 1 else ""
        q.NumberOfStudyRelatedInstances = ""
        return self._find(q)

    def find_studies(self, *, since: dt.datetime | None, modalities: Sequence[str] = ()) -> list[StudyRef]:
        return self._studies(f"{since:%Y%m%d}-" if since else "", "", modalities, since)

    def find_study(self, study_instance_uid: str) -> StudyRef | None:
        """One study by its UID (a study a change feed named), or None when the PACS does not know it."""
        found = [study_ref(ds) for ds in self._study_query("", "", (), study_instance_uid)]
        return next((r for r in found if r.study_instance_uid == study_instance_uid), None)

    def find_studies_on(
        self, *, date: str, time_range: tuple[str, str] | None = None, modalities: Sequence[str] = ()
    ) -> list[StudyRef]:
        """Studies of one day (YYYYMMDD), optionally within StudyTime HHMMSS-HHMMSS (backfill windows)."""
        return self._studies(date, f"{time_range[0]}-{time_range[1]}" if time_range else "", modalities, None)

    def find_series(self, study_instance_uid: str) -> list[SeriesRef]:
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_instance_uid
        q.SeriesInstanceUID = ""
        q.Modality = ""
        q.SeriesNumber = ""
        q.SeriesDescription = ""
        q.BodyPartExamined = ""
        q.NumberOfSeriesRelatedInstances = ""
        return [series_ref(ds) for ds in self._find(q)]

    # --- retrieval -----------------------------------------------------------------------------------
    def retrieve_study(self, study_instance_uid: str, *, dest: Path, expected: int | None = None) -> RetrievedStudy:
        """The whole study into `dest`. With `parallel` > 1 and enough instances, the study is split by
        SOP Instance UID over that many associations at once (the PACS sends while we write)."""
        dest.mkdir(parents=True, exist_ok=True)
        identifiers = [self._identifier(study_instance_uid)]
        if self.parallel > 1 and (expected is None or expected >= 2 * self.parallel):
            try:
                sops = self._instance_uids(study_instance_uid)
            except ResultsCapped:  # the PACS will not list every instance: retrieve the study whole
                sops = []
            if len(sops) >= 2 * self.parallel:
                identifiers = [self._identifier(study_instance_uid, chunk) for chunk in _chunks(sops, self.parallel)]
        if self.retrieve == "move":
            self._sink.register(study_instance_uid, dest)
        deadline_s = self.deadline_s(expected)
        try:
            if len(identifiers) == 1:
                if self.retrieve == "move":
                    self._c_move(identifiers[0], dest, deadline_s)
                else:
                    self._c_get(identifiers[0], dest=dest, deadline_s=deadline_s)
            elif self.retrieve == "move":  # the PACS sends to our storage SCP: requests can go from threads
                with ThreadPoolExecutor(max_workers=len(identifiers), thread_name_prefix="c-move") as threads:
                    for future in [threads.submit(self._c_move, ident, dest, deadline_s) for ident in identifiers]:
                        future.result()
            else:  # C-GET receives in the requesting process: worker processes, so Python is not the bottleneck
                pool = self._process_pool()
                config = self._worker_config()

                def gated(ident: Dataset) -> None:  # each worker's association holds its own slot
                    with self._gate():
                        pool.submit(_c_get_in_worker, config, ident, str(dest), deadline_s).result()

                with ThreadPoolExecutor(max_workers=len(identifiers), thread_name_prefix="c-get") as threads:
                    for future in [threads.submit(gated, ident) for ident in identifiers]:
                        future.result()
        finally:
            if self.retrieve == "move":
                self._sink.unregister(study_instance_uid)
        files = tuple(sorted(dest.glob("*.dcm")))
        if expected is not None and len(files) < expected:
            raise RetrievalIncomplete(expected=expected, received=len(files))
        return RetrievedStudy(study_instance_uid, dest, files, expected)

    def _identifier(self, study_instance_uid: str, sop_uids: Sequence[str] = ()) -> Dataset:
        q = Dataset()
        q.QueryRetrieveLevel = "IMAGE" if sop_uids else "STUDY"
        q.StudyInstanceUID = study_instance_uid
        if sop_uids:
            q.SeriesInstanceUID = ""
            q.SOPInstanceUID = list(sop_uids)  # UID list matching
        return q

    def _instance_uids(self, study_instance_uid: str) -> list[str]:
        q = Dataset()
        q.QueryRetrieveLevel = "IMAGE"
        q.StudyInstanceUID = study_instance_uid
        q.SeriesInstanceUID = ""
        q.SOPInstanceUID = ""
        return sorted({text_of(ds, "SOPInstanceUID") for ds in self._find(q)} - {""})

    def _check_final(self, operation: str, final: Dataset | None) -> None:
        if final is None:
            raise TransientError(f"{operation}: PACS {self.called_ae} sent no final status")
        if "Status" not in final:
            raise _status_error(operation, final, self.called_ae, self.calling_ae)
        code = int(final.Status)
        failed = int_of(final, "NumberOfFailedSuboperations") or 0
        if code == 0x0000 or (code == 0xB000 and failed == 0):
            return
        if code == 0xB000:
            log.warning("%s finished with %d failed sub-operations", operation, failed)
            return  # the instance count check decides whether the study is complete
        raise _status_error(operation, final, self.called_ae, self.calling_ae)

    def deadline_s(self, expected: int | None) -> float | None:
        """How long the retrieval of a study of `expected` instances may take in all."""
        if self.deadline_base_s is None:
            return None
        return self.deadline_base_s + self.deadline_per_instance_s * (expected or 0)

    def _c_get(self, identifier: Dataset, *, dest: Path, deadline_s: float | None = None) -> None:
        if self.dimse_receiver == "direct":
            with self._gate():
                final = dimse.c_get(
                    host=self.host,
                    port=self.port,
                    called_ae=self.called_ae,
                    calling_ae=self.calling_ae,
                    identifier=identifier,
                    dest=dest,
                    file_name=_file_name,
                    storage_classes=RETRIEVE_STORAGE_CLASSES,
                    transfer_syntaxes=TRANSFER_SYNTAXES,
                    timeout_s=self.timeout_s,
                    tls=self._client_tls(),
                    stop=self.stop,
                    deadline_s=deadline_s,
                )
            self._check_final("C-GET", final)
            return
        ae = self._ae()
        ae.add_requested_context(sc.StudyRootQueryRetrieveInformationModelGet)
        roles = []
        for sop_class in RETRIEVE_STORAGE_CLASSES:
            ae.add_requested_context(sop_class, TRANSFER_SYNTAXES)
            roles.append(build_role(sop_class, scp_role=True))
        handlers = [(evt.EVT_C_STORE, partial(_store_into, dest))]
        final = None
        with (
            self._connect(ae, ext_neg=roles, evt_handlers=handlers) as assoc,
            abort_after(assoc, deadline_s) as passed,
        ):
            for status, _ in assoc.send_c_get(identifier, sc.StudyRootQueryRetrieveInformationModelGet):
                if passed.is_set():
                    break
                if "Status" not in status:
                    raise _status_error("C-GET", status, self.called_ae, self.calling_ae, assoc)
                if int(status.Status) not in (0xFF00, 0xFF01):
                    final = status
        if passed.is_set():
            raise TransientError(f"C-GET from PACS {self.called_ae} did not finish within {deadline_s:.0f} s")
        self._check_final("C-GET", final)

    def _ensure_move_server(self) -> None:
        with self._server_lock:
            if self._move_server is not None:
                return
            scp_tls = server_context(self.tls) if self.tls is not None else None
            if self.dimse_receiver == "direct":
                self._sink.ae_title = self.calling_ae
                if self.staging_root is not None:
                    self.staging_root.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._sink.staging = Path(tempfile.mkdtemp(prefix="nightread-move-", dir=self.staging_root))
            self._move_server = dimse.storage_scp(
                self.dimse_receiver,
                ae_title=self.calling_ae,
                host=self.move_bind_host,
                port=self._move_port,
                storage_classes=STORAGE_SCP_CLASSES,
                transfer_syntaxes=TRANSFER_SYNTAXES,
                timeout_s=self.timeout_s,
                policy=dimse.EdgePolicy(allowed_aes=self.move_allowed_aes, allowed_hosts=self.move_allowed_hosts),
                ssl_context=scp_tls,
                place=self._sink.place,
                on_stored=self._sink.file,
                on_store=self._sink.handle,
            )

    @property
    def move_port(self) -> int:
        """The port our storage SCP listens on for C-MOVE (started on first use)."""
        self._ensure_move_server()
        return int(self._move_server.server_address[1])

    def _c_move(self, identifier: Dataset, dest: Path, deadline_s: float | None = None) -> None:
        self._ensure_move_server()
        ae = self._ae()
        ae.add_requested_context(sc.StudyRootQueryRetrieveInformationModelMove)
        final = None
        message_id = self._sink.expect(dest, str(identifier.get("StudyInstanceUID", "") or ""))
        try:
            with self._connect(ae) as assoc, abort_after(assoc, deadline_s) as passed:
                for status, _ in assoc.send_c_move(
                    identifier, self.calling_ae, sc.StudyRootQueryRetrieveInformationModelMove, msg_id=message_id
                ):
                    if passed.is_set():
                        break
                    if "Status" not in status:
                        raise _status_error("C-MOVE", status, self.called_ae, self.calling_ae, assoc)
                    if int(status.Status) not in (0xFF00, 0xFF01):
                        final = status
        finally:
            self._sink.forget(message_id)
        if passed.is_set():
            raise TransientError(f"C-MOVE from PACS {self.called_ae} did not finish within {deadline_s:.0f} s")
        self._check_final("C-MOVE", final)
