"""The DIMSE edge against a hostile or broken peer: every length bounded before it is buffered, every
violation an A-ABORT (never a bare exception), idle sockets unable to hold the association limit, no
acknowledgement for an instance cut short, an orphaned request answered, AE titles and hosts checked.

The peers are raw sockets on loopback (what an attacker has) and pynetdicom's SCU (what a modality has).
"""

from __future__ import annotations

import io
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLossless
from pynetdicom import AE, _config
from pynetdicom import sop_class as sc
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context

from integrations import dimse
from integrations.dimse import framing, quiet_pynetdicom
from integrations.errors import ProtocolError
from integrations.pacs import STORAGE_SCP_CLASSES, TRANSFER_SYNTAXES, DimseStudySource
from integrations.query import uid_hash

CT_FILE = get_testdata_file("CT_small.dcm")


# --- framing, without a socket --------------------------------------------------------------------------


def test_pdu_lengths_are_checked_against_what_may_come_now() -> None:
    big_rq = bytes([0x01, 0]) + (400 << 20).to_bytes(4, "big")
    with pytest.raises(ProtocolError, match="declares 419430400 bytes"):
        framing.check_pdu_header(big_rq, established=False)
    assert framing.check_pdu_header(bytes([0x01, 0, 0, 0, 0x10, 0]), established=False) == (0x01, 0x1000)
    p_data = bytes([0x04, 0]) + (64 << 20).to_bytes(4, "big")
    with pytest.raises(ProtocolError, match="at most 1048576"):
        framing.check_pdu_header(p_data, established=True)
    with pytest.raises(ProtocolError, match="unexpected PDU type 0x04 before"):
        framing.check_pdu_header(bytes([0x04, 0, 0, 0, 0, 8]), established=False)
    with pytest.raises(ProtocolError, match="unexpected PDU type 0x01 after"):
        framing.check_pdu_header(bytes([0x01, 0, 0, 0, 0, 8]), established=True)
    with pytest.raises(ProtocolError, match="unrecognized PDU type 0x47"):
        framing.check_pdu_header(b"GET / ", established=False)
    with pytest.raises(ProtocolError, match="declares 5 bytes"):
        framing.check_pdu_header(bytes([0x07, 0, 0, 0, 0, 5]), established=True)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "without a PDV item"),
        (b"\x00\x00\x00", "header runs past"),
        (b"\x00\x00\x00\x01\x01\x03", "declares 1 bytes"),
        (b"\x00\x00\x10\x00\x01\x03abc", "declares 4096 bytes"),
        (b"\x00\x00\x00\x03\x02\x03x", "context id 2"),
        (b"\x00\x00\x00\x03\x01\x07x", "control 0x07"),
    ],
)
def test_malformed_pdv_items_are_protocol_errors(body: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        list(framing.pdv_items(body))


def test_pdv_items_are_views_of_their_pdu() -> None:
    body = b"\x00\x00\x00\x04\x01\x03ab" + b"\x00\x00\x00\x03\x03\x00c"
    assert [(c, m, bytes(v)) for c, m, v in framing.pdv_items(body)] == [(1, 3, b"ab"), (3, 0, b"c")]


def test_a_command_element_running_past_its_set_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="declares 100 bytes"):
        framing.parse_command(struct.pack("<HHI", 0, 0x0100, 100) + b"\x01\x00")
    with pytest.raises(ProtocolError, match="inside an element header"):
        framing.parse_command(b"\x00\x00\x00")


TEST_FILES = Path(get_testdata_file("CT_small.dcm")).parent


def _dataset_bytes(path: Path) -> tuple[bytes, str] | None:
    """A file's data set as it travels on the wire, and its transfer syntax (None: no File Meta)."""
    raw = path.read_bytes()
    if raw[128:132] != b"DICM":
        return None
    offset, syntax = 132, ""
    while offset + 8 <= len(raw) and struct.unpack_from("<H", raw, offset)[0] == 0x0002:
        element, vr = struct.unpack_from("<H2s", raw, offset + 2)
        if vr in (b"OB", b"OW", b"UN", b"UT", b"SQ"):
            length, header = struct.unpack_from("<I", raw, offset + 8)[0], 12
        else:
            length, header = struct.unpack_from("<H", raw, offset + 6)[0], 8
        if element == 0x0010:
            syntax = raw[offset + header : offset + header + length].rstrip(b"\x00 ").decode()
        offset += header + length
    return (raw[offset:], syntax) if syntax else None


def _check(data: bytes, syntax: str) -> framing.DatasetIdentity:
    return framing.check_dataset(io.BytesIO(data), start=0, end=len(data), transfer_syntax=syntax)


def _pydicom_reads_whole(path: Path) -> bool:
    try:
        ds = dcmread(path)
        ds.walk(lambda _ds, _elem: None)
        str(ds)
    except Exception:
        return False
    return True


# pydicom's bundled files that travel as such (with File Meta Information), whole or kept truncated
BUNDLED = [
    p
    for p in sorted(TEST_FILES.glob("*.dcm"))
    if _dataset_bytes(p) is not None and ("truncated" in p.name or _pydicom_reads_whole(p))
]


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.name)
def test_pydicoms_files_pass_whole_and_fail_cut(path: Path) -> None:
    """Every bundled pydicom test file that pydicom reads whole passes the walk with its own UIDs, and is
    refused when cut inside an element (its header, or the value of its last element: the pixel data,
    an item); the files pydicom's own tests keep truncated (MR_truncated, rtplan_truncated) are refused
    as they are. (A cut exactly between two elements leaves a well-formed, shorter data set: no reader
    can tell, dcmtk's included; the PDV's last-fragment bit is what says the data set ended.)"""
    assert len(BUNDLED) > 60
    wire = _dataset_bytes(path)
    assert wire is not None
    data, syntax = wire
    if syntax in framing.DEFLATED:
        assert _check(data, syntax) == framing.DatasetIdentity("", "")
        return
    if "truncated" in path.name:
        with pytest.raises(framing.IncompleteDataset):
            _check(data, syntax)
        return
    found = _check(data, syntax)
    ds = dcmread(path, stop_before_pixels=True)
    assert found.sop_instance_uid == str(ds.get("SOPInstanceUID", ""))
    assert found.study_instance_uid == str(ds.get("StudyInstanceUID", ""))
    for cut in (1, 7, len(data) - 9, len(data) - 1):
        if data[cut:].strip(b"\x00") == b"":  # only padding after the cut: nothing of value lost
            continue
        with pytest.raises(framing.IncompleteDataset):
            _check(data[:cut], syntax)


def test_sequences_nested_without_end_are_refused() -> None:
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    nested = b"".join(struct.pack("<HH2sHI", 0x0040, 0x0275, b"SQ", 0, 0xFFFFFFFF) + item for _ in range(40))
    with pytest.raises(framing.IncompleteDataset, match="nested more than 16"):
        _check(nested, ExplicitVRLittleEndian)
    with pytest.raises(framing.IncompleteDataset, match="empty"):
        _check(b"", ExplicitVRLittleEndian)


# --- the storage SCP against raw sockets ------------------------------------------------------------------


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[dimse.StreamingStorageServer]:
    quiet_pynetdicom()
    server = dimse.StreamingStorageServer(
        ae_title="NIGHTREAD",
        host="127.0.0.1",
        port=0,
        place=lambda request: dimse.Placement(tmp_path / f"{uid_hash(request.sop_instance)}.dcm"),
        on_stored=lambda path, request: 0x0000,
        storage_classes=STORAGE_SCP_CLASSES,
        transfer_syntaxes=TRANSFER_SYNTAXES,
        timeout_s=5,
        policy=dimse.EdgePolicy(
            allowed_aes=frozenset({"MODALITY"}), max_associations=2, max_pending=6, max_pending_per_host=3, artim_s=1
        ),
    ).start()
    yield server
    server.shutdown()


def connect(server: dimse.StreamingStorageServer, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(5)
    sock.connect(server.server_address)
    return sock


def answer_of(sock: socket.socket) -> bytes:
    """Everything the SCP sends until it closes (a reset counts as the end)."""
    data = b""
    with suppress(OSError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def associate_rq(*, calling: str = "MODALITY", called: str = "NIGHTREAD", contexts: list | None = None) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    items = contexts or [build_context(sc.Verification), build_context(sc.CTImageStorage, ExplicitVRLittleEndian)]
    for i, context in enumerate(items):
        context.context_id = 2 * i + 1
    primitive.presentation_context_definition_list = items
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    primitive.user_information = [max_length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def associated(server: dimse.StreamingStorageServer, source: str = "127.0.0.1") -> socket.socket:
    sock = connect(server, source)
    sock.sendall(associate_rq())
    header = sock.recv(6, socket.MSG_WAITALL)
    assert header[0] == 0x02, "associated"
    sock.recv(int.from_bytes(header[2:6], "big"), socket.MSG_WAITALL)
    return sock


def store_command(sop_instance: str = "1.2.3.4", message_id: int = 1) -> bytes:
    store = C_STORE()
    store.MessageID = message_id
    store.AffectedSOPClassUID = sc.CTImageStorage
    store.AffectedSOPInstanceUID = sop_instance
    store.Priority = 2
    store.DataSet = io.BytesIO(b"\x00")
    message = C_STORE_RQ()
    message.primitive_to_message(store)
    return bytes(encode(message.command_set, True, True))


def eventually(condition, what: str, timeout_s: float = 10) -> None:  # type: ignore[no-untyped-def]
    """Poll `condition` until it holds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def wait_for_threads(server: dimse.StreamingStorageServer, at_most: int, timeout_s: float = 10) -> None:
    """Poll until the server's connection threads are down to `at_most`."""
    eventually(lambda: server.thread_count() <= at_most, f"{server.thread_count()} connection threads left", timeout_s)


def test_a_forged_request_length_is_aborted_before_anything_is_buffered(scp) -> None:
    with connect(scp) as sock:
        sock.sendall(bytes([0x01, 0]) + (400 << 20).to_bytes(4, "big") + b"\x00" * 4096)
        assert answer_of(sock)[:1] in (b"\x07", b""), "an A-ABORT (or a reset), never an association"
    wait_for_threads(scp, 0)


@pytest.mark.parametrize(
    "after_association",
    [
        bytes([0x04, 0]) + (64 << 20).to_bytes(4, "big") + b"\x00" * 1024,  # a P-DATA over the announced 1 MiB
        bytes([0x09, 0, 0, 0, 0, 4, 0, 0, 0, 0]),  # an unknown PDU type
        bytes([0x04, 0, 0, 0, 0, 6, 0, 0, 0x10, 0, 0x01, 0x03]),  # a PDV item longer than its PDU
        bytes([0x04, 0, 0, 0, 0, 6, 0, 0, 0, 2, 0x05, 0x03]),  # a context that was never accepted
        framing.pdata(3, 0x02, b"\x08\x00"),  # a data set fragment no command announced
        framing.pdata(1, 0x03, struct.pack("<HHI", 0, 0x0100, 2) + b"\x99\x09"),  # an unknown command
    ],
)
def test_a_violation_after_association_is_an_abort(scp, tmp_path, after_association: bytes) -> None:
    with associated(scp) as sock:
        sock.sendall(after_association)
        assert answer_of(sock)[:1] in (b"\x07", b"")
    wait_for_threads(scp, 0)
    assert list(tmp_path.iterdir()) == []


def test_a_command_set_that_never_ends_is_bounded(scp) -> None:
    with associated(scp) as sock:
        sent = 0
        with suppress(OSError):  # the SCP aborts and closes while we are still sending
            while sent < 8 << 20:
                sock.sendall(framing.pdata(1, 0x01, b"\x00" * 16000))  # command fragments, never the last
                sent += 16000
        assert sent < 8 << 20, "aborted long before 8 MiB of command"
    wait_for_threads(scp, 0)


def test_idle_sockets_cannot_hold_the_association_limit(scp) -> None:
    """Twelve silent connections from one host: three wait (its share of the pending pool), nine are
    closed at once without a thread; a modality on another address associates at once, and the silent
    ones are closed when their ARTIM time runs out."""
    idle = [connect(scp, "127.0.0.2") for _ in range(12)]
    try:
        closed_at_once = 0
        for sock in idle:
            sock.settimeout(0.5)
            with suppress(TimeoutError):
                closed_at_once += answer_of(sock) == b""
        assert closed_at_once >= 9
        assert scp.thread_count() <= 3
        with associated(scp) as sock:
            sock.sendall(framing.RELEASE_RQ_PDU)
            assert sock.recv(10, socket.MSG_WAITALL) == framing.RELEASE_RP_PDU
        wait_for_threads(scp, 0, timeout_s=5)  # ARTIM (1 s here) ended the idle ones
    finally:
        for sock in idle:
            sock.close()


def test_a_request_that_drips_is_cut_off_at_artim(scp) -> None:
    request = associate_rq()
    with connect(scp) as sock:
        started = time.monotonic()
        with suppress(OSError):
            for i in range(len(request)):
                sock.sendall(request[i : i + 1])
                if answer_ready(sock, 0.2):
                    break
        assert answer_of(sock)[:1] != b"\x02"
        assert time.monotonic() - started < 5
    wait_for_threads(scp, 0)


def answer_ready(sock: socket.socket, timeout_s: float) -> bool:
    sock.settimeout(timeout_s)
    try:
        return sock.recv(1, socket.MSG_PEEK) is not None
    except TimeoutError:
        return False
    finally:
        sock.settimeout(5)


def test_peers_that_reset_at_once_leave_no_pending_slot_behind(scp) -> None:
    """A connection reset before its thread even looks at it (getpeername fails): its pending slot is
    given back, so quick connect-and-reset peers can never fill the pool and lock modalities out."""
    import struct

    for _ in range(100):
        sock = connect(scp, "127.0.0.3")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a RST
    wait_for_threads(scp, 0, timeout_s=10)
    assert scp._pending == {}, "every pending slot given back"
    with associated(scp, "127.0.0.3") as sock:
        sock.sendall(framing.RELEASE_RQ_PDU)
        assert sock.recv(10, socket.MSG_WAITALL) == framing.RELEASE_RP_PDU


def test_three_hundred_connections_never_get_three_hundred_threads(scp) -> None:
    socks = []
    try:
        most = 0
        for _ in range(300):
            with suppress(OSError):
                socks.append(connect(scp))
            most = max(most, scp.thread_count())
        assert most <= 6, "the pending pool bounds the threads"
    finally:
        for sock in socks:
            sock.close()
    wait_for_threads(scp, 0)


def test_the_called_ae_title_and_the_calling_ae_title_are_checked(scp) -> None:
    with connect(scp) as sock:
        sock.sendall(associate_rq(called="SOMEONE"))
        assert answer_of(sock) == framing.REJECT_CALLED_AE_PDU
    with connect(scp) as sock:
        sock.sendall(associate_rq(calling="INTRUDER"))
        assert answer_of(sock) == framing.REJECT_CALLING_AE_PDU


def test_a_host_not_on_the_allow_list_is_closed_before_anything_is_read(tmp_path) -> None:
    server = dimse.StreamingStorageServer(
        ae_title="NIGHTREAD",
        host="127.0.0.1",
        port=0,
        place=lambda request: dimse.Placement(tmp_path / "x.dcm"),
        on_stored=lambda path, request: 0x0000,
        storage_classes=STORAGE_SCP_CLASSES,
        transfer_syntaxes=TRANSFER_SYNTAXES,
        timeout_s=5,
        policy=dimse.EdgePolicy(allowed_aes=frozenset({"MODALITY"}), allowed_hosts=frozenset({"127.0.0.2"})),
    ).start()
    try:
        with connect(server, "127.0.0.1") as sock:
            sock.sendall(associate_rq())
            assert answer_of(sock) == b""
        with associated(server, "127.0.0.2") as sock:
            sock.sendall(framing.RELEASE_RQ_PDU)
            assert sock.recv(10, socket.MSG_WAITALL) == framing.RELEASE_RP_PDU
    finally:
        server.shutdown()


def test_an_orphaned_request_is_answered_and_leaves_no_part_file(scp, tmp_path) -> None:
    """A C-STORE whose data set is cut short by the next command: refused (0xA700), its partial file
    removed, and the next command (a C-ECHO) answered as usual."""
    echo = C_ECHO()
    echo.MessageID = 2
    echo.AffectedSOPClassUID = sc.Verification
    echo_message = C_ECHO_RQ()
    echo_message.primitive_to_message(echo)
    with associated(scp) as sock:
        sock.sendall(framing.pdata(3, 0x03, store_command()))
        sock.sendall(framing.pdata(3, 0x00, b"\x08\x00\x16\x00UI\x04\x001.2\x00"))  # not the last fragment
        eventually(lambda: list(tmp_path.glob("*.part")), "the instance is being written")
        sock.sendall(framing.pdata(1, 0x03, bytes(encode(echo_message.command_set, True, True))))
        answers = []
        for _ in range(2):
            header = sock.recv(6, socket.MSG_WAITALL)
            body = sock.recv(int.from_bytes(header[2:6], "big"), socket.MSG_WAITALL)
            ((_, _, command),) = framing.pdv_items(body)
            parsed = framing.parse_command(bytes(command))
            answers.append((framing.us(parsed, framing.COMMAND_FIELD), framing.us(parsed, framing.STATUS)))
        assert answers == [(framing.C_STORE_RSP, 0xA700), (framing.C_ECHO_RSP, 0x0000)]
        sock.sendall(framing.RELEASE_RQ_PDU)
        assert sock.recv(10, socket.MSG_WAITALL) == framing.RELEASE_RP_PDU
    assert list(tmp_path.iterdir()) == []


# --- the storage SCP against a modality (pynetdicom's SCU) ------------------------------------------------


def _send(port: int, *datasets: Dataset | Path, ae_title: str = "MODALITY", syntax: str = ExplicitVRLittleEndian):
    scu = AE(ae_title=ae_title)
    for item in datasets:
        sop_class = item.SOPClassUID if isinstance(item, Dataset) else dcmread(item).SOPClassUID
        scu.add_requested_context(sop_class, syntax)
    assoc = scu.associate("127.0.0.1", port, ae_title="NIGHTREAD")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(item).Status) for item in datasets]
    finally:
        assoc.release()


def test_a_truncated_instance_is_refused_and_never_replaces_a_good_copy(scp, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send a file's bytes as they are
    good = dcmread(CT_FILE)
    target = tmp_path / f"{uid_hash(good.SOPInstanceUID)}.dcm"
    assert _send(scp.server_address[1], good) == [0x0000]
    first = target.read_bytes()
    cut = tmp_path / "cut.dcm.src"
    cut.write_bytes(Path(CT_FILE).read_bytes()[:-5000])  # cut inside Pixel Data
    assert _send(scp.server_address[1], cut) == [0xA700]
    assert target.read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, cut.name])


def test_every_storage_class_and_jpeg_lossless_process_14_are_accepted(scp, tmp_path) -> None:
    """A CT push with its dose SR, a tomosynthesis and a legacy converted enhanced CT all associate: the
    SCP accepts every storage class pynetdicom knows (no 128-context limit applies to an SCP)."""
    assert len(STORAGE_SCP_CLASSES) > 150
    assert JPEGLossless in TRANSFER_SYNTAXES
    scu = AE(ae_title="MODALITY")
    wanted = [
        sc.XRayRadiationDoseSRStorage,
        sc.BreastTomosynthesisImageStorage,
        sc.LegacyConvertedEnhancedCTImageStorage,
        sc.VLPhotographicImageStorage,
    ]
    for sop_class in wanted:
        scu.add_requested_context(sop_class, JPEGLossless)
    assoc = scu.associate("127.0.0.1", scp.server_address[1], ae_title="NIGHTREAD")
    try:
        assert assoc.is_established
        assert sorted(str(c.abstract_syntax) for c in assoc.accepted_contexts) == sorted(wanted)
    finally:
        assoc.release()


def test_a_c_move_arrival_of_another_study_is_refused(sample_pacs, tmp_path) -> None:
    """An instance that claims our Move Originator AE title and a live Message ID, but whose header names
    another study than that C-MOVE asked for, is refused and not filed; the Message IDs are random."""
    studies = sample_pacs.archive.studies
    asked, other = studies[0], studies[1]
    with DimseStudySource(name="t", host="127.0.0.1", port=1, called_ae="PACS", retrieve="move") as src:
        port = src.move_port
        (tmp_path / "move").mkdir()
        ids = {src._sink.expect(tmp_path / "move", str(asked.instances[0].StudyInstanceUID)) for _ in range(5)}
        assert len(ids) == 5
        assert ids != {1, 2, 3, 4, 5}, "random, not sequential"
        move_id = next(iter(ids))
        quiet_pynetdicom()
        scu = AE(ae_title="PACS")
        for ds in (asked.instances[0], other.instances[0]):
            scu.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
        assoc = scu.associate("127.0.0.1", port, ae_title="NIGHTREAD")
        assert assoc.is_established
        try:
            ok = assoc.send_c_store(asked.instances[0], originator_aet="NIGHTREAD", originator_id=move_id)
            forged = assoc.send_c_store(other.instances[0], originator_aet="NIGHTREAD", originator_id=move_id)
        finally:
            assoc.release()
        assert (int(ok.Status), int(forged.Status)) == (0x0000, 0xA700)
        intruder = AE(ae_title="INTRUDER")
        intruder.add_requested_context(asked.instances[0].SOPClassUID, ExplicitVRLittleEndian)
        refused = intruder.associate("127.0.0.1", port, ae_title="NIGHTREAD")
        assert refused.is_rejected, "only the PACS's AE title may send C-MOVE sub-operations"
    assert [p.name for p in (tmp_path / "move").iterdir()] == [f"{uid_hash(asked.instances[0].SOPInstanceUID)}.dcm"]


def test_associations_announce_nightreads_implementation_uid(scp) -> None:
    scu = AE(ae_title="MODALITY")
    scu.add_requested_context(sc.Verification)
    assoc = scu.associate("127.0.0.1", scp.server_address[1], ae_title="NIGHTREAD")
    try:
        assert assoc.acceptor.implementation_class_uid == dimse.IMPLEMENTATION_CLASS_UID
        assert assoc.acceptor.implementation_version_name == dimse.IMPLEMENTATION_VERSION_NAME
    finally:
        assoc.release()
    assert len(dimse.IMPLEMENTATION_CLASS_UID) <= 64
    assert len(dimse.IMPLEMENTATION_VERSION_NAME) <= 16
