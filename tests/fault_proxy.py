"""A TCP fault proxy on loopback: what a bad network between nightread and a peer does to a connection.

`FaultProxy(target_port=…, faults={"abort": 0.1, "reset": 0.1, "stall": 0.1, "drip": 0.1})` listens on
127.0.0.1:{proxy.port} and forwards each accepted connection to the target. Per connection it picks one
mode with the configured probabilities (the rest of the time: pass):

    pass   both directions forwarded as they come
    abort  the connection is closed at once, before anything reaches the target
    reset  the peer's bytes are forwarded up to a point inside a PDU (a 6-byte header, type, reserved,
           4-byte big-endian length: PS3.8 9.3), then the connection is reset (SO_LINGER 0: a RST)
    stall  the peer's bytes stop for `stall_s` at a point of the stream, then flow again
    drip   the peer's bytes come `drip_bytes` at a time, one chunk every `drip_interval_s`, for
           `drip_s`; then they pass

"The peer's bytes" are those from the target to the client (a PACS's answers and instances); what the
client sends always passes. The point where a reset or a stall begins is drawn from `cut_after` (bytes
the target sent on that connection). Faults are counted when they happen (`injected`): a stall or a
reset drawn for a connection that ends before its point is a pass. `set_faults` changes the mix for
new connections; `drop_connections` resets every open one (an outage of the peer).

Bounded: at most `max_connections` connections at once (more are closed at once and counted as
`refused`), two threads each; `stop()` (or the end of a `with` block) resets what is open and joins
every thread.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass

FAULTS = ("abort", "reset", "stall", "drip")
_LINGER_RST = struct.pack("ii", 1, 0)
_JOIN_S = 10.0  # how long stop() waits for one connection's threads


def check_faults(faults: Mapping[str, float]) -> dict[str, float]:
    """The fault mix, checked: known modes, probabilities in [0, 1] that sum to at most 1."""
    checked: dict[str, float] = {}
    for mode, p in faults.items():
        if mode not in FAULTS:
            raise ValueError(f'Argument "faults" has an unknown mode {mode!r}: choose from {", ".join(FAULTS)}')
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f'Argument "faults": the probability of {mode!r} must be within [0, 1], not {p!r}')
        checked[mode] = float(p)
    if sum(checked.values()) > 1.0 + 1e-9:
        raise ValueError(f'Argument "faults": the probabilities sum to {sum(checked.values()):.3f}, more than 1')
    return checked


class PduBoundaries:
    """Where PDUs start in a byte stream fed to it in order: after `feed`, `at_boundary()` says whether
    the bytes fed so far end exactly between two PDUs (a cut there would not be mid-PDU)."""

    def __init__(self) -> None:
        self.offset = 0  # bytes fed so far
        self.start = 0  # where the current (or next) PDU starts
        self.header = bytearray()

    def feed(self, data: bytes | memoryview) -> None:
        i = 0
        while i < len(data):
            pos = self.offset + i
            if pos < self.start:  # inside a PDU's body
                i = min(len(data), self.start - self.offset)
                continue
            take = bytes(data[i : i + 6 - len(self.header)])
            self.header += take
            i += len(take)
            if len(self.header) == 6:
                self.start += 6 + int.from_bytes(self.header[2:6], "big")
                self.header.clear()
        self.offset += len(data)

    def at_boundary(self) -> bool:
        return self.offset == self.start and not self.header


@dataclass(eq=False)  # kept in a set by identity
class _Connection:
    client: socket.socket
    upstream: socket.socket | None = None
    dropped: bool = False  # reset from outside (drop_connections, stop): an end of stream is a reset

    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.client, self.upstream) if s is not None]

    def wake(self) -> None:
        """Unblock both threads' reads without sending anything."""
        for sock in self.sockets():
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RD)

    def reset(self) -> None:
        """A RST to both sides."""
        self.dropped = True
        for sock in self.sockets():
            with suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        self.wake()


class FaultProxy:
    """See the module docstring. Use as a context manager, or `start()` / `stop()`."""

    def __init__(
        self,
        *,
        target_port: int,
        target_host: str = "127.0.0.1",
        faults: Mapping[str, float] | None = None,
        seed: int = 0,
        stall_s: float = 5.0,
        drip_s: float = 3.0,
        drip_bytes: int = 64,
        drip_interval_s: float = 0.05,
        cut_after: tuple[int, int] = (1, 4096),
        max_connections: int = 32,
        connect_timeout_s: float = 5.0,
    ) -> None:
        if not 0 < target_port < 65536:
            raise ValueError(f'Argument "target_port" must be a TCP port, not {target_port!r}')
        if target_host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f'Argument "target_host" must be a loopback address, not {target_host!r}')
        if cut_after[0] < 0 or cut_after[1] < cut_after[0]:
            raise ValueError(f'Argument "cut_after" must be (low, high) with 0 <= low <= high, not {cut_after!r}')
        if min(stall_s, drip_s, drip_interval_s) < 0 or drip_bytes < 1 or max_connections < 1:
            raise ValueError("stall_s, drip_s, drip_interval_s >= 0; drip_bytes and max_connections >= 1")
        self.target = (target_host, target_port)
        self.stall_s, self.drip_s = stall_s, drip_s
        self.drip_bytes, self.drip_interval_s = drip_bytes, drip_interval_s
        self.cut_after = cut_after
        self.connect_timeout_s = connect_timeout_s
        self._faults = check_faults(faults or {})
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._stop = threading.Event()
        self._live: set[_Connection] = set()
        self._threads: list[threading.Thread] = []
        self.injected: Counter[str] = Counter()  # faults that happened, by mode (and "dropped")
        self.chosen: Counter[str] = Counter()  # modes drawn per connection, "pass" included
        self.refused = 0  # connections over max_connections, closed at once
        self.upstream_down = 0  # connections whose target could not be reached
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self._acceptor: threading.Thread | None = None

    # --- control --------------------------------------------------------------------------------------
    def set_faults(self, faults: Mapping[str, float]) -> None:
        """The mix for connections accepted from now on ({} : every connection passes)."""
        checked = check_faults(faults)
        with self._lock:
            self._faults = checked

    @property
    def faults(self) -> int:
        """Faults injected so far (every mode, and connections dropped by `drop_connections`)."""
        with self._lock:
            return sum(self.injected.values())

    @property
    def connections(self) -> int:
        with self._lock:
            return sum(self.chosen.values())

    def drop_connections(self) -> int:
        """Reset every open connection now; returns how many."""
        with self._lock:
            live = list(self._live)
            self.injected["dropped"] += len(live)
        for conn in live:
            conn.reset()
        return len(live)

    def start(self) -> FaultProxy:
        if self._acceptor is None:
            self._acceptor = threading.Thread(target=self._accept, name=f"fault-proxy-{self.port}", daemon=True)
            self._acceptor.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        if self._acceptor is not None:
            self._acceptor.join(timeout=_JOIN_S)
        with self._lock:
            live = list(self._live)
        for conn in live:
            conn.reset()
        with self._lock:
            threads = list(self._threads)
        deadline = time.monotonic() + _JOIN_S
        for thread in threads:
            thread.join(timeout=max(0.1, deadline - time.monotonic()))

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- connections ----------------------------------------------------------------------------------
    def _choose(self) -> tuple[str, int]:
        with self._lock:
            draw = self._rng.random()
            mode = "pass"
            for name, p in self._faults.items():
                if draw < p:
                    mode = name
                    break
                draw -= p
            self.chosen[mode] += 1
            return mode, self._rng.randint(*self.cut_after)

    def _count(self, mode: str) -> None:
        with self._lock:
            self.injected[mode] += 1

    def _spawn(self, target: object, *args: object) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()
        return thread

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self._stop.is_set() or not self._slots.acquire(blocking=False):
                with self._lock:
                    self.refused += 1
                _close(client, rst=True)
                continue
            self._spawn(self._serve, client)

    def _serve(self, client: socket.socket) -> None:
        conn = _Connection(client)
        try:
            mode, cut = self._choose()
            if mode == "abort":
                self._count("abort")
                _close(client, rst=False)
                return
            try:
                conn.upstream = socket.create_connection(self.target, timeout=self.connect_timeout_s)
            except OSError:
                with self._lock:
                    self.upstream_down += 1
                _close(client, rst=True)
                return
            conn.upstream.settimeout(None)
            for sock in conn.sockets():
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._live.add(conn)
            if self._stop.is_set():
                conn.reset()
            up = self._spawn(self._pump_up, conn)
            rst = self._pump_down(conn, mode, cut)
            if rst:
                conn.reset()
            else:  # the target closed: pass that on, let the client finish, then close
                with suppress(OSError):
                    client.shutdown(socket.SHUT_WR)
            up.join(timeout=_JOIN_S)
            if up.is_alive():
                conn.wake()
                up.join(timeout=_JOIN_S)
            for sock in conn.sockets():
                _close(sock, rst=rst)
        finally:
            with self._lock:
                self._live.discard(conn)
            self._slots.release()

    def _pump_up(self, conn: _Connection) -> None:
        """Client → target, as it comes; the client's end of stream is passed on."""
        assert conn.upstream is not None
        with suppress(OSError):
            while data := conn.client.recv(65536):
                conn.upstream.sendall(data)
        with suppress(OSError):
            conn.upstream.shutdown(socket.SHUT_WR)

    def _pump_down(self, conn: _Connection, mode: str, cut: int) -> bool:
        """Target → client with the connection's fault; True when the connection is to be reset."""
        upstream, client = conn.upstream, conn.client
        assert upstream is not None
        pdus = PduBoundaries()
        sent = 0
        drip_until: float | None = None
        try:
            while not self._stop.is_set():
                if mode == "drip" and (drip_until is None or time.monotonic() < drip_until):
                    data = upstream.recv(self.drip_bytes)
                    if data and drip_until is None:
                        self._count("drip")
                        drip_until = time.monotonic() + self.drip_s
                    if data:
                        client.sendall(data)
                        sent += len(data)
                        self._stop.wait(self.drip_interval_s)
                        continue
                    return conn.dropped
                data = upstream.recv(65536)
                if not data:
                    return conn.dropped
                view = memoryview(data)
                if mode in ("reset", "stall") and sent + len(view) >= cut:
                    head = view[: cut - sent]
                    client.sendall(head)
                    pdus.feed(head)
                    sent += len(head)
                    view = view[len(head) :]
                    if mode == "reset":
                        if pdus.at_boundary():  # between two PDUs: one byte more, so the cut is mid-PDU
                            if not view:
                                cut += 1
                                continue
                            client.sendall(view[:1])
                        self._count("reset")
                        return True
                    self._count("stall")
                    self._stop.wait(self.stall_s)
                    mode = "pass"
                client.sendall(view)
                pdus.feed(view)
                sent += len(view)
        except OSError:
            return True
        return True  # stopping


def _close(sock: socket.socket, *, rst: bool) -> None:
    with suppress(OSError):
        if rst:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        else:
            sock.shutdown(socket.SHUT_RDWR)
    sock.close()
