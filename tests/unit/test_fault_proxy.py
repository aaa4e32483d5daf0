"""The fault proxy (tests/fault_proxy.py) in front of a tiny echo server on loopback: each mode does what
its name says, faults are counted when they happen, the mix is checked, and stopping leaves no thread."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from tests.fault_proxy import FaultProxy, PduBoundaries, check_faults

pytestmark = pytest.mark.timeout(60)


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    accepted = 0  # connections that reached it


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        assert isinstance(self.server, EchoServer)
        self.server.accepted += 1
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except OSError:
            pass


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def port_of(server: EchoServer) -> int:
    return int(server.server_address[1])


def pdu(length: int, fill: int) -> bytes:
    """A P-DATA-TF-shaped PDU: type 0x04, reserved, 4-byte length, body."""
    return bytes([0x04, 0]) + length.to_bytes(4, "big") + bytes([fill]) * length


def read_all(sock: socket.socket, *, limit: int = 1 << 20) -> tuple[bytes, BaseException | None]:
    """Everything the proxy sends until it closes or resets; (bytes, the error that ended it)."""
    got = bytearray()
    try:
        while len(got) < limit and (data := sock.recv(65536)):
            got += data
    except OSError as exc:
        return bytes(got), exc
    return bytes(got), None


def test_pass_forwards_both_ways_and_counts_no_fault(echo: EchoServer) -> None:
    payload = bytes(range(256)) * 400
    with FaultProxy(target_port=port_of(echo)) as proxy, socket.create_connection(("127.0.0.1", proxy.port)) as c:
        c.settimeout(10)
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        got, error = read_all(c)
    assert (got, error) == (payload, None)
    assert proxy.chosen == {"pass": 1}
    assert proxy.faults == 0


def test_abort_closes_at_once_and_never_reaches_the_target(echo: EchoServer) -> None:
    with FaultProxy(target_port=port_of(echo), faults={"abort": 1.0}) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as c:
            c.settimeout(10)
            got, _ = read_all(c)
        assert got == b""
        assert proxy.injected == {"abort": 1}
    assert echo.accepted == 0


@pytest.mark.parametrize(
    ("cut", "expected"),
    [
        (50, 50),  # inside the first PDU's body: cut there
        (106, 107),  # exactly between the two PDUs: one byte of the next header more, so it is mid-PDU
        (3, 3),  # inside the first header
    ],
)
def test_reset_cuts_inside_a_pdu_then_sends_a_rst(echo: EchoServer, cut: int, expected: int) -> None:
    stream = pdu(100, 0xAA) + pdu(200, 0xBB)
    with FaultProxy(target_port=port_of(echo), faults={"reset": 1.0}, cut_after=(cut, cut)) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as c:
            c.settimeout(10)
            c.sendall(stream)
            got, error = read_all(c)
        assert got == stream[:expected]
        assert isinstance(error, ConnectionResetError), error
        assert proxy.injected == {"reset": 1}
    boundaries = PduBoundaries()
    boundaries.feed(got)
    assert not boundaries.at_boundary()


def test_a_reset_drawn_for_a_connection_that_ends_first_is_a_pass(echo: EchoServer) -> None:
    with FaultProxy(target_port=port_of(echo), faults={"reset": 1.0}, cut_after=(1000, 1000)) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as c:
            c.settimeout(10)
            c.sendall(b"x" * 10)
            c.shutdown(socket.SHUT_WR)
            got, error = read_all(c)
        assert (got, error) == (b"x" * 10, None)
        assert proxy.chosen == {"reset": 1}
        assert proxy.faults == 0


def test_stall_stops_the_bytes_for_a_while_then_they_flow(echo: EchoServer) -> None:
    with FaultProxy(target_port=port_of(echo), faults={"stall": 1.0}, stall_s=1.0, cut_after=(10, 10)) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as c:
            c.settimeout(10)
            c.sendall(b"a" * 10 + b"b" * 90)
            first = bytearray()
            while len(first) < 10:
                first += c.recv(65536)
            t0 = time.monotonic()
            c.settimeout(0.3)
            with pytest.raises(TimeoutError):
                c.recv(65536)  # stalled: nothing comes
            c.settimeout(10)
            rest = bytearray()
            while len(rest) < 90:
                rest += c.recv(65536)
            waited = time.monotonic() - t0
        assert (bytes(first), bytes(rest)) == (b"a" * 10, b"b" * 90)
        assert waited >= 0.8
        assert proxy.injected == {"stall": 1}


def test_drip_sends_small_chunks_for_a_bounded_time_then_passes(echo: EchoServer) -> None:
    payload = bytes(range(200)) * 10
    with FaultProxy(
        target_port=port_of(echo), faults={"drip": 1.0}, drip_bytes=8, drip_interval_s=0.05, drip_s=0.4
    ) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as c:
            c.settimeout(10)
            c.sendall(payload)
            t0 = time.monotonic()
            chunks: list[bytes] = []
            while sum(map(len, chunks)) < len(payload):
                chunks.append(c.recv(65536))
            elapsed = time.monotonic() - t0
        assert b"".join(chunks) == payload
        assert all(len(chunk) <= 8 for chunk in chunks[:4]), [len(x) for x in chunks[:6]]
        assert 0.3 <= elapsed < 5, "dripped for about drip_s, then passed the rest"
        assert len(chunks) < len(payload) // 8, "after drip_s the rest passed in bigger pieces"
        assert proxy.injected == {"drip": 1}


def test_drop_connections_resets_open_connections(echo: EchoServer) -> None:
    with FaultProxy(target_port=port_of(echo)) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as c:
            c.settimeout(10)
            c.sendall(b"ping")
            assert c.recv(16) == b"ping"
            assert proxy.drop_connections() == 1
            _, error = read_all(c)
        assert isinstance(error, ConnectionResetError), error
        assert proxy.injected == {"dropped": 1}


def test_set_faults_changes_the_mix_for_new_connections(echo: EchoServer) -> None:
    with FaultProxy(target_port=port_of(echo), faults={"abort": 1.0}) as proxy:
        proxy.set_faults({})
        with socket.create_connection(("127.0.0.1", proxy.port)) as c:
            c.settimeout(10)
            c.sendall(b"hello")
            c.shutdown(socket.SHUT_WR)
            assert read_all(c) == (b"hello", None)
        assert proxy.chosen == {"pass": 1}


def test_the_mix_is_drawn_with_the_configured_shares(echo: EchoServer) -> None:
    with FaultProxy(target_port=port_of(echo), faults={"abort": 0.5}, seed=3) as proxy:
        for _ in range(60):
            with socket.create_connection(("127.0.0.1", proxy.port)) as c:
                c.settimeout(10)
                c.shutdown(socket.SHUT_WR)
                read_all(c)
        assert proxy.connections == 60
        assert 15 <= proxy.injected["abort"] <= 45
        assert proxy.injected["abort"] + proxy.chosen["pass"] == 60


def test_the_mix_is_checked_and_names_the_problem() -> None:
    with pytest.raises(ValueError, match="unknown mode 'explode'"):
        check_faults({"explode": 0.1})
    with pytest.raises(ValueError, match="probability of 'abort' must be within"):
        check_faults({"abort": 1.5})
    with pytest.raises(ValueError, match=r"sum to 1\.200"):
        check_faults({"abort": 0.6, "reset": 0.6})
    with pytest.raises(ValueError, match='"target_host" must be a loopback address'):
        FaultProxy(target_port=1, target_host="10.0.0.1")


def test_connections_over_the_bound_are_refused_and_stop_joins_every_thread(
    echo: EchoServer,
) -> None:
    proxy = FaultProxy(target_port=port_of(echo), max_connections=1).start()
    try:
        first = socket.create_connection(("127.0.0.1", proxy.port))
        first.settimeout(10)
        first.sendall(b"1")
        assert first.recv(4) == b"1"  # the one slot is taken
        with socket.create_connection(("127.0.0.1", proxy.port)) as second:
            second.settimeout(10)
            got, _ = read_all(second)
        assert got == b""
        assert proxy.refused == 1
    finally:
        proxy.stop()
    _, error = read_all(first)
    first.close()
    assert isinstance(error, ConnectionResetError), "stop() resets what is still open"
    assert not [t for t in proxy._threads if t.is_alive()]
    assert proxy._acceptor is not None
    assert not proxy._acceptor.is_alive()


def test_pdu_boundaries() -> None:
    b = PduBoundaries()
    assert b.at_boundary()
    stream = pdu(3, 1) + pdu(0, 0) + pdu(5, 2)
    for i, byte in enumerate(stream):
        b.feed(bytes([byte]))
        assert b.at_boundary() == (i + 1 in (9, 15, 26)), i
