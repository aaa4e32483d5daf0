"""The exception tree every adapter raises (after httpx's documented hierarchy).

    NightreadError
    ├── Interrupted           a stop (SIGTERM, Ctrl-C, a cancellation) ended the work: not its fault
    ├── TransientError        retried by the flows (network, busy peer, incomplete transfer)
    │   └── RetrievalIncomplete
    └── PermanentError        recorded as a failure, never retried
        ├── ResultsCapped      the PACS stopped matching at its result cap: narrow the query
        ├── ConfigurationError
        ├── PeerRefused        the peer answered and said no (unknown AE, bad request)
        ├── ProtocolError      the peer broke the DICOM protocol (an over-long PDU, a malformed item)
        ├── DecodeError        a DICOM object that cannot be decoded or rendered
        └── UnsupportedTask    a model asked to do what it cannot (e.g. questions to a captioner)

Messages never carry PHI: no patient names, IDs, accession numbers or raw UIDs.
"""

from __future__ import annotations

from typing import Any


class NightreadError(Exception):
    """Base class of every error nightread raises on purpose."""


class Interrupted(NightreadError):
    """A stop ended the work before it finished: neither retried now nor counted against the work;
    the next run takes it up again."""


class TransientError(NightreadError):
    """Worth retrying: the same call may succeed later."""


class RetrievalIncomplete(TransientError):
    """Fewer instances arrived than the PACS announced."""

    def __init__(self, *, expected: int, received: int) -> None:
        super().__init__(f"retrieval incomplete: received {received} of {expected} instances")
        self.expected = expected
        self.received = received


class PermanentError(NightreadError):
    """Retrying will not help; the failure is recorded."""


class ResultsCapped(PermanentError):
    """The PACS stopped a query at its result cap (Orthanc's LimitFindResults answers C-FIND with
    status 0xFE00): the answers it sent are in `partial`; a narrower query gets the rest."""

    def __init__(self, *, operation: str, partial: list[Any]) -> None:
        super().__init__(f"{operation}: the PACS stopped after {len(partial)} answers (its result cap)")
        self.partial = partial


class ConfigurationError(PermanentError):
    """A setting is missing or contradicts another."""


class PeerRefused(PermanentError):
    """The remote system answered and refused the request."""


class ProtocolError(PermanentError):
    """The peer broke the protocol (PS3.8): the association was aborted, and the same peer sending the
    same bytes again would break it the same way, so it is never retried."""


class DecodeError(PermanentError):
    """A DICOM object could not be decoded or rendered."""


class UnsupportedTask(PermanentError):
    """The model cannot do what was asked of it."""


def is_transient(exc: BaseException) -> bool:
    """True when `exc` is worth retrying."""
    return isinstance(exc, TransientError)
