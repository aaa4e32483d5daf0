"""The bytes of the DICOM Upper Layer (PS3.8 9.3) and of DIMSE command sets (PS3.7) that nightread
reads and writes by hand, and the check that a received data set is complete.

Every length a peer declares is checked against a bound before anything is buffered: a PDU against
what was negotiated (and a small bound before negotiation), a PDV item against its PDU, a command set
against `MAX_COMMAND_SET`. A violation raises `ProtocolError`, which the association answers with an
A-ABORT and which is never retried. Nothing here touches a socket.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from integrations.errors import ProtocolError

# nightread's own Implementation Class UID (a UUID-derived UID, PS3.5 B.2) and version name (SH, 16)
IMPLEMENTATION_CLASS_UID = "2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, "urn:nightread:implementation").int)
IMPLEMENTATION_VERSION_NAME = "NIGHTREAD_0_1"

# the largest P-DATA-TF PDU we accept: announced as our Maximum Length Received, enforced on every PDU
MAX_PDU = 1 << 20
# any PDU before an association is established (A-ASSOCIATE-RQ/AC/RJ): 128 presentation contexts with
# a dozen transfer syntaxes each, and a user identity, fit in a fraction of it
MAX_NEGOTIATION_PDU = 256 << 10
# a command set is a few hundred bytes (a C-STORE-RQ with its Move Originator is under 300)
MAX_COMMAND_SET = 64 << 10

# PDU types (PS3.8 9.3.1)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA = 0x01, 0x02, 0x03, 0x04
RELEASE_RQ, RELEASE_RP, ABORT = 0x05, 0x06, 0x07
RELEASE_RQ_PDU = bytes([RELEASE_RQ, 0, 0, 0, 0, 4, 0, 0, 0, 0])
RELEASE_RP_PDU = bytes([RELEASE_RP, 0, 0, 0, 0, 4, 0, 0, 0, 0])
ABORT_PDU = bytes([ABORT, 0, 0, 0, 0, 4, 0, 0, 0, 0])  # source: service user, no reason
# A-ABORT by the service provider (source 2): unrecognized PDU (1), unexpected PDU (2), invalid
# PDU parameter value (6) (PS3.8 9.3.8)
ABORT_UNRECOGNIZED_PDU = bytes([ABORT, 0, 0, 0, 0, 4, 0, 0, 2, 1])
ABORT_UNEXPECTED_PDU = bytes([ABORT, 0, 0, 0, 0, 4, 0, 0, 2, 2])
ABORT_INVALID_PARAMETER = bytes([ABORT, 0, 0, 0, 0, 4, 0, 0, 2, 6])
# rejected-permanent, by the service user: calling AE title not recognized (3), called AE title not
# recognized (7) (PS3.8 9.3.4)
REJECT_CALLING_AE_PDU = bytes([ASSOCIATE_RJ, 0, 0, 0, 0, 4, 0, 1, 1, 3])
REJECT_CALLED_AE_PDU = bytes([ASSOCIATE_RJ, 0, 0, 0, 0, 4, 0, 1, 1, 7])
# rejected-transient, by the service provider (presentation): local limit exceeded
REJECT_BUSY_PDU = bytes([ASSOCIATE_RJ, 0, 0, 0, 0, 4, 0, 2, 3, 2])
_FIXED_BODY = {ASSOCIATE_RJ: 4, RELEASE_RQ: 4, RELEASE_RP: 4, ABORT: 4}

# DIMSE command fields and statuses used here
C_STORE_RQ, C_STORE_RSP, C_GET_RSP = 0x0001, 0x8001, 0x8010
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
NO_DATASET = 0x0101
PENDING = (0xFF00, 0xFF01)
OUT_OF_RESOURCES = 0xA700  # refused: also what an incomplete data set is answered with
CANNOT_UNDERSTAND = 0xC000

# Command set elements (group 0000, always Implicit VR Little Endian: PS3.7 6.3.1)
AFFECTED_SOP_CLASS, COMMAND_FIELD, MESSAGE_ID, MESSAGE_ID_RESPONDED = 0x0002, 0x0100, 0x0110, 0x0120
DATA_SET_TYPE, STATUS, AFFECTED_SOP_INSTANCE = 0x0800, 0x0900, 0x1000
MOVE_ORIGINATOR_AE, MOVE_ORIGINATOR_ID = 0x1030, 0x1031


def pdu_body_limit(pdu_type: int, *, established: bool) -> int:
    """The most bytes a PDU of this type may declare, or ProtocolError for a type that cannot come now."""
    if pdu_type in _FIXED_BODY:
        return _FIXED_BODY[pdu_type]
    if pdu_type in (ASSOCIATE_RQ, ASSOCIATE_AC) and not established:
        return MAX_NEGOTIATION_PDU
    if pdu_type == P_DATA and established:
        return MAX_PDU
    if pdu_type in (ASSOCIATE_RQ, ASSOCIATE_AC, P_DATA):
        raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X} {'after' if established else 'before'} association")
    raise ProtocolError(f"unrecognized PDU type 0x{pdu_type:02X}")


def check_pdu_header(header: bytes, *, established: bool) -> tuple[int, int]:
    """(type, body length) of a 6-byte PDU header, the length checked against its bound."""
    pdu_type, length = header[0], int.from_bytes(header[2:6], "big")
    limit = pdu_body_limit(pdu_type, established=established)
    fixed = _FIXED_BODY.get(pdu_type)
    if (fixed is not None and length != fixed) or length > limit:
        raise ProtocolError(f"PDU type 0x{pdu_type:02X} declares {length} bytes (at most {limit})")
    return pdu_type, length


def pdv_items(body: bytes | memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """(context id, message control header, fragment) of each PDV item of a P-DATA-TF PDU's body; an item
    that does not fit its PDU, or a PDU with none, is a ProtocolError (PS3.8 9.3.5.1)."""
    view = memoryview(body)
    offset, end = 0, len(view)
    if end == 0:
        raise ProtocolError("a P-DATA-TF PDU without a PDV item")
    while offset < end:
        if end - offset < 6:
            raise ProtocolError("a PDV item header runs past the end of its PDU")
        item_length = int.from_bytes(view[offset : offset + 4], "big")
        if item_length < 2 or offset + 4 + item_length > end:
            raise ProtocolError(f"a PDV item declares {item_length} bytes, more than its PDU holds")
        context_id, control = view[offset + 4], view[offset + 5]
        if context_id % 2 == 0 or control & 0xFC:
            raise ProtocolError(f"a PDV item with context id {context_id} and control 0x{control:02X}")
        yield context_id, control, view[offset + 6 : offset + 4 + item_length]
        offset += 4 + item_length


def parse_command(encoded: bytes) -> dict[int, bytes]:
    """A command set's elements by element number (all of group 0000), values as sent; an element that
    runs past the end of the set is a ProtocolError."""
    out: dict[int, bytes] = {}
    offset, end = 0, len(encoded)
    while offset < end:
        if end - offset < 8:
            raise ProtocolError("a command set ends inside an element header")
        group, element, length = struct.unpack_from("<HHI", encoded, offset)
        offset += 8
        if length > end - offset:
            raise ProtocolError(f"a command element declares {length} bytes, more than its command set holds")
        if group == 0x0000:
            out[element] = encoded[offset : offset + length]
        offset += length
    return out


def us(cmd: dict[int, bytes], element: int, default: int = 0) -> int:
    value = cmd.get(element)
    return int.from_bytes(value[:2], "little") if value and len(value) >= 2 else default


def ui(cmd: dict[int, bytes], element: int) -> str:
    return cmd.get(element, b"").rstrip(b"\x00 ").decode("latin-1")  # byte for byte, even when malformed


def implicit(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def uid_bytes(uid: str) -> bytes:
    value = uid.encode("latin-1")
    return value + b"\x00" if len(value) % 2 else value


def response(command_field: int, *, message_id: int, sop_class: str, status: int, sop_instance: str = "") -> bytes:
    """An encoded C-STORE-RSP or C-ECHO-RSP command set (PS3.7 9.3.1.2, 9.3.5.2), the bytes pynetdicom's
    encoder writes."""
    elements = [
        implicit(AFFECTED_SOP_CLASS, uid_bytes(sop_class)),
        implicit(COMMAND_FIELD, struct.pack("<H", command_field)),
        implicit(MESSAGE_ID_RESPONDED, struct.pack("<H", message_id)),
        implicit(DATA_SET_TYPE, struct.pack("<H", NO_DATASET)),
        implicit(STATUS, struct.pack("<H", status)),
    ]
    if sop_instance:
        elements.append(implicit(AFFECTED_SOP_INSTANCE, uid_bytes(sop_instance)))
    body = b"".join(elements)
    return implicit(0x0000, struct.pack("<I", len(body))) + body


def pdata(context_id: int, control: int, data: bytes) -> bytes:
    """A P-DATA-TF PDU with one PDV (control: bit 0 command, bit 1 last fragment)."""
    return b"".join(
        (
            bytes([P_DATA, 0]),
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


_VERSION_NAME = IMPLEMENTATION_VERSION_NAME.encode("ascii")
_VERSION_NAME += b" " if len(_VERSION_NAME) % 2 else b""


def file_header(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, prefix and File Meta Information (PS3.10 7.1) with nightread's implementation UID and
    version name, the bytes pydicom's `write_file_meta_info` writes for the same values."""
    body = b"".join(
        (
            _explicit(0x0001, b"OB", b"\x00\x01"),
            _explicit(0x0002, b"UI", uid_bytes(sop_class)),
            _explicit(0x0003, b"UI", uid_bytes(sop_instance)),
            _explicit(0x0010, b"UI", uid_bytes(transfer_syntax)),
            _explicit(0x0012, b"UI", uid_bytes(IMPLEMENTATION_CLASS_UID)),
            _explicit(0x0013, b"SH", _VERSION_NAME),
        )
    )
    return b"\x00" * 128 + b"DICM" + _explicit(0x0000, b"UL", struct.pack("<I", len(body))) + body


# --- is a received data set complete? ---------------------------------------------------------------------

IMPLICIT_LITTLE = "1.2.840.10008.1.2"
EXPLICIT_BIG = "1.2.840.10008.1.2.2"
DEFLATED = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1")
# VRs with a 2-byte reserved field and a 4-byte length in explicit VR (PS3.5 7.1.2)
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"})
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_MAX_DEPTH = 16  # nested sequences; real objects use a handful
_STUDY_INSTANCE_UID, _SOP_INSTANCE_UID = 0x0020000D, 0x00080018


class IncompleteDataset(ValueError):
    """A received data set that ends before its elements do (or is not a data set at all)."""


@dataclass(frozen=True)
class DatasetIdentity:
    """The top-level identifiers read while the data set's structure was walked."""

    study_instance_uid: str
    sop_instance_uid: str


class _Walker:
    """Walks a data set's element headers with seeks, never reading a value it does not need."""

    def __init__(self, fh: BinaryIO, *, start: int, end: int, explicit: bool, little: bool) -> None:
        self.fh, self.pos, self.end = fh, start, end
        self.explicit, self.order = explicit, "<" if little else ">"
        self.found: dict[int, bytes] = {}
        fh.seek(start)

    def _read(self, n: int) -> bytes:
        if n > self.end - self.pos:
            raise IncompleteDataset(f"the data set ends {n - (self.end - self.pos)} bytes early")
        data = self.fh.read(n)
        if len(data) != n:
            raise IncompleteDataset("the file is shorter than its data set")
        self.pos += n
        return data

    def _skip(self, n: int) -> None:
        if n > self.end - self.pos:
            raise IncompleteDataset(f"an element's value runs {n - (self.end - self.pos)} bytes past the end")
        self.pos += n
        self.fh.seek(self.pos)

    def _header(self, *, explicit: bool, order: str) -> tuple[int, bytes, int]:
        group, element = struct.unpack(order + "HH", self._read(4))
        tag = (group << 16) | element
        if group == 0xFFFE or not explicit:  # item and delimiter tags have no VR in any syntax
            return tag, b"", struct.unpack(order + "I", self._read(4))[0]
        vr = self._read(2)
        if vr in _LONG_VRS:
            return tag, vr, struct.unpack(order + "xxI", self._read(6))[0]
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            raise IncompleteDataset("an element without a valid VR")
        return tag, vr, struct.unpack(order + "H", self._read(2))[0]

    def dataset(self, *, depth: int, explicit: bool, order: str, until_item_end: bool) -> None:
        while self.pos < self.end:
            tag, vr, length = self._header(explicit=explicit, order=order)
            if tag == _ITEM_END and until_item_end:
                return
            if tag in (_ITEM, _ITEM_END, _SEQUENCE_END):
                raise IncompleteDataset("an item delimiter outside a sequence")
            if length != _UNDEFINED:
                if depth == 0 and tag in (_STUDY_INSTANCE_UID, _SOP_INSTANCE_UID) and length <= 64:
                    self.found[tag] = self._read(length)
                else:
                    self._skip(length)
                continue
            if vr not in (b"", b"SQ", b"UN", b"OB", b"OW"):
                raise IncompleteDataset("an undefined length on an element that cannot have one")
            # a sequence, or encapsulated pixel data; UN of undefined length is implicit VR inside (PS3.5 6.2.2)
            inner_explicit = explicit and vr != b"UN"
            inner_order = "<" if vr == b"UN" else order
            self.items(depth=depth + 1, explicit=inner_explicit, order=inner_order)
        if until_item_end:
            raise IncompleteDataset("an item of undefined length has no delimiter")

    def items(self, *, depth: int, explicit: bool, order: str) -> None:
        if depth > _MAX_DEPTH:
            raise IncompleteDataset(f"sequences nested more than {_MAX_DEPTH} deep")
        while True:
            tag, _, length = self._header(explicit=False, order=order)
            if tag == _SEQUENCE_END:
                return
            if tag != _ITEM:
                raise IncompleteDataset("a sequence holds something other than items")
            if length == _UNDEFINED:
                self.dataset(depth=depth, explicit=explicit, order=order, until_item_end=True)
            else:
                self._skip(length)


def check_dataset(fh: BinaryIO, *, start: int, end: int, transfer_syntax: str) -> DatasetIdentity:
    """Walk the element headers of the data set stored in `fh` from `start` to `end` and return its
    Study and SOP Instance UIDs; IncompleteDataset when an element, item or sequence runs past the end,
    a sequence is not closed, or the bytes are not a data set. Values are skipped by seeking, so a
    500 MB instance costs about as much as a small one. A deflated data set is not walked (its UIDs
    come back empty)."""
    if transfer_syntax in DEFLATED:
        return DatasetIdentity("", "")
    if end <= start:
        raise IncompleteDataset("the data set is empty")
    explicit = transfer_syntax != IMPLICIT_LITTLE
    if explicit and end - start >= 6:  # as pydicom does: a data set written implicit under an explicit
        fh.seek(start + 4)  # syntax (some modalities do) is read implicit, not refused
        vr = fh.read(2)
        explicit = len(vr) == 2 and 65 <= vr[0] <= 90 and 65 <= vr[1] <= 90
    walker = _Walker(fh, start=start, end=end, explicit=explicit, little=transfer_syntax != EXPLICIT_BIG)
    walker.dataset(depth=0, explicit=walker.explicit, order=walker.order, until_item_end=False)

    def text(tag: int) -> str:
        return walker.found.get(tag, b"").rstrip(b"\x00 ").decode("latin-1")

    return DatasetIdentity(text(_STUDY_INSTANCE_UID), text(_SOP_INSTANCE_UID))
