"""Fuzzing the DIMSE edge's receive loop: arbitrary byte streams, mutated valid associations (an A-ASSOCIATE-RQ,
a C-STORE of a real CT instance, a release) and pynetdicom's own encoded-PDU test vectors, each sent to a
live storage SCP on loopback. Every input must end in a clean answer (an association, a rejection or an
A-ABORT) or a close; no thread and no partial file may be left; what is filed is a complete data set;
and the receiver's memory stays bounded (tracemalloc's peak over the whole run).

`make fuzz` runs it with NIGHTREAD_FUZZ_EXAMPLES=3000; the suite runs 60 examples per strategy.
"""

from __future__ import annotations

import io
import os
import socket
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pynetdicom import sop_class as sc
from pynetdicom.tests import encoded_pdu_items as vectors

from integrations import dimse
from integrations.dimse import framing, quiet_pynetdicom
from integrations.pacs import STORAGE_SCP_CLASSES, TRANSFER_SYNTAXES
from integrations.query import uid_hash
from tests.unit.test_dimse_hostile import _dataset_bytes, associate_rq, store_command

BUDGET = int(os.environ.get("NIGHTREAD_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=BUDGET, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=True
)
PEAK_BOUND = 24 << 20  # the receive path's own buffers are ~3 MB: a PDU, the read buffer, the write buffer

_CT = Path(get_testdata_file("CT_small.dcm"))
_WIRE = _dataset_bytes(_CT)
assert _WIRE is not None
_CT_DATA, _CT_SYNTAX = _WIRE


def valid_session() -> bytes:
    """What a modality sends to push CT_small: association, one C-STORE in 16 KB fragments, release."""
    parts = [associate_rq()]
    parts.append(framing.pdata(3, 0x03, store_command(sop_instance="1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322")))
    chunks = [_CT_DATA[i : i + 16000] for i in range(0, len(_CT_DATA), 16000)]
    for i, chunk in enumerate(chunks):
        parts.append(framing.pdata(3, 0x02 if i == len(chunks) - 1 else 0x00, chunk))
    parts.append(framing.RELEASE_RQ_PDU)
    return b"".join(parts)


SESSION = valid_session()


class Edge:
    """A storage SCP on loopback, shared by every example of one test, and what it filed."""

    def __init__(self, folder: Path) -> None:
        quiet_pynetdicom()
        self.folder = folder
        self.server = dimse.StreamingStorageServer(
            ae_title="NIGHTREAD",
            host="127.0.0.1",
            port=0,
            place=lambda request: dimse.Placement(folder / f"{uid_hash(request.sop_instance)}.dcm"),
            on_stored=lambda path, request: 0x0000,
            storage_classes=STORAGE_SCP_CLASSES,
            transfer_syntaxes=TRANSFER_SYNTAXES,
            timeout_s=2,
            policy=dimse.EdgePolicy(allowed_aes=frozenset({"MODALITY"}), artim_s=2),
        ).start()

    def send(self, data: bytes) -> bytes:
        """Send `data`, end our side, and read everything until the SCP closes."""
        answer = b""
        with socket.create_connection(self.server.server_address, timeout=10) as sock, suppress(OSError):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                answer += chunk
        return answer

    def settle(self) -> None:
        """Wait for every connection thread to end, then check what is on disk."""
        deadline = time.monotonic() + 10
        while self.server.thread_count():
            assert time.monotonic() < deadline, "a connection thread was left behind"
            time.sleep(0.005)
        assert not list(self.folder.glob("*.part")), "a partial file was left behind"
        for path in self.folder.glob("*.dcm"):  # whatever was filed is a whole data set
            data = path.read_bytes()
            wire = _dataset_bytes(path)
            assert wire is not None, "a filed instance without its File Meta Information"
            framing.check_dataset(io.BytesIO(wire[0]), start=0, end=len(wire[0]), transfer_syntax=wire[1])
            path.unlink()
            del data


@pytest.fixture
def edge(tmp_path: Path) -> Iterator[Edge]:
    tracemalloc.start()
    e = Edge(tmp_path)
    yield e
    e.server.shutdown()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < PEAK_BOUND, f"the receive path peaked at {peak / 2**20:.1f} MiB"


def first_pdu_type(answer: bytes) -> int | None:
    return answer[0] if answer else None


def test_the_valid_session_files_the_instance(edge: Edge) -> None:
    answer = edge.send(SESSION)
    assert first_pdu_type(answer) == 0x02
    assert answer.endswith(framing.RELEASE_RP_PDU)
    assert len(list(edge.folder.glob("*.dcm"))) == 1
    edge.settle()


@FUZZ
@given(data=st.binary(max_size=4096))
def test_arbitrary_bytes_end_in_a_refusal_or_a_close(edge: Edge, data: bytes) -> None:
    answer = edge.send(data)
    assert first_pdu_type(answer) in (None, 0x03, 0x07)
    edge.settle()


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, len(SESSION) - 1), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, len(SESSION) - 1), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, len(SESSION) - 1), st.integers(0, 255)),
    st.tuples(st.just("length"), st.sampled_from([2, 74 + 2, len(associate_rq()) + 2]), st.integers(0, 255)),
)


def mutate(session: bytes, steps: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(session)
    for kind, at, value in steps:
        at = min(at, len(data) - 1)
        if kind == "flip":
            data[at] ^= value
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = bytes([value]) * 4
        else:  # a PDU length byte set to anything
            data[at] = value
        if not data:
            break
    return bytes(data)


@FUZZ
@given(steps=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_valid_sessions_end_cleanly(edge: Edge, steps: list[tuple[str, int, int]]) -> None:
    answer = edge.send(mutate(SESSION, steps))
    assert first_pdu_type(answer) in (None, 0x02, 0x03, 0x07)
    edge.settle()


PDU_VECTORS = {
    name: value
    for name, value in vars(vectors).items()
    if isinstance(value, bytes) and not name.startswith("_") and value[:1] in (b"\x01", b"\x02", b"\x03", b"\x04")
}


@pytest.mark.parametrize("name", sorted(PDU_VECTORS))
def test_pynetdicoms_encoded_pdus_get_an_answer_or_an_abort(edge: Edge, name: str) -> None:
    """pynetdicom's own test vectors (requests with user identity, role selection, extended negotiation;
    accept/reject/data PDUs out of place) sent as the first PDU: a request is answered (accepted,
    or rejected for its AE titles, which are not ours), anything else is aborted."""
    answer = edge.send(PDU_VECTORS[name])
    if PDU_VECTORS[name][0] == 0x01:
        assert first_pdu_type(answer) in (0x02, 0x03, 0x07)
    else:
        assert first_pdu_type(answer) in (None, 0x07)
    edge.settle()


def test_the_edge_serves_a_modality_after_the_fuzzing(edge: Edge) -> None:
    for data in (b"\x01\x00\xff\xff\xff\xff", SESSION[:100], b"\x04" * 64):
        edge.send(data)
    from pynetdicom import AE

    scu = AE(ae_title="MODALITY")
    scu.add_requested_context(sc.Verification)
    assoc = scu.associate("127.0.0.1", edge.server.server_address[1], ae_title="NIGHTREAD")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    edge.settle()
