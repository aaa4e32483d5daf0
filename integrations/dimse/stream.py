"""DIMSE retrieval on one thread per association: C-GET (we ask, and receive the C-STORE sub-operations
on the same association) and the storage SCP that C-MOVE sends to and `nightread listen` runs, each
instance streamed to disk as its fragments arrive.

pynetdicom hands every PDU from its reactor thread to a queue, then to the DIMSE thread, reassembles
each instance in memory and only then calls the C-STORE handler, which answers through the same
threads: about 6 ms per instance and 20 µs per PDU on loopback here, where dcmtk's getscu needs
1.6 ms. This module keeps pynetdicom's encoders and decoders for what is negotiated or sent once (the
A-ASSOCIATE-RQ/AC PDUs, the C-GET request, the final C-GET response), and does the per-instance path
by hand (`framing`): PDU headers, PDV items, the command elements of a C-STORE request, the C-STORE
and C-ECHO responses and the File Meta Information, and the data set's fragments written straight
into the instance's file.

Each instance is filed as a DICOM file (preamble, File Meta Information from the request and the
presentation context, the data set as sent), first under `<name>.part` and renamed when its last
fragment is in and its structure has been walked to the end (`framing.check_dataset`): an instance
cut short is refused with 0xA700 and never replaces a good copy. Every PDU, PDV item and command set
is bounded before it is buffered; a protocol violation A-ABORTs the association (`ProtocolError`, not
retried). As acceptor, a connection has `artim_s` to complete its A-ASSOCIATE-RQ; connections that
have not associated yet are bounded apart from the associations, so idle sockets cannot hold the
association limit, and no connection past both bounds gets a thread.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import lru_cache
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, build_role
from pynetdicom.dimse_messages import C_GET_RQ
from pynetdicom.dimse_primitives import C_GET
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

from integrations.dimse import framing as f
from integrations.dimse.tls import wrap_client
from integrations.errors import Interrupted, PeerRefused, ProtocolError, TransientError

log = logging.getLogger(__name__)

APPLICATION_CONTEXT = UID("1.2.840.10008.3.1.1.1")
STUDY_ROOT_GET = UID("1.2.840.10008.5.1.4.1.2.2.3")
VERIFICATION = "1.2.840.10008.1.1"
_READ_BUFFER = 1 << 20
_WRITE_BUFFER = 1 << 20


@dataclass(frozen=True)
class StoreRequest:
    """What a C-STORE request says about the instance that follows (no patient data)."""

    sop_class: str
    sop_instance: str
    calling_ae: str = ""  # the AE title that sent it (storage SCP)
    move_originator_ae: str = ""  # set by a PACS sending on behalf of a C-MOVE
    move_originator_id: int | None = None  # that C-MOVE's Message ID


@dataclass(frozen=True)
class Placement:
    """Where an instance is written; with `check`, the complete file goes to `on_stored` to be filed.
    With `study`, an instance of another study (by its header) is refused and not kept."""

    path: Path
    check: bool = False
    study: str = ""


class _Incoming:
    """One instance being received: its file, opened on the C-STORE-RQ, closed on the last fragment.
    With `refuse` set, nothing is filed and that status is answered once the data set has arrived."""

    def __init__(
        self,
        *,
        placement: Placement,
        request: StoreRequest,
        message_id: int,
        context_id: int,
        transfer_syntax: str,
        refuse: int | None = None,
    ) -> None:
        self.path, self.check, self.study = placement.path, placement.check, placement.study
        self.part = self.path.with_name(self.path.name + ".part")
        self.request, self.message_id, self.context_id = request, message_id, context_id
        self.transfer_syntax = transfer_syntax
        self.status = refuse
        self.fh: BinaryIO | None = None
        self.data_start = 0
        if refuse is not None:
            return
        try:
            self.fh = self.part.open("wb", buffering=_WRITE_BUFFER)
            header = f.file_header(request.sop_class, request.sop_instance, transfer_syntax)
            self.fh.write(header)
            self.data_start = len(header)
        except OSError as exc:  # a full or read-only disk: refuse the instance, keep the association
            self._fail(exc)

    def write(self, fragment: memoryview) -> None:
        if self.fh is not None:
            try:
                self.fh.write(fragment)
            except OSError as exc:
                self._fail(exc)

    def finish(self) -> int:
        """Close, check that the data set is whole (and of the study asked for), rename; the C-STORE
        status to answer."""
        if self.fh is not None:
            try:
                self.fh.close()
                self.fh = None
                refusal = self._check()
                if refusal is not None:
                    self.status = refusal
                    self.discard()
                else:
                    os.replace(self.part, self.path)
            except OSError as exc:
                self._fail(exc)
        return 0x0000 if self.status is None else self.status

    def _check(self) -> int | None:
        with self.part.open("rb") as fh:
            end = os.fstat(fh.fileno()).st_size
            try:
                found = f.check_dataset(fh, start=self.data_start, end=end, transfer_syntax=self.transfer_syntax)
            except f.IncompleteDataset as exc:
                log.warning("refused an incomplete instance from %s: %s", self.request.calling_ae or "a PACS", exc)
                return f.OUT_OF_RESOURCES
        if found.sop_instance_uid and found.sop_instance_uid != self.request.sop_instance:
            log.warning("refused an instance whose SOP Instance UID differs from its C-STORE request")
            return f.CANNOT_UNDERSTAND
        if self.study and found.study_instance_uid != self.study:
            log.warning("refused an instance of a study this retrieval did not ask for")
            return f.OUT_OF_RESOURCES
        return None

    def discard(self) -> None:
        if self.fh is not None:
            with suppress(OSError):
                self.fh.close()
            self.fh = None
        with suppress(OSError):
            self.part.unlink(missing_ok=True)

    def _fail(self, exc: OSError) -> None:
        self.status = f.OUT_OF_RESOURCES
        log.warning("could not file a received instance: %s", exc.strerror or type(exc).__name__)
        self.discard()


class _Association:
    """An association on a plain socket, requested (C-GET) or accepted (storage SCP); every call blocks
    on the calling thread. `peer` names the other side in errors: its AE title, never a patient."""

    def __init__(self, sock: socket.socket, *, peer: str, where: str) -> None:
        self.sock = sock
        self._reader: Any = None  # a buffered reader, made on first use: the request may be read unbuffered
        self.peer, self.where = peer, where
        self.max_send = 0  # the peer's maximum PDU length (0: unlimited)
        self.transfer_syntax: dict[int, str] = {}  # accepted context id -> transfer syntax
        self.established = False  # an A-ABORT only means something on an established association

    @property
    def reader(self) -> Any:
        if self._reader is None:
            self._reader = self.sock.makefile("rb", buffering=_READ_BUFFER)
        return self._reader

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise TransientError(f"connection to {self.peer} at {self.where} lost: {exc}") from exc

    def _read(self, n: int, deadline: float | None) -> bytes:
        """n bytes (fewer only when the peer closed); with a deadline, read unbuffered and give up when it
        passes however the bytes trickle in (ARTIM)."""
        if deadline is None:
            read: bytes = self.reader.read(n)
            return read
        data = bytearray()
        while len(data) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            chunk = self.sock.recv(min(n - len(data), 1 << 16))
            if not chunk:
                break
            data += chunk
        return bytes(data)

    def read_pdu(self, *, deadline: float | None = None) -> tuple[int, bytes]:
        """One PDU: its header's length is checked against what may come now (framing.check_pdu_header)
        before the body is read, so a peer cannot make us buffer more than the negotiated maximum."""
        try:
            header = self._read(6, deadline)
            if len(header) < 6:
                raise TransientError(f"{self.peer} at {self.where} closed the connection")
            pdu_type, length = f.check_pdu_header(header, established=self.established)
            body = self._read(length, deadline) if length else b""
        except TimeoutError as exc:
            if deadline is not None:
                raise TransientError(f"{self.peer} at {self.where} sent no whole association request in time") from exc
            raise TransientError(
                f"no answer from {self.peer} at {self.where} within {self.sock.gettimeout()} s"
            ) from exc
        except OSError as exc:
            raise TransientError(f"connection to {self.peer} at {self.where} lost: {exc}") from exc
        if len(body) < length:
            raise TransientError(f"{self.peer} at {self.where} closed the connection")
        return pdu_type, body

    def send_message(self, message: Any, context_id: int) -> None:
        for pdata in message.encode_msg(context_id, self.max_send):  # fragments fit the peer's PDV list limit
            pdu = P_DATA_TF()
            pdu.from_primitive(pdata)
            self.send(pdu.encode())

    def request(self, request: bytes, proposed: dict[int, str]) -> None:
        """As requestor: send the A-ASSOCIATE-RQ, read the answer, keep the accepted contexts."""
        self.send(request)
        pdu_type, body = self.read_pdu()
        if pdu_type == f.ASSOCIATE_RJ:
            result = body[1] if len(body) > 1 else 1
            if result == 0x02:
                raise TransientError(f"{self.peer} at {self.where} is busy (association rejected, transient)")
            raise PeerRefused(
                f"{self.peer} at {self.where} rejected the association "
                f"(check the called AE title and that our AE title is known to it)"
            )
        if pdu_type != f.ASSOCIATE_AC:
            raise TransientError(f"cannot associate with {self.peer} at {self.where} (no answer or aborted)")
        accepted = _decode_pdu(A_ASSOCIATE_AC(), pdu_type, body)
        self.max_send = int(getattr(accepted, "maximum_length_received", 0) or 0)
        self.established = True
        for context in accepted.presentation_context_definition_results_list:
            if context.result == 0 and context.context_id in proposed and context.transfer_syntax:
                self.transfer_syntax[int(context.context_id)] = str(context.transfer_syntax[0])

    def release(self) -> None:
        self.send(f.RELEASE_RQ_PDU)
        while True:
            pdu_type, _ = self.read_pdu()
            if pdu_type in (f.RELEASE_RP, f.ABORT):
                return
            if pdu_type == f.RELEASE_RQ:  # release collision: answer it (PS3.8 7.2.2)
                self.send(f.RELEASE_RP_PDU)

    def read_request(self, *, deadline: float) -> Any:
        """As acceptor: the A-ASSOCIATE-RQ primitive, which must arrive whole before `deadline`."""
        pdu_type, body = self.read_pdu(deadline=deadline)
        if pdu_type != f.ASSOCIATE_RQ:
            raise ProtocolError(f"{self.peer} at {self.where} sent PDU type 0x{pdu_type:02X} instead of a request")
        return _decode_pdu(A_ASSOCIATE_RQ(), pdu_type, body)

    def accept(
        self,
        request: Any,
        *,
        ae_title: str,
        storage_classes: frozenset[str],
        transfer_syntaxes: Sequence[str],
        allowed_aes: frozenset[str] | None = None,
        check_called_ae: bool = True,
    ) -> str:
        """As acceptor: accept every storage context we file (the first transfer syntax the requestor
        proposed that we know), plus Verification; the others are rejected one by one, as pynetdicom's
        acceptor does. A called AE title other than ours (with `check_called_ae`) or a calling AE title
        not in `allowed_aes` (when given) is rejected outright (PeerRefused). Returns the calling AE title."""
        calling_ae = str(request.calling_ae_title).strip()
        called_ae = str(request.called_ae_title).strip()
        self.peer = f"storage SCU {calling_ae!r}"
        if allowed_aes is not None and calling_ae not in allowed_aes:
            self.send(f.REJECT_CALLING_AE_PDU)
            raise PeerRefused(f"refused an association from {self.peer} at {self.where}: not an allowed AE title")
        if check_called_ae and called_ae != ae_title:
            self.send(f.REJECT_CALLED_AE_PDU)
            raise PeerRefused(f"refused an association from {self.peer} at {self.where}: it called {called_ae!r}")
        self.max_send = int(getattr(request, "maximum_length_received", 0) or 0)
        answer = A_ASSOCIATE()
        answer.application_context_name = request.application_context_name
        answer.calling_ae_title = request.calling_ae_title
        answer.called_ae_title = request.called_ae_title
        answer.result = 0x00
        known = set(transfer_syntaxes)
        for proposed in request.presentation_context_definition_list:
            context = PresentationContext()
            context.context_id = proposed.context_id
            abstract = str(proposed.abstract_syntax)
            syntax = next((str(ts) for ts in proposed.transfer_syntax if str(ts) in known), None)
            if abstract not in storage_classes and abstract != VERIFICATION:
                context.result, syntax = 0x03, None  # abstract syntax not supported
            elif syntax is None:
                context.result = 0x04  # transfer syntaxes not supported
            else:
                context.result = 0x00
                self.transfer_syntax[int(proposed.context_id)] = syntax
            proposed_syntaxes = list(proposed.transfer_syntax)
            context.transfer_syntax = [UID(syntax or (str(proposed_syntaxes[0]) if proposed_syntaxes else "1.2"))]
            answer.presentation_context_definition_results_list.append(context)
        answer.user_information = _user_information()
        ac = A_ASSOCIATE_AC()
        ac.from_primitive(answer)
        self.send(ac.encode())
        self.established = True
        return calling_ae

    def abort(self, pdu: bytes = f.ABORT_PDU) -> None:
        """A-ABORT an established association, or any association that broke the protocol (a rejected
        or unanswered one is simply closed)."""
        if self.established or pdu != f.ABORT_PDU:
            with suppress(OSError):
                self.sock.sendall(pdu)

    def close(self) -> None:
        if self._reader is not None:
            with suppress(OSError):
                self._reader.close()
        with suppress(OSError):
            self.sock.close()


def _decode_pdu(pdu: Any, pdu_type: int, body: bytes) -> Any:
    """The A-ASSOCIATE primitive of an A-ASSOCIATE-RQ/AC PDU, decoded by pynetdicom; whatever it raises
    on hostile bytes is a ProtocolError, as is a request with no presentation context."""
    try:
        pdu.decode(bytes([pdu_type, 0]) + len(body).to_bytes(4, "big") + body)
        primitive = pdu.to_primitive()
        str(primitive.calling_ae_title), str(primitive.called_ae_title)
    except Exception as exc:  # pynetdicom raises what its parser meets: IndexError, struct.error, ...
        raise ProtocolError(f"a malformed A-ASSOCIATE PDU ({type(exc).__name__})") from exc
    if pdu_type == f.ASSOCIATE_RQ and not primitive.presentation_context_definition_list:
        raise ProtocolError("an association request without a presentation context")
    return primitive


def _user_information() -> list[Any]:
    """What we announce on every association: the largest PDU we take, and who we are."""
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = f.MAX_PDU
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = f.IMPLEMENTATION_CLASS_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = f.IMPLEMENTATION_VERSION_NAME
    return [max_length, implementation, version]


@lru_cache(maxsize=32)
def _request(
    *, calling_ae: str, called_ae: str, storage_classes: tuple[str, ...], transfer_syntaxes: tuple[str, ...]
) -> tuple[bytes, dict[int, str]]:
    """The encoded A-ASSOCIATE-RQ PDU (the Q/R GET model, then each storage class with the SCP role) and
    the proposed contexts by id. Cached: building it validates every UID, ~10 ms for 31 × 12 contexts."""
    proposed: dict[int, str] = {}
    contexts = []
    for index, (abstract, syntaxes) in enumerate(
        [(STUDY_ROOT_GET, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])]
        + [(UID(c), list(transfer_syntaxes)) for c in storage_classes]
    ):
        context = build_context(abstract, syntaxes)
        context.context_id = 2 * index + 1
        proposed[context.context_id] = str(abstract)
        contexts.append(context)
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = calling_ae
    primitive.called_ae_title = called_ae
    primitive.presentation_context_definition_list = contexts
    primitive.user_information = [*_user_information(), *(build_role(c, scp_role=True) for c in storage_classes)]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode(), proposed


def c_get(
    *,
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str,
    identifier: Dataset,
    dest: Path,
    file_name: Callable[[str], str],
    storage_classes: Sequence[str],
    transfer_syntaxes: Sequence[str],
    timeout_s: float,
    tls: ssl.SSLContext | None = None,
    stop: threading.Event | None = None,
    deadline_s: float | None = None,
) -> Dataset | None:
    """Send one C-GET and file every instance it brings into `dest` as `file_name(sop_instance_uid)`;
    an instance of another study than the identifier's (when it names one) is refused.

    Returns the final C-GET response's command set (Status and the sub-operation counts), or None when
    the PACS released without one. Raises TransientError (no connection, busy, timeout, lost
    connection), PeerRefused (association rejected, aborted before anything was sent, a TLS
    certificate not trusted) or ProtocolError (the PACS broke the protocol; the association is
    aborted). With `tls`, the connection is DICOM TLS. With `stop`, a stop that is set ends the C-GET
    at its next PDU (Interrupted, the association aborted); with `deadline_s`, the whole C-GET must end
    within that many seconds however slowly the PACS sends (TransientError when it does not).
    """
    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        raise TransientError(f"cannot connect to PACS {called_ae} at {where}: {exc}") from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is not None:
        sock = wrap_client(sock, tls, host=host, peer=f"PACS {called_ae}")
    assoc = _Association(sock, peer=f"PACS {called_ae}", where=where)
    receiver: _Receiver | None = None
    ok = False
    study = str(identifier.get("StudyInstanceUID", "") or "")
    try:
        request, proposed = _request(
            calling_ae=calling_ae,
            called_ae=called_ae,
            storage_classes=tuple(storage_classes),
            transfer_syntaxes=tuple(transfer_syntaxes),
        )
        assoc.request(request, proposed)
        query_context = 1
        if query_context not in assoc.transfer_syntax:
            raise PeerRefused(f"PACS {called_ae} at {where} does not support Study Root C-GET")
        if not any(cid != query_context for cid in assoc.transfer_syntax):
            raise PeerRefused(f"PACS {called_ae} at {where} accepted none of our storage classes for C-GET")

        get = C_GET()
        get.MessageID = 1
        get.AffectedSOPClassUID = STUDY_ROOT_GET
        get.Priority = 2  # low: this is batch work
        get.Identifier = BytesIO(
            encode(identifier, assoc.transfer_syntax[query_context] == ImplicitVRLittleEndian, True)
        )
        message = C_GET_RQ()
        message.primitive_to_message(get)
        assoc.send_message(message, query_context)

        receiver = _Receiver(
            assoc,
            place=lambda request: Placement(dest / file_name(request.sop_instance or "unknown"), study=study),
            operation="C-GET",
            our_ae=calling_ae,
            stop=stop,
        )
        with deadline(deadline_s, _shutdown(sock)) as passed:
            try:
                final = receiver.run()
            except TransientError as exc:
                if passed.is_set():
                    raise TransientError(
                        f"C-GET from PACS {called_ae} at {where} did not finish within {deadline_s:.0f} s "
                        f"({receiver.received} instances received)"
                    ) from exc
                raise
        if not receiver.released:
            assoc.release()
        ok = True
        return final
    except ProtocolError as exc:
        assoc.abort(f.ABORT_INVALID_PARAMETER)
        raise ProtocolError(f"PACS {called_ae} at {where} broke the DICOM protocol during C-GET: {exc}") from exc
    finally:
        if receiver is not None:
            receiver.discard()
        if not ok:
            assoc.abort()
        assoc.close()


@contextmanager
def deadline(seconds: float | None, expire: Callable[[], None]) -> Iterator[threading.Event]:
    """Within the block, `expire` runs once `seconds` have passed and the event says so (None: never):
    a deadline for a whole exchange that a peer dripping bytes cannot stretch, at no cost per read.
    `expire` ends the exchange from another thread (shuts the socket down, aborts the association)."""
    passed = threading.Event()
    if seconds is None:
        yield passed
        return

    def fire() -> None:
        passed.set()
        expire()

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield passed
    finally:
        timer.cancel()


def _shutdown(sock: socket.socket) -> Callable[[], None]:
    def shut() -> None:
        with suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    return shut


class _Receiver:
    """What arrives on an association: C-STORE requests (each filed and acknowledged as soon as its last
    fragment is in and its data set is whole), C-ECHO requests, and on a C-GET its responses until the
    final one; on a storage SCP association, until the requestor releases. `place(request)` says where
    an instance is written; a placement with `check` goes, once complete, to `on_stored(path, request)`,
    which files it and returns the C-STORE status. Anything the protocol does not allow here raises
    ProtocolError."""

    def __init__(
        self,
        assoc: _Association,
        *,
        place: Callable[[StoreRequest], Placement],
        operation: str,
        our_ae: str = "",
        peer_ae: str = "",
        on_stored: Callable[[Path, StoreRequest], int] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.assoc = assoc
        self.place = place
        self.stop = stop
        self.operation = operation
        self.our_ae, self.peer_ae = our_ae, peer_ae
        self.on_stored = on_stored
        self.incoming: _Incoming | None = None
        self.final: Dataset | None = None
        self.final_has_dataset = False
        self.received = 0
        self.released = False

    def run(self) -> Dataset | None:
        assoc = self.assoc
        command = bytearray()
        while self.final is None or self.final_has_dataset:
            if self.stop is not None and self.stop.is_set():
                raise Interrupted(f"{self.operation} stopped after {self.received} instances: nightread is stopping")
            pdu_type, body = assoc.read_pdu()
            if pdu_type != f.P_DATA:
                if pdu_type == f.RELEASE_RQ:  # the peer ends the association: answer, and stop
                    assoc.send(f.RELEASE_RP_PDU)
                    self.released = True
                    return self.final
                raise self._unexpected(pdu_type)
            for context_id, control, fragment in f.pdv_items(body):
                if context_id not in assoc.transfer_syntax:
                    raise ProtocolError(f"a PDV on presentation context {context_id}, which was not accepted")
                if control & 0x01:  # a command fragment
                    if self.incoming is not None:  # a new command before the last one's data set ended
                        self._orphaned(self.incoming)
                        self.incoming = None
                    if len(command) + len(fragment) > f.MAX_COMMAND_SET:
                        raise ProtocolError(f"a command set longer than {f.MAX_COMMAND_SET} bytes")
                    command += fragment
                    if control & 0x02:
                        self._command(bytes(command), context_id)
                        command.clear()
                elif command:
                    raise ProtocolError("a data set fragment inside a command set")
                elif self.incoming is not None:  # a data set fragment of the instance being received
                    if context_id != self.incoming.context_id:
                        raise ProtocolError("a data set fragment on another context than its command")
                    self.incoming.write(fragment)
                    if control & 0x02:
                        incoming, self.incoming = self.incoming, None
                        self._answer(incoming)
                elif self.final is not None and self.final_has_dataset:  # the final response's identifier
                    if control & 0x02:
                        self.final_has_dataset = False
                else:
                    raise ProtocolError("a data set fragment that no command announced")
        return self.final

    def _command(self, encoded: bytes, context_id: int) -> None:
        cmd = f.parse_command(encoded)
        field = f.us(cmd, f.COMMAND_FIELD)
        if field == f.C_STORE_RQ:
            sop = f.ui(cmd, f.AFFECTED_SOP_INSTANCE)
            syntax = self.assoc.transfer_syntax.get(context_id)
            request = StoreRequest(
                sop_class=f.ui(cmd, f.AFFECTED_SOP_CLASS),
                sop_instance=sop,
                calling_ae=self.peer_ae,
                move_originator_ae=f.ui(cmd, f.MOVE_ORIGINATOR_AE),
                move_originator_id=f.us(cmd, f.MOVE_ORIGINATOR_ID) if f.MOVE_ORIGINATOR_ID in cmd else None,
            )
            incoming = _Incoming(
                placement=self.place(request),
                request=request,
                message_id=f.us(cmd, f.MESSAGE_ID),
                context_id=context_id,
                transfer_syntax=syntax or "",
                refuse=None if sop and syntax else f.CANNOT_UNDERSTAND,
            )
            if f.us(cmd, f.DATA_SET_TYPE, f.NO_DATASET) != f.NO_DATASET:
                self.incoming = incoming
            else:  # a C-STORE without a data set: nothing to file (the empty data set is refused)
                self._answer(incoming)
        elif field == f.C_ECHO_RQ:
            command = f.response(f.C_ECHO_RSP, message_id=f.us(cmd, f.MESSAGE_ID), sop_class=VERIFICATION, status=0)
            self.assoc.send(f.pdata(context_id, 0x03, command))
        elif field == f.C_GET_RSP and self.operation == "C-GET":
            if f.us(cmd, f.STATUS, f.CANNOT_UNDERSTAND) not in f.PENDING:
                try:
                    self.final = decode(BytesIO(encoded), True, True)  # a Dataset with the sub-operation counts
                except Exception as exc:  # pydicom's decoder on hostile bytes
                    raise ProtocolError(
                        f"a final C-GET response that cannot be decoded ({type(exc).__name__})"
                    ) from exc
                self.final_has_dataset = f.us(cmd, f.DATA_SET_TYPE, f.NO_DATASET) != f.NO_DATASET
        else:
            raise ProtocolError(f"DIMSE command 0x{field:04X} during {self.operation}")

    def _answer(self, incoming: _Incoming) -> None:
        status = incoming.finish()
        if status == 0x0000 and incoming.check and self.on_stored is not None:
            status = self.on_stored(incoming.path, incoming.request)
        self.received += status == 0x0000
        self._respond(incoming, status)

    def _orphaned(self, incoming: _Incoming) -> None:
        """A C-STORE whose data set never ended: answered as refused, its partial file removed."""
        incoming.discard()
        log.warning("refused an instance whose data set was cut short by the next command")
        self._respond(incoming, f.OUT_OF_RESOURCES)

    def _respond(self, incoming: _Incoming, status: int) -> None:
        command = f.response(
            f.C_STORE_RSP,
            message_id=incoming.message_id,
            sop_class=incoming.request.sop_class,
            sop_instance=incoming.request.sop_instance,
            status=status,
        )
        self.assoc.send(f.pdata(incoming.context_id, 0x03, command))

    def discard(self) -> None:
        """Remove the partial file of an instance still being received when the association ended."""
        if self.incoming is not None:
            self.incoming.discard()
            self.incoming = None

    def _unexpected(self, pdu_type: int) -> Exception:
        where = f"{self.assoc.peer} at {self.assoc.where}"
        if pdu_type != f.ABORT:
            return ProtocolError(f"{where} sent PDU type 0x{pdu_type:02X} during {self.operation}")
        if self.received or self.operation != "C-GET":
            return TransientError(
                f"{where} aborted the association during {self.operation} after {self.received} instances"
            )
        return PeerRefused(
            f"{where} aborted the association during C-GET without a status; PACS such as Orthanc do this "
            f"when the calling AE title {self.our_ae!r} is not declared among their DICOM modalities"
        )


@dataclass(frozen=True)
class EdgePolicy:
    """Who may associate with a storage SCP, and how much of it a peer may hold.

    `allowed_aes`: calling AE titles accepted (None: any); `allowed_hosts`: peer addresses accepted
    (None: any; others are closed before anything is read); `check_called_ae`: the called AE title must
    be ours. `max_associations` established associations at once (more are rejected as transient);
    `max_pending` connections still negotiating, `max_pending_per_host` of them from one address (past
    those a connection is closed at once, without a thread); `artim_s`: how long a connection has to
    send its whole A-ASSOCIATE-RQ (PS3.8's ARTIM timer)."""

    allowed_aes: frozenset[str] | None = None
    allowed_hosts: frozenset[str] | None = None
    check_called_ae: bool = True
    max_associations: int = 16
    max_pending: int = 32
    max_pending_per_host: int = 8
    artim_s: float = 10.0


class StreamingStorageServer:
    """A storage SCP (the destination of our C-MOVEs, and `nightread listen`): one thread accepts, one
    thread per connection receives, each instance streamed to where `place(request)` says and, if
    that placement asks for a check, handed complete to `on_stored(path, request)`, which files it and
    returns the C-STORE status. `policy` says who may associate and how many at once; with
    `ssl_context`, every connection is DICOM TLS (its handshake within the ARTIM time). Start with
    start(), stop with shutdown(); `server_address` is the bound address."""

    def __init__(
        self,
        *,
        ae_title: str,
        host: str,
        port: int,
        place: Callable[[StoreRequest], Placement],
        on_stored: Callable[[Path, StoreRequest], int],
        storage_classes: Sequence[str],
        transfer_syntaxes: Sequence[str],
        timeout_s: float,
        policy: EdgePolicy = EdgePolicy(),
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.ae_title = ae_title
        self.ssl_context = ssl_context
        self.policy = policy
        self.place, self.on_stored = place, on_stored
        self.storage_classes = frozenset(str(c) for c in storage_classes)
        self.transfer_syntaxes = list(transfer_syntaxes)
        self.timeout_s = timeout_s
        self._listener = socket.create_server((host, port))
        self.server_address: tuple[str, int] = self._listener.getsockname()[:2]
        self._stopping = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._sockets: set[socket.socket] = set()
        self._pending: dict[str, int] = {}  # peer address -> connections still negotiating
        self._established = 0
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept_loop, name="storage-scp", daemon=True)

    @property
    def max_associations(self) -> int:
        return self.policy.max_associations

    def start(self) -> StreamingStorageServer:
        self._acceptor.start()
        return self

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, address = self._listener.accept()
            except OSError:  # the listener was closed by shutdown()
                return
            host = str(address[0])
            if self.policy.allowed_hosts is not None and host not in self.policy.allowed_hosts:
                log.warning("storage SCP: closed a connection from a host not on the allow-list")
                _close(sock)
                continue
            with self._lock:
                pending = sum(self._pending.values())
                crowded = (
                    pending >= self.policy.max_pending or self._pending.get(host, 0) >= self.policy.max_pending_per_host
                )
                if not crowded:
                    self._pending[host] = self._pending.get(host, 0) + 1
            if crowded:  # no thread for it: it would only wait for the ones already negotiating
                log.warning("storage SCP: closed a connection, %d still negotiating", pending)
                _close(sock)
                continue
            thread = threading.Thread(target=self._serve, args=(sock, host), name="storage-scp-assoc", daemon=True)
            with self._lock:
                self._threads.add(thread)
                self._sockets.add(sock)
            thread.start()

    def _negotiated(self, host: str, *, established: bool) -> bool:
        """Move a connection from pending to established (False: the association limit is reached)."""
        with self._lock:
            self._pending[host] -= 1
            if not self._pending[host]:
                del self._pending[host]
            if established and self._established < self.policy.max_associations:
                self._established += 1
                return True
            return False

    def _handshake(self, sock: socket.socket, deadline: float) -> socket.socket:
        """The TLS handshake as server, within the ARTIM time; the wrapped socket replaces the plain one."""
        assert self.ssl_context is not None
        wrapped = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        with self._lock:
            self._sockets.discard(sock)
            self._sockets.add(wrapped)
        wrapped.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            wrapped.do_handshake()
        except OSError as exc:  # ssl.SSLError included: the wrapped socket is the one to close
            with self._lock:
                self._sockets.discard(wrapped)
            _close(wrapped)
            if isinstance(exc, ssl.SSLError):
                raise PeerRefused(f"refused a TLS connection: {exc.reason or exc}") from exc
            raise TransientError(f"a TLS handshake did not finish: {exc}") from exc
        return wrapped

    def _serve(self, sock: socket.socket, host: str) -> None:
        # a peer may be gone already: its thread still ends through the bookkeeping below (a raise here
        # would leak its pending slot, and enough quick connect-and-close peers would fill them all)
        port: object = "?"
        with suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            port = sock.getpeername()[1]
        where = f"{host}:{port}"
        assoc = _Association(sock, peer="storage SCU", where=where)
        receiver: _Receiver | None = None
        pending, established = True, False
        deadline = time.monotonic() + self.policy.artim_s
        try:
            if self.ssl_context is not None:
                sock = self._handshake(sock, deadline)
                assoc = _Association(sock, peer="storage SCU", where=where)
            request = assoc.read_request(deadline=deadline)
            pending = False
            established = self._negotiated(host, established=True)
            if not established:
                assoc.send(f.REJECT_BUSY_PDU)
                log.warning("storage SCP: association refused, %d under way already", self.max_associations)
                return
            sock.settimeout(self.timeout_s)
            peer_ae = assoc.accept(
                request,
                ae_title=self.ae_title,
                storage_classes=self.storage_classes,
                transfer_syntaxes=self.transfer_syntaxes,
                allowed_aes=self.policy.allowed_aes,
                check_called_ae=self.policy.check_called_ae,
            )
            receiver = _Receiver(
                assoc, place=self.place, operation="C-STORE", peer_ae=peer_ae, on_stored=self.on_stored
            )
            receiver.run()  # until the requestor releases
        except PeerRefused as exc:  # an AE title not on the allow-list: answered with a rejection
            log.warning("%s", exc)
        except ProtocolError as exc:  # aborted: a peer that breaks the protocol gets nothing more
            log.warning("storage SCP: aborted an association from %s: %s", assoc.where, exc)
            assoc.abort(f.ABORT_INVALID_PARAMETER)
        except TransientError as exc:  # lost, aborted or silent peer: what was filed stays filed
            if not self._stopping.is_set():
                log.warning("storage SCP association ended: %s", exc)
                assoc.abort()
        except Exception:  # a fault of ours: end this association only
            log.exception("storage SCP association from %s failed", assoc.where)
            assoc.abort()
        finally:
            if receiver is not None:
                receiver.discard()
            assoc.close()
            if pending:
                self._negotiated(host, established=False)
            with self._lock:
                if established:
                    self._established -= 1
                self._threads.discard(threading.current_thread())
                self._sockets.discard(sock)

    def thread_count(self) -> int:
        """Connection threads alive now (for tests and metrics)."""
        with self._lock:
            return len(self._threads)

    def shutdown(self) -> None:
        """Stop accepting, end the associations under way, and wait for their threads."""
        self._stopping.set()
        with suppress(OSError):  # wakes the accept() under way (closing alone does not, on Linux)
            self._listener.shutdown(socket.SHUT_RDWR)
        with suppress(OSError):
            self._listener.close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in [self._acceptor, *threads]:
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(timeout=self.timeout_s)


def _close(sock: socket.socket) -> None:
    with suppress(OSError):
        sock.close()
