"""DIMSE retrieval on one thread per association: C-GET (we ask, and receive the C-STORE sub-operations
on the same association) and the storage SCP that C-MOVE sends to, each instance streamed to disk as
its fragments arrive.

pynetdicom hands every PDU from its reactor thread to a queue, then to the DIMSE thread, reassembles
each instance in memory and only then calls the C-STORE handler, which answers through the same
threads: about 6 ms per instance and 20 µs per PDU on loopback here, where dcmtk's getscu needs
1.6 ms. This module keeps pynetdicom's encoders and decoders for what is negotiated or sent once (the
A-ASSOCIATE-RQ/AC PDUs, the C-GET request, the final C-GET response), and does the per-instance path
by hand: PDU headers, PDV items, the command elements of a C-STORE request, the C-STORE and C-ECHO
responses and the File Meta Information (byte for byte what pynetdicom and pydicom write; the unit
tests compare them), and the data set's fragments written straight into the instance's file.

Each instance is filed as the DICOM file pynetdicom's `Event.encoded_dataset()` would have written
(preamble, File Meta Information from the request and the presentation context, the data set as
sent), first under `<name>.part` and renamed when its last fragment is in, so a broken association
never leaves a half file under a final name. `DimseStudySource(dimse_receiver="pynetdicom")` keeps
pynetdicom's own (`NIGHTREAD_PACS__DIMSE_RECEIVER=pynetdicom`) for a PACS this one cannot talk to.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import lru_cache
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, build_context, build_role
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

from integrations.errors import PeerRefused, TransientError

log = logging.getLogger(__name__)

RECEIVERS = ("direct", "pynetdicom")  # this module's receive path, or pynetdicom's own
APPLICATION_CONTEXT = UID("1.2.840.10008.3.1.1.1")
STUDY_ROOT_GET = UID("1.2.840.10008.5.1.4.1.2.2.3")
VERIFICATION = "1.2.840.10008.1.1"
# the largest P-DATA-TF PDU we accept; the PACS fragments to this or to its own limit, whichever is less
MAX_PDU = 1 << 20
_READ_BUFFER = 1 << 20
_WRITE_BUFFER = 1 << 20

# PDU types (PS3.8 9.3.1)
_ASSOCIATE_RQ, _ASSOCIATE_AC, _ASSOCIATE_RJ, _P_DATA = 0x01, 0x02, 0x03, 0x04
_RELEASE_RQ, _RELEASE_RP, _ABORT = 0x05, 0x06, 0x07
_RELEASE_RQ_PDU = bytes([_RELEASE_RQ, 0, 0, 0, 0, 4, 0, 0, 0, 0])
_RELEASE_RP_PDU = bytes([_RELEASE_RP, 0, 0, 0, 0, 4, 0, 0, 0, 0])
_ABORT_PDU = bytes([_ABORT, 0, 0, 0, 0, 4, 0, 0, 0, 0])  # source: service user, no reason
# rejected-permanent, by the service user, calling AE title not recognized (PS3.8 9.3.4)
_REJECT_CALLING_AE_PDU = bytes([_ASSOCIATE_RJ, 0, 0, 0, 0, 4, 0, 1, 1, 3])
# rejected-transient, by the service provider (presentation), local limit exceeded
_REJECT_BUSY_PDU = bytes([_ASSOCIATE_RJ, 0, 0, 0, 0, 4, 0, 2, 3, 2])

# DIMSE command fields and statuses used here
_C_STORE_RQ, _C_GET_RSP = 0x0001, 0x8010
_NO_DATASET = 0x0101
_PENDING = (0xFF00, 0xFF01)
_OUT_OF_RESOURCES = 0xA700
_CANNOT_UNDERSTAND = 0xC000


# Command set elements read on the bulk path (group 0000, always Implicit VR Little Endian: PS3.7 6.3.1)
_AFFECTED_SOP_CLASS, _COMMAND_FIELD, _MESSAGE_ID, _MESSAGE_ID_RESPONDED = 0x0002, 0x0100, 0x0110, 0x0120
_DATA_SET_TYPE, _STATUS, _AFFECTED_SOP_INSTANCE = 0x0800, 0x0900, 0x1000
_C_STORE_RSP, _C_ECHO_RQ, _C_ECHO_RSP = 0x8001, 0x0030, 0x8030
_MOVE_ORIGINATOR_AE, _MOVE_ORIGINATOR_ID = 0x1030, 0x1031


def _parse_command(encoded: bytes) -> dict[int, bytes]:
    """A command set's elements by element number (all of group 0000), values as sent."""
    out: dict[int, bytes] = {}
    offset, end = 0, len(encoded)
    while offset + 8 <= end:
        group, element, length = struct.unpack_from("<HHI", encoded, offset)
        offset += 8
        if group == 0x0000:
            out[element] = encoded[offset : offset + length]
        offset += length
    return out


def _us(cmd: dict[int, bytes], element: int, default: int = 0) -> int:
    value = cmd.get(element)
    return int.from_bytes(value[:2], "little") if value and len(value) >= 2 else default


def _ui(cmd: dict[int, bytes], element: int) -> str:
    return cmd.get(element, b"").rstrip(b"\x00 ").decode("latin-1")  # byte for byte, even when malformed


def _implicit(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _uid_bytes(uid: str) -> bytes:
    value = uid.encode("latin-1")
    return value + b"\x00" if len(value) % 2 else value


def _response(command_field: int, *, message_id: int, sop_class: str, status: int, sop_instance: str = "") -> bytes:
    """An encoded C-STORE-RSP or C-ECHO-RSP command set (PS3.7 9.3.1.2, 9.3.5.2), the bytes pynetdicom's
    encoder writes."""
    elements = [
        _implicit(_AFFECTED_SOP_CLASS, _uid_bytes(sop_class)),
        _implicit(_COMMAND_FIELD, struct.pack("<H", command_field)),
        _implicit(_MESSAGE_ID_RESPONDED, struct.pack("<H", message_id)),
        _implicit(_DATA_SET_TYPE, struct.pack("<H", _NO_DATASET)),
        _implicit(_STATUS, struct.pack("<H", status)),
    ]
    if sop_instance:
        elements.append(_implicit(_AFFECTED_SOP_INSTANCE, _uid_bytes(sop_instance)))
    body = b"".join(elements)
    return _implicit(0x0000, struct.pack("<I", len(body))) + body


def _pdata(context_id: int, control: int, data: bytes) -> bytes:
    """A P-DATA-TF PDU with one PDV (control: bit 0 command, bit 1 last fragment)."""
    return b"".join(
        (
            bytes([_P_DATA, 0]),
            (len(data) + 6).to_bytes(4, "big"),
            (len(data) + 2).to_bytes(4, "big"),
            bytes([context_id, control]),
            data,
        )
    )


def _explicit(tag_element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, tag_element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, tag_element, vr, len(value)) + value


_VERSION_NAME = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
_VERSION_NAME += b" " if len(_VERSION_NAME) % 2 else b""


def _file_header(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, prefix and File Meta Information (PS3.10 7.1), the bytes pydicom's
    `write_file_meta_info` writes for pynetdicom's `Event.file_meta`."""
    body = b"".join(
        (
            _explicit(0x0001, b"OB", b"\x00\x01"),
            _explicit(0x0002, b"UI", _uid_bytes(sop_class)),
            _explicit(0x0003, b"UI", _uid_bytes(sop_instance)),
            _explicit(0x0010, b"UI", _uid_bytes(transfer_syntax)),
            _explicit(0x0012, b"UI", _uid_bytes(PYNETDICOM_IMPLEMENTATION_UID)),
            _explicit(0x0013, b"SH", _VERSION_NAME),
        )
    )
    return b"\x00" * 128 + b"DICM" + _explicit(0x0000, b"UL", struct.pack("<I", len(body))) + body


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
    """Where an instance is written; with `check`, the complete file goes to `on_stored` to be filed."""

    path: Path
    check: bool = False


def receiver_choice(value: str) -> str:
    """`value` if it names a receiver (RECEIVERS), else a ValueError naming the choices."""
    if value not in RECEIVERS:
        raise ValueError(f'dimse_receiver must be "direct" or "pynetdicom", not {value!r}')
    return value


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
        self.path, self.check = placement.path, placement.check
        self.part = self.path.with_name(self.path.name + ".part")
        self.request, self.message_id, self.context_id = request, message_id, context_id
        self.status = refuse
        self.fh: BinaryIO | None = None
        if refuse is not None:
            return
        try:
            self.fh = self.part.open("wb", buffering=_WRITE_BUFFER)
            self.fh.write(_file_header(request.sop_class, request.sop_instance, transfer_syntax))
        except OSError as exc:  # a full or read-only disk: refuse the instance, keep the association
            self._fail(exc)

    def write(self, fragment: memoryview) -> None:
        if self.fh is not None:
            try:
                self.fh.write(fragment)
            except OSError as exc:
                self._fail(exc)

    def finish(self) -> int:
        """Close and rename; the C-STORE status to answer."""
        if self.fh is not None:
            try:
                self.fh.close()
                self.fh = None
                os.replace(self.part, self.path)
            except OSError as exc:
                self._fail(exc)
        return 0x0000 if self.status is None else self.status

    def discard(self) -> None:
        if self.fh is not None:
            with suppress(OSError):
                self.fh.close()
            self.fh = None
        with suppress(OSError):
            self.part.unlink(missing_ok=True)

    def _fail(self, exc: OSError) -> None:
        self.status = _OUT_OF_RESOURCES
        log.warning("could not file a received instance: %s", exc.strerror or type(exc).__name__)
        self.discard()


class _Association:
    """An association on a plain socket, requested (C-GET) or accepted (storage SCP); every call blocks
    on the calling thread. `peer` names the other side in errors: its AE title, never a patient."""

    def __init__(self, sock: socket.socket, *, peer: str, where: str) -> None:
        self.sock = sock
        self.reader = sock.makefile("rb", buffering=_READ_BUFFER)
        self.peer, self.where = peer, where
        self.max_send = 0  # the peer's maximum PDU length (0: unlimited)
        self.transfer_syntax: dict[int, str] = {}  # accepted context id -> transfer syntax
        self.established = False  # an A-ABORT only means something on an established association

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise TransientError(f"connection to {self.peer} at {self.where} lost: {exc}") from exc

    def read_pdu(self) -> tuple[int, bytes]:
        try:
            header = self.reader.read(6)
            length = int.from_bytes(header[2:6], "big") if len(header) == 6 else 0
            body = self.reader.read(length) if length else b""
        except TimeoutError as exc:
            raise TransientError(
                f"no answer from {self.peer} at {self.where} within {self.sock.gettimeout()} s"
            ) from exc
        except OSError as exc:
            raise TransientError(f"connection to {self.peer} at {self.where} lost: {exc}") from exc
        if len(header) < 6 or len(body) < length:
            raise TransientError(f"{self.peer} at {self.where} closed the connection")
        return header[0], body

    def send_message(self, message: Any, context_id: int) -> None:
        for pdata in message.encode_msg(context_id, self.max_send):  # fragments fit the peer's PDV list limit
            pdu = P_DATA_TF()
            pdu.from_primitive(pdata)
            self.send(pdu.encode())

    def request(self, request: bytes, proposed: dict[int, str]) -> None:
        """As requestor: send the A-ASSOCIATE-RQ, read the answer, keep the accepted contexts."""
        self.send(request)
        pdu_type, body = self.read_pdu()
        if pdu_type == _ASSOCIATE_RJ:
            result = body[1] if len(body) > 1 else 1
            if result == 0x02:
                raise TransientError(f"{self.peer} at {self.where} is busy (association rejected, transient)")
            raise PeerRefused(
                f"{self.peer} at {self.where} rejected the association "
                f"(check the called AE title and that our AE title is known to it)"
            )
        if pdu_type != _ASSOCIATE_AC:
            raise TransientError(f"cannot associate with {self.peer} at {self.where} (no answer or aborted)")
        ac = A_ASSOCIATE_AC()
        ac.decode(bytes([pdu_type, 0]) + len(body).to_bytes(4, "big") + body)
        accepted = ac.to_primitive()
        self.max_send = int(getattr(accepted, "maximum_length_received", 0) or 0)
        self.established = True
        for context in accepted.presentation_context_definition_results_list:
            if context.result == 0 and context.context_id in proposed and context.transfer_syntax:
                self.transfer_syntax[int(context.context_id)] = str(context.transfer_syntax[0])

    def release(self) -> None:
        self.send(_RELEASE_RQ_PDU)
        while True:
            pdu_type, _ = self.read_pdu()
            if pdu_type in (_RELEASE_RP, _ABORT):
                return
            if pdu_type == _RELEASE_RQ:  # release collision: answer it (PS3.8 7.2.2)
                self.send(_RELEASE_RP_PDU)

    def accept(
        self,
        *,
        ae_title: str,
        storage_classes: frozenset[str],
        transfer_syntaxes: Sequence[str],
        allowed_aes: frozenset[str] | None = None,
    ) -> str:
        """As acceptor: read the A-ASSOCIATE-RQ and accept every storage context we file (the first
        transfer syntax the requestor proposed that we know), plus Verification; the others are
        rejected one by one, as pynetdicom's acceptor does. A calling AE title not in `allowed_aes`
        (when given) is rejected outright (PeerRefused). Returns the calling AE title."""
        pdu_type, body = self.read_pdu()
        if pdu_type != _ASSOCIATE_RQ:
            raise TransientError(f"{self.peer} at {self.where} sent PDU type 0x{pdu_type:02X} instead of a request")
        rq = A_ASSOCIATE_RQ()
        rq.decode(bytes([pdu_type, 0]) + len(body).to_bytes(4, "big") + body)
        request = rq.to_primitive()
        calling_ae = str(request.calling_ae_title).strip()
        self.peer = f"storage SCU {calling_ae!r}"
        if allowed_aes is not None and calling_ae not in allowed_aes:
            self.send(_REJECT_CALLING_AE_PDU)
            raise PeerRefused(f"refused an association from {self.peer} at {self.where}: not an allowed AE title")
        self.max_send = int(getattr(request, "maximum_length_received", 0) or 0)
        answer = A_ASSOCIATE()
        answer.application_context_name = request.application_context_name
        answer.calling_ae_title = request.calling_ae_title
        answer.called_ae_title = ae_title
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
            context.transfer_syntax = [UID(syntax or str(proposed.transfer_syntax[0]))]
            answer.presentation_context_definition_results_list.append(context)
        answer.user_information = _user_information()
        ac = A_ASSOCIATE_AC()
        ac.from_primitive(answer)
        self.send(ac.encode())
        self.established = True
        return calling_ae

    def abort(self) -> None:
        """A-ABORT an established association (a rejected or unanswered one is simply closed)."""
        if self.established:
            with suppress(OSError):
                self.sock.sendall(_ABORT_PDU)

    def close(self) -> None:
        with suppress(OSError):
            self.reader.close()
        with suppress(OSError):
            self.sock.close()


def _user_information() -> list[Any]:
    """What we announce on every association: the largest PDU we take, and who we are."""
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = MAX_PDU
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
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
) -> Dataset | None:
    """Send one C-GET and file every instance it brings into `dest` as `file_name(sop_instance_uid)`.

    Returns the final C-GET response's command set (Status and the sub-operation counts), or None when
    the PACS released without one. Raises TransientError (no connection, busy, timeout, lost
    connection) or PeerRefused (association rejected, aborted before anything was sent).
    """
    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        raise TransientError(f"cannot connect to PACS {called_ae} at {where}: {exc}") from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    assoc = _Association(sock, peer=f"PACS {called_ae}", where=where)
    receiver: _Receiver | None = None
    ok = False
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
            place=lambda request: Placement(dest / file_name(request.sop_instance or "unknown")),
            operation="C-GET",
            our_ae=calling_ae,
        )
        final = receiver.run()
        if not receiver.released:
            assoc.release()
        ok = True
        return final
    finally:
        if receiver is not None and receiver.incoming is not None:
            receiver.incoming.discard()
        if not ok:
            assoc.abort()
        assoc.close()


class _Receiver:
    """What arrives on an association: C-STORE requests (each filed and acknowledged as soon as its last
    fragment is in), C-ECHO requests, and on a C-GET its responses until the final one; on a storage
    SCP association, until the requestor releases. `place(request)` says where an instance is written;
    a placement with `check` goes, once complete, to `on_stored(path, request)`, which files it and
    returns the C-STORE status."""

    def __init__(
        self,
        assoc: _Association,
        *,
        place: Callable[[StoreRequest], Placement],
        operation: str,
        our_ae: str = "",
        peer_ae: str = "",
        on_stored: Callable[[Path, StoreRequest], int] | None = None,
    ) -> None:
        self.assoc = assoc
        self.place = place
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
            pdu_type, body = assoc.read_pdu()
            if pdu_type != _P_DATA:
                if pdu_type == _RELEASE_RQ:  # the PACS ends the association: answer, and stop
                    assoc.send(_RELEASE_RP_PDU)
                    self.released = True
                    return self.final
                raise self._unexpected(pdu_type)
            view = memoryview(body)
            offset, end = 0, len(body)
            while offset < end:
                item_length = int.from_bytes(body[offset : offset + 4], "big")
                context_id, control = body[offset + 4], body[offset + 5]
                fragment = view[offset + 6 : offset + 4 + item_length]
                offset += 4 + item_length
                if control & 0x01:  # a command fragment
                    command += fragment
                    if control & 0x02:
                        self._command(bytes(command), context_id)
                        command.clear()
                elif self.incoming is not None:  # a data set fragment of the instance being received
                    self.incoming.write(fragment)
                    if control & 0x02:
                        self._answer(self.incoming)
                        self.incoming = None
                elif control & 0x02 and self.final is not None:  # the end of the final response's identifier
                    self.final_has_dataset = False
        return self.final

    def _command(self, encoded: bytes, context_id: int) -> None:
        cmd = _parse_command(encoded)
        field = _us(cmd, _COMMAND_FIELD)
        if field == _C_STORE_RQ:
            sop = _ui(cmd, _AFFECTED_SOP_INSTANCE)
            syntax = self.assoc.transfer_syntax.get(context_id)
            request = StoreRequest(
                sop_class=_ui(cmd, _AFFECTED_SOP_CLASS),
                sop_instance=sop,
                calling_ae=self.peer_ae,
                move_originator_ae=_ui(cmd, _MOVE_ORIGINATOR_AE),
                move_originator_id=_us(cmd, _MOVE_ORIGINATOR_ID) if _MOVE_ORIGINATOR_ID in cmd else None,
            )
            incoming = _Incoming(
                placement=self.place(request),
                request=request,
                message_id=_us(cmd, _MESSAGE_ID),
                context_id=context_id,
                transfer_syntax=syntax or "",
                refuse=None if sop and syntax else _CANNOT_UNDERSTAND,
            )
            if _us(cmd, _DATA_SET_TYPE, _NO_DATASET) != _NO_DATASET:
                self.incoming = incoming
            else:
                self._answer(incoming)
        elif field == _C_ECHO_RQ:
            command = _response(_C_ECHO_RSP, message_id=_us(cmd, _MESSAGE_ID), sop_class=VERIFICATION, status=0x0000)
            self.assoc.send(_pdata(context_id, 0x03, command))
        elif field == _C_GET_RSP and self.operation == "C-GET":
            if _us(cmd, _STATUS, _CANNOT_UNDERSTAND) not in _PENDING:
                self.final = decode(BytesIO(encoded), True, True)  # a Dataset with the sub-operation counts
                self.final_has_dataset = _us(cmd, _DATA_SET_TYPE, _NO_DATASET) != _NO_DATASET
        else:
            raise TransientError(
                f"{self.assoc.peer} at {self.assoc.where} sent DIMSE command 0x{field:04X} during {self.operation}"
            )

    def _answer(self, incoming: _Incoming) -> None:
        status = incoming.finish()
        if status == 0x0000 and incoming.check and self.on_stored is not None:
            status = self.on_stored(incoming.path, incoming.request)
        self.received += status == 0x0000
        command = _response(
            _C_STORE_RSP,
            message_id=incoming.message_id,
            sop_class=incoming.request.sop_class,
            sop_instance=incoming.request.sop_instance,
            status=status,
        )
        self.assoc.send(_pdata(incoming.context_id, 0x03, command))

    def _unexpected(self, pdu_type: int) -> Exception:
        where = f"{self.assoc.peer} at {self.assoc.where}"
        if pdu_type != _ABORT:
            return TransientError(f"{where} sent PDU type 0x{pdu_type:02X} during {self.operation}")
        if self.received or self.operation != "C-GET":
            return TransientError(
                f"{where} aborted the association during {self.operation} after {self.received} instances"
            )
        return PeerRefused(
            f"{where} aborted the association during C-GET without a status; PACS such as Orthanc do this "
            f"when the calling AE title {self.our_ae!r} is not declared among their DICOM modalities"
        )


class StreamingStorageServer:
    """A storage SCP (the destination of our C-MOVEs, and `nightread listen`): one thread accepts, one
    thread per association receives, each instance streamed to where `place(request)` says and, if
    that placement asks for a check, handed complete to `on_stored(path, request)`, which files it and
    returns the C-STORE status. More than `max_associations` at once are rejected as transient (the
    sender retries). Start with start(), stop with shutdown(); `server_address` is the bound address."""

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
        allowed_aes: Sequence[str] | None = None,
        max_associations: int = 16,
    ) -> None:
        self.ae_title = ae_title
        self.max_associations = max_associations
        self.allowed_aes = frozenset(a.strip() for a in allowed_aes) if allowed_aes is not None else None
        self.place, self.on_stored = place, on_stored
        self.storage_classes = frozenset(str(c) for c in storage_classes)
        self.transfer_syntaxes = list(transfer_syntaxes)
        self.timeout_s = timeout_s
        self._listener = socket.create_server((host, port))
        self.server_address: tuple[str, int] = self._listener.getsockname()[:2]
        self._stopping = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept_loop, name="storage-scp", daemon=True)

    def start(self) -> StreamingStorageServer:
        self._acceptor.start()
        return self

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:  # the listener was closed by shutdown()
                return
            with self._lock:
                busy = len(self._threads) >= self.max_associations
            thread = threading.Thread(target=self._serve, args=(sock, busy), name="storage-scp-assoc", daemon=True)
            with self._lock:
                self._threads.add(thread)
                self._sockets.add(sock)
            thread.start()

    def _serve(self, sock: socket.socket, busy: bool) -> None:
        sock.settimeout(self.timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        host, port = sock.getpeername()[:2]
        assoc = _Association(sock, peer="storage SCU", where=f"{host}:{port}")
        receiver: _Receiver | None = None
        try:
            if busy:  # read the request first: closing on unread data would reset, not reject
                assoc.read_pdu()
                assoc.send(_REJECT_BUSY_PDU)
                log.warning("storage SCP: association refused, %d under way already", self.max_associations)
                return
            peer_ae = assoc.accept(
                ae_title=self.ae_title,
                storage_classes=self.storage_classes,
                transfer_syntaxes=self.transfer_syntaxes,
                allowed_aes=self.allowed_aes,
            )
            receiver = _Receiver(
                assoc, place=self.place, operation="C-STORE", peer_ae=peer_ae, on_stored=self.on_stored
            )
            receiver.run()  # until the requestor releases
        except PeerRefused as exc:  # an AE title not on the allow-list: answered with a rejection
            log.warning("%s", exc)
        except TransientError as exc:  # lost, aborted or silent peer: what was filed stays filed
            if not self._stopping.is_set():
                log.warning("storage SCP association ended: %s", exc)
                assoc.abort()
        except Exception:  # e.g. a request pynetdicom's decoder cannot read: end this association only
            log.exception("storage SCP association from %s failed", assoc.where)
            assoc.abort()
        finally:
            if receiver is not None and receiver.incoming is not None:
                receiver.incoming.discard()
            assoc.close()
            with self._lock:
                self._threads.discard(threading.current_thread())
                self._sockets.discard(sock)

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
