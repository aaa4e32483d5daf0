"""nightread's DIMSE edge (integrations.dimse): the one-thread C-GET receiver and storage SCP against
real pynetdicom SCPs on loopback, and against a scripted peer for the failures a real SCP will not
produce on demand (a connection lost in the middle of an instance, a PACS that goes silent)."""

from __future__ import annotations

import datetime as dt
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID
from pynetdicom import sop_class as sc
from pynetdicom.dimse_messages import C_ECHO_RSP, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.presentation import PresentationContext

from integrations import dimse
from integrations.dimse import framing, quiet_pynetdicom
from integrations.errors import PeerRefused, TransientError
from integrations.pacs import RETRIEVE_STORAGE_CLASSES, TRANSFER_SYNTAXES, DimseStudySource
from integrations.query import uid_hash
from integrations.sample_pacs import SamplePacs

WEEK_AGO = dt.datetime.combine(dt.date.today() - dt.timedelta(days=7), dt.time())


def source(pacs: SamplePacs, receiver: str, retrieve: str = "get") -> DimseStudySource:
    return DimseStudySource(
        name="t",
        host="127.0.0.1",
        port=pacs.port,
        called_ae=pacs.ae_title,
        timeout_s=10,
        dimse_receiver=receiver,
        retrieve=retrieve,
    )


def study_identifier(study_uid: str) -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = study_uid
    return q


def c_get(port: int, dest: Path, *, called_ae: str = "SAMPLEPACS", timeout_s: float = 10, **kw: object) -> Dataset:
    args: dict[str, object] = {
        "host": "127.0.0.1",
        "port": port,
        "called_ae": called_ae,
        "calling_ae": "NIGHTREAD",
        "identifier": study_identifier("1.2.3"),
        "dest": dest,
        "file_name": lambda uid: f"{uid_hash(uid)}.dcm",
        "storage_classes": RETRIEVE_STORAGE_CLASSES,
        "transfer_syntaxes": TRANSFER_SYNTAXES,
        "timeout_s": timeout_s,
    }
    args.update(kw)
    return dimse.c_get(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("retrieve", ["get", "move"])
def test_both_receivers_file_the_same_bytes(sample_pacs, tmp_path, retrieve):
    """The contract: nightread's receiver writes exactly the files pynetdicom's Event.encoded_dataset() writes."""
    ct = next(r for r in source(sample_pacs, "direct").find_studies(since=WEEK_AGO) if r.modalities == ("CT",))
    got = {}
    for receiver in ("direct", "pynetdicom"):
        with source(sample_pacs, receiver, retrieve) as src:
            sample_pacs.move_destinations["NIGHTREAD"] = ("127.0.0.1", src.move_port)
            got[receiver] = src.retrieve_study(
                ct.study_instance_uid, dest=tmp_path / receiver, expected=ct.number_of_instances
            )
    direct, reference = got["direct"], got["pynetdicom"]
    assert len(direct.files) == 33
    assert [p.name for p in direct.files] == [p.name for p in reference.files]
    for a, b in zip(direct.files, reference.files, strict=True):
        assert a.read_bytes() == b.read_bytes()
    assert not list((tmp_path / "direct").glob("*.part"))
    ds = dcmread(direct.files[0])
    assert ds.StudyInstanceUID == ct.study_instance_uid
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.file_meta.ImplementationClassUID == dimse.IMPLEMENTATION_CLASS_UID
    assert ds.file_meta.ImplementationVersionName == dimse.IMPLEMENTATION_VERSION_NAME


def test_the_final_status_carries_the_sub_operation_counts(sample_pacs, tmp_path):
    ct = next(r for r in source(sample_pacs, "direct").find_studies(since=WEEK_AGO) if r.modalities == ("CT",))
    final = c_get(sample_pacs.port, tmp_path, identifier=study_identifier(ct.study_instance_uid))
    assert int(final.Status) == 0x0000
    assert int(final.NumberOfCompletedSuboperations) == 33
    assert len(list(tmp_path.glob("*.dcm"))) == 33


def test_an_instance_that_cannot_be_filed_is_refused_and_nothing_is_left_half_written(sample_pacs, tmp_path):
    """A write that fails (here: a folder that does not exist) answers the C-STORE with 0xA700; the PACS
    counts it failed, the association carries on, and no partial file stays behind."""
    ref = source(sample_pacs, "direct").find_studies(since=WEEK_AGO)[0]
    final = c_get(
        sample_pacs.port,
        tmp_path,
        identifier=study_identifier(ref.study_instance_uid),
        file_name=lambda uid: f"missing/{uid_hash(uid)}.dcm",
    )
    assert int(final.NumberOfFailedSuboperations) == ref.number_of_instances
    assert int(final.get("NumberOfCompletedSuboperations", 0)) == 0
    assert list(tmp_path.rglob("*")) == []


@pytest.fixture
def scp() -> Iterator[AE]:
    """A bare pynetdicom SCP to shape association-level answers (busy, unknown called AE title)."""
    quiet_pynetdicom()
    ae = AE(ae_title="STRICT")
    ae.add_supported_context(sc.StudyRootQueryRetrieveInformationModelGet)
    ae.require_called_aet = True
    yield ae
    ae.shutdown()


def test_a_rejected_association_is_refused_and_names_the_ae_title(scp, tmp_path):
    server = scp.start_server(("127.0.0.1", 0), block=False)
    with pytest.raises(PeerRefused, match=r"rejected the association.*AE title"):
        c_get(server.server_address[1], tmp_path, called_ae="WRONG")


def test_a_busy_pacs_is_transient(scp, tmp_path):
    scp.maximum_associations = 1
    server = scp.start_server(("127.0.0.1", 0), block=False)
    port = server.server_address[1]
    client = AE(ae_title="OTHER")
    client.add_requested_context(sc.StudyRootQueryRetrieveInformationModelGet)
    holder = client.associate("127.0.0.1", port, ae_title="STRICT")
    assert holder.is_established
    try:
        with pytest.raises(TransientError, match="busy"):
            c_get(port, tmp_path, called_ae="STRICT")
    finally:
        holder.release()


def test_no_pacs_listening_is_transient(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TransientError, match=f"cannot connect.*127.0.0.1:{port}"):
        c_get(port, tmp_path)


class ScriptedPeer:
    """Accepts one association (every proposed context, first transfer syntax), then plays `script`."""

    def __init__(self, script: str) -> None:
        self.script = script
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _read_pdu(self, conn: socket.socket) -> bytes:
        header = conn.recv(6, socket.MSG_WAITALL)
        length = int.from_bytes(header[2:6], "big")
        return header + conn.recv(length, socket.MSG_WAITALL)

    @staticmethod
    def _start_instance(conn: socket.socket) -> int:
        """Send a C-STORE-RQ command for a CT instance; its presentation context id (the data set follows)."""
        store = C_STORE()
        store.MessageID = 1
        store.AffectedSOPClassUID = sc.CTImageStorage
        store.AffectedSOPInstanceUID = "1.2.3.4"
        store.Priority = 2
        store.DataSet = BytesIO(b"\x00" * 8)
        message = C_STORE_RQ()
        message.primitive_to_message(store)
        store_context = 3 + 2 * RETRIEVE_STORAGE_CLASSES.index(sc.CTImageStorage)
        conn.sendall(framing.pdata(store_context, 0x03, encode(message.command_set, True, True)))
        return store_context

    def _run(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            rq = A_ASSOCIATE_RQ()
            rq.decode(self._read_pdu(conn))
            request = rq.to_primitive()
            answer = A_ASSOCIATE()
            answer.application_context_name = request.application_context_name
            answer.calling_ae_title = request.calling_ae_title
            answer.called_ae_title = request.called_ae_title
            answer.result = 0x00
            for proposed in request.presentation_context_definition_list:
                ctx = PresentationContext()
                ctx.context_id = proposed.context_id
                ctx.result = 0x00
                ctx.transfer_syntax = [proposed.transfer_syntax[0]]
                answer.presentation_context_definition_results_list.append(ctx)
            max_length = MaximumLengthNotification()
            max_length.maximum_length_received = 16384
            implementation = ImplementationClassUIDNotification()
            implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
            answer.user_information = [max_length, implementation]
            ac = A_ASSOCIATE_AC()
            ac.from_primitive(answer)
            conn.sendall(ac.encode())
            self._read_pdu(conn)  # the C-GET request: its command ...
            self._read_pdu(conn)  # ... and its identifier
            if self.script == "half an instance, then hang up":
                store_context = self._start_instance(conn)
                conn.sendall(framing.pdata(store_context, 0x00, b"\x08\x00\x16\x00" + b"\x00" * 1000))
            elif self.script == "drip":  # an instance one byte at a time, each well within the read timeout
                store_context = self._start_instance(conn)
                pdu = framing.pdata(store_context, 0x00, b"\x08\x00\x16\x00" + b"\x00" * 1000)
                with suppress(OSError):  # bounded: at most 30 s, ended by the client's deadline
                    for i in range(len(pdu)):
                        if self.done.wait(0.1):
                            break
                        conn.sendall(pdu[i : i + 1])
            else:  # "silence": the PACS never answers the C-GET
                self.done.wait(30)

    def close(self) -> None:
        self.done.set()
        self.thread.join(timeout=10)
        self.server.close()


def test_a_connection_lost_in_the_middle_of_an_instance_is_transient_and_leaves_no_file(tmp_path):
    peer = ScriptedPeer("half an instance, then hang up")
    try:
        with pytest.raises(TransientError, match="closed the connection"):
            c_get(peer.port, tmp_path)
    finally:
        peer.close()
    assert list(tmp_path.iterdir()) == []


def test_a_silent_pacs_times_out_as_transient(tmp_path):
    peer = ScriptedPeer("silence")
    try:
        with pytest.raises(TransientError, match="no answer"):
            c_get(peer.port, tmp_path, timeout_s=0.5)
    finally:
        peer.close()
    assert list(tmp_path.iterdir()) == []


def test_a_pacs_that_drips_is_cut_off_at_the_retrieval_deadline(tmp_path):
    """Each byte comes well within the per-read timeout, so only a deadline for the whole C-GET ends it."""
    peer = ScriptedPeer("drip")
    started = time.monotonic()
    try:
        with pytest.raises(TransientError, match="did not finish within 1 s"):
            c_get(peer.port, tmp_path, timeout_s=5, deadline_s=1.0)
    finally:
        peer.close()
    assert time.monotonic() - started < 4
    assert list(tmp_path.iterdir()) == []


def test_the_storage_scp_files_by_move_originator_or_by_header_and_refuses_strangers(sample_pacs, tmp_path):
    """nightread's C-MOVE destination, driven by a pynetdicom storage SCU: an instance sent for one of our
    C-MOVEs (Move Originator AE title + Message ID) goes straight to that retrieval's folder; one without
    goes to its study's folder by its header; one of a study nobody asked for is refused (0xA700) and
    nothing of it stays behind; C-ECHO is answered; contexts we do not file are rejected one by one."""
    studies = sample_pacs.archive.studies
    by_move, by_header, stranger = studies[0].instances[0], studies[1].instances[0], studies[2].instances[0]
    with DimseStudySource(name="t", host="127.0.0.1", port=1, called_ae="PACS", retrieve="move") as src:
        port = src.move_port
        sink = src._sink
        move_id = sink.expect(tmp_path / "move", str(by_move.StudyInstanceUID))
        sink.register(str(by_header.StudyInstanceUID), tmp_path / "header")
        (tmp_path / "move").mkdir()
        (tmp_path / "header").mkdir()
        quiet_pynetdicom()
        scu = AE(ae_title="PACS")
        scu.add_requested_context(sc.Verification)
        scu.add_requested_context(sc.ModalityWorklistInformationFind)  # not a storage class
        for sop_class in {ds.SOPClassUID for ds in (by_move, by_header, stranger)}:
            scu.add_requested_context(sop_class, ExplicitVRLittleEndian)
        assoc = scu.associate("127.0.0.1", port, ae_title="NIGHTREAD")
        assert assoc.is_established
        try:
            assert [c.abstract_syntax for c in assoc.rejected_contexts] == [sc.ModalityWorklistInformationFind]
            assert assoc.send_c_echo().Status == 0x0000
            status = assoc.send_c_store(by_move, originator_aet="NIGHTREAD", originator_id=move_id)
            assert status.Status == 0x0000
            assert assoc.send_c_store(by_header).Status == 0x0000
            assert assoc.send_c_store(stranger).Status == 0xA700
        finally:
            assoc.release()
        staging = sink.staging
        assert staging is not None
        assert list(staging.iterdir()) == []
    for folder, ds in (("move", by_move), ("header", by_header)):
        assert dcmread(tmp_path / folder / f"{uid_hash(ds.SOPInstanceUID)}.dcm").SOPInstanceUID == ds.SOPInstanceUID
    assert sink.rejected == 1
    assert not staging.exists(), "the staging folder goes when the source closes"


def test_the_storage_scp_survives_a_garbled_request_and_serves_the_next_association():
    with DimseStudySource(name="t", host="127.0.0.1", port=1, called_ae="PACS", retrieve="move") as src:
        port = src.move_port
        for garbage in (b"\x01\x00\x00\x00\x00\x05hello", b"\x04\x00\x00\x00\x00\x02xx", b"GET / HTTP/1.1\r\n\r\n"):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                answer = b""
                with suppress(OSError):  # unread garbage makes the SCP's close a reset
                    s.sendall(garbage)
                    s.shutdown(socket.SHUT_WR)
                    while chunk := s.recv(4096):
                        answer += chunk
                assert not answer.startswith(b"\x02"), "no association for garbage: an abort or nothing"
        quiet_pynetdicom()
        scu = AE(ae_title="PACS")
        scu.add_requested_context(sc.Verification)
        assoc = scu.associate("127.0.0.1", port, ae_title="NIGHTREAD")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()


@pytest.mark.parametrize("sop_instance", ["1.2.3.4", "1.2.3.45"])  # even and odd lengths (UID padding)
def test_hand_encoded_responses_are_the_bytes_pynetdicom_encodes(sop_instance):
    store = C_STORE()
    store.MessageIDBeingRespondedTo = 7
    store.AffectedSOPClassUID = sc.CTImageStorage
    store.AffectedSOPInstanceUID = sop_instance
    store.Status = 0xA700
    message = C_STORE_RSP()
    message.primitive_to_message(store)
    ours = framing.response(0x8001, message_id=7, sop_class=sc.CTImageStorage, sop_instance=sop_instance, status=0xA700)
    assert ours == encode(message.command_set, True, True)
    parsed = framing.parse_command(ours)
    assert framing.ui(parsed, 0x1000) == sop_instance
    assert framing.us(parsed, 0x0900) == 0xA700

    echo = C_ECHO()
    echo.MessageIDBeingRespondedTo = 3
    echo.AffectedSOPClassUID = sc.Verification
    echo.Status = 0x0000
    message = C_ECHO_RSP()
    message.primitive_to_message(echo)
    ours = framing.response(0x8030, message_id=3, sop_class=sc.Verification, status=0x0000)
    assert ours == encode(message.command_set, True, True)


def test_the_storage_scp_rejects_associations_over_its_limit_as_transient(tmp_path):
    server = dimse.StreamingStorageServer(
        ae_title="NIGHTREAD",
        host="127.0.0.1",
        port=0,
        place=lambda request: dimse.Placement(tmp_path / f"{uid_hash(request.sop_instance)}.dcm"),
        on_stored=lambda path, request: 0x0000,
        storage_classes=RETRIEVE_STORAGE_CLASSES,
        transfer_syntaxes=TRANSFER_SYNTAXES,
        timeout_s=10,
        policy=dimse.EdgePolicy(max_associations=1),
    ).start()
    quiet_pynetdicom()
    scu = AE(ae_title="PACS")
    scu.add_requested_context(sc.Verification)
    try:
        first = scu.associate("127.0.0.1", server.server_address[1], ae_title="NIGHTREAD")
        assert first.is_established
        second = scu.associate("127.0.0.1", server.server_address[1], ae_title="NIGHTREAD")
        assert second.is_rejected
        assert second.acceptor.primitive.result == 0x02, "transient: the sender may try again"
        first.release()
    finally:
        server.shutdown()
