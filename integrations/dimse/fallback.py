"""pynetdicom's side of the DIMSE edge: the AE nightread announces itself with, the fixes and tuning its
associations get, its receivers' way of filing an instance (the same bytes and checks as the
streaming path), and `storage_scp`, the one factory that starts either receiver as a storage SCP.

pynetdicom stays the escape hatch (`dimse_receiver="pynetdicom"`) for a peer the streaming path cannot
talk to, and does what is negotiated or sent once everywhere (C-ECHO, C-FIND, C-MOVE requests,
C-STORE of our reports).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import types
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, suppress
from io import BytesIO
from pathlib import Path
from typing import Any

from pynetdicom import AE, _config, evt
from pynetdicom import sop_class as sc

from integrations.dimse import framing
from integrations.dimse.stream import EdgePolicy, Placement, StoreRequest, StreamingStorageServer, deadline

log = logging.getLogger(__name__)

RECEIVERS = ("direct", "pynetdicom")  # the streaming receive path, or pynetdicom's own


def receiver_choice(value: str) -> str:
    """`value` if it names a receiver (RECEIVERS), else a ValueError naming the choices."""
    if value not in RECEIVERS:
        raise ValueError(f'dimse_receiver must be "direct" or "pynetdicom", not {value!r}')
    return value


def quiet_pynetdicom() -> None:
    """Never log query identifiers (they hold patient names and IDs); keep pynetdicom's chatter down;
    and close pynetdicom's reactor race (below) before any association runs."""
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    _close_reactor_race()


def _close_reactor_race() -> None:
    """pynetdicom 3.0.4: a `send_*()` call pauses the association's reactor by clearing its checkpoint
    and waiting for `_is_paused`, but the reactor sets `_is_paused = True` just before its wait() returns,
    so the sender can see a stale True and send while the reactor is on its way to `get_msg(block=False)`.
    A peer that answers within microseconds (nightread's own storage SCP, answering as soon as the last
    fragment is in) then has its response taken by the reactor as an unexpected request ("Received
    unexpected C-STORE service message"), and the sender waits out its DIMSE timeout (pynetdicom issues
    435, 875). Here the reactor takes nothing while a sender has the checkpoint cleared: its get_msg is
    the only non-blocking one, the senders' block."""
    from pynetdicom.dimse import DIMSEServiceProvider

    if getattr(DIMSEServiceProvider.get_msg, "_nightread", False):
        return
    original = DIMSEServiceProvider.get_msg

    def get_msg(self: Any, block: bool = False) -> Any:
        if not block and not self.assoc._reactor_checkpoint.is_set():
            return None, None  # a send_*() is waiting for this message: leave it on the queue
        return original(self, block)

    get_msg._nightread = True  # type: ignore[attr-defined]
    DIMSEServiceProvider.get_msg = get_msg  # type: ignore[method-assign]


def tune_association(assoc: Any) -> None:
    """Switch Nagle's algorithm off on an association's socket (pynetdicom leaves it on), so small
    C-STORE responses and C-FIND requests are never held back waiting for the peer's ACK; DCMTK needs
    TCP_NODELAY=1 for the same reason. On loopback here it made no measurable difference."""
    transport = getattr(getattr(assoc, "dul", None), "socket", None)
    sock = getattr(transport, "socket", None)
    if sock is not None:
        with suppress(OSError):  # not a TCP socket (or already closed): nothing to tune
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if transport is not None:
        transport.recv = types.MethodType(_recv_whole, transport)


def _recv_whole(transport: Any, nr_bytes: int) -> bytearray:
    """pynetdicom's AssociationSocket.recv, reading into one preallocated buffer with as few recv calls as
    the kernel allows (pynetdicom reads 4 KB at a time: four calls and copies per 16 KB PDU). Same
    contract: blocks until `nr_bytes` are read, returns what it has when the peer closes."""
    buf = bytearray(nr_bytes)
    view = memoryview(buf)
    got = 0
    while got < nr_bytes:
        n = transport.socket.recv_into(view[got:], nr_bytes - got)
        if not n:
            return buf[:got]
        got += n
    return buf


def nightread_ae(ae_title: str) -> AE:
    """A pynetdicom AE that announces nightread's Implementation Class UID and version name."""
    ae = AE(ae_title=ae_title)
    ae.implementation_class_uid = framing.IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = framing.IMPLEMENTATION_VERSION_NAME
    return ae


def abort_after(assoc: Any, seconds: float | None) -> AbstractContextManager[threading.Event]:
    """Within the block, a pynetdicom association is aborted once `seconds` have passed (the event
    says so): a deadline for a whole query, C-GET or C-MOVE, however slowly the PACS answers.

    Aborting alone is not enough against a PACS stalled inside a PDU: pynetdicom's reading thread is
    blocked in recv (for up to the socket timeout) and `abort()` waits for it, and the thread sending
    the request waits on its message queue for up to `dimse_timeout`. So the socket's reading side is
    shut first (recv returns at once), then the association aborted, then the sender woken with the
    empty item pynetdicom itself uses for "aborted or closed"."""

    def abort() -> None:
        sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
        if sock is not None:
            with suppress(OSError):  # already closed
                sock.shutdown(socket.SHUT_RD)
        assoc.abort()
        assoc.dimse.msg_queue.put((None, None))

    return deadline(seconds, abort)


def encoded_instance(event: Any) -> bytes | None:
    """A C-STORE's instance as pynetdicom received it, as a DICOM file with nightread's File Meta
    Information (the bytes the streaming receiver writes), or None when its data set is cut short."""
    data: bytes = event.request.DataSet.getvalue()
    syntax = str(event.context.transfer_syntax)
    try:
        framing.check_dataset(BytesIO(data), start=0, end=len(data), transfer_syntax=syntax)
    except framing.IncompleteDataset as exc:
        log.warning("refused an incomplete instance: %s", exc)
        return None
    sop_class = str(event.request.AffectedSOPClassUID)
    return framing.file_header(sop_class, str(event.request.AffectedSOPInstanceUID), syntax) + data


def storage_scp(
    receiver: str,
    *,
    ae_title: str,
    host: str,
    port: int,
    storage_classes: Sequence[str],
    transfer_syntaxes: Sequence[str],
    timeout_s: float,
    policy: EdgePolicy,
    ssl_context: ssl.SSLContext | None,
    place: Callable[[StoreRequest], Placement],
    on_stored: Callable[[Path, StoreRequest], int],
    on_store: Callable[[Any], int],
) -> Any:
    """A started storage SCP on either receiver, with `.server_address` and `.shutdown()`: the streaming
    one (`place` says where an instance goes, `on_stored` files it), or pynetdicom's (`on_store` gets
    each instance as an event; the policy's AE titles and association limit apply, the called AE title
    is checked)."""
    receiver_choice(receiver)
    if receiver == "direct":
        return StreamingStorageServer(
            ae_title=ae_title,
            host=host,
            port=port,
            place=place,
            on_stored=on_stored,
            storage_classes=storage_classes,
            transfer_syntaxes=transfer_syntaxes,
            timeout_s=timeout_s,
            policy=policy,
            ssl_context=ssl_context,
        ).start()
    quiet_pynetdicom()
    ae = nightread_ae(ae_title)
    ae.maximum_pdu_size = 0
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    if policy.allowed_aes is not None:
        ae.require_calling_aet = sorted(policy.allowed_aes)  # anyone else is rejected at association time
    ae.require_called_aet = policy.check_called_ae
    ae.maximum_associations = policy.max_associations
    ae.add_supported_context(sc.Verification)
    for sop_class in storage_classes:
        ae.add_supported_context(sop_class, list(transfer_syntaxes))
    return ae.start_server(
        (host, port),
        block=False,
        ssl_context=ssl_context,
        evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, lambda event: tune_association(event.assoc))],
    )
