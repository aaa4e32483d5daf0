"""nightread's DIMSE edge: everything that reads bytes a DICOM peer sends.

    framing.py   the Upper Layer's PDUs and PDV items, DIMSE command sets, File Meta Information and
                 the check that a received data set is complete; every length bounded (ProtocolError)
    stream.py    the streaming receive path: C-GET (requestor) and the storage SCP (C-MOVE destination,
                 `nightread listen`), one thread per association, each instance streamed to disk
    fallback.py  pynetdicom's side: nightread's AE, its fixes and tuning, its receivers' filing, and
                 `storage_scp`, the one factory that starts either receiver as a storage SCP
    tls.py       DICOM TLS contexts for both sides

pynetdicom's own receivers stay selectable (`dimse_receiver="pynetdicom"`) for a peer the direct path
cannot talk to; `receiver_choice` checks the name wherever a receiver is chosen.
"""

from __future__ import annotations

from integrations.dimse.fallback import (
    RECEIVERS,
    abort_after,
    encoded_instance,
    nightread_ae,
    quiet_pynetdicom,
    receiver_choice,
    storage_scp,
    tune_association,
)
from integrations.dimse.framing import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, MAX_PDU
from integrations.dimse.stream import EdgePolicy, Placement, StoreRequest, StreamingStorageServer, c_get

__all__ = [
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "MAX_PDU",
    "RECEIVERS",
    "EdgePolicy",
    "Placement",
    "StoreRequest",
    "StreamingStorageServer",
    "abort_after",
    "c_get",
    "encoded_instance",
    "nightread_ae",
    "quiet_pynetdicom",
    "receiver_choice",
    "storage_scp",
    "tune_association",
]
