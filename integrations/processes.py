"""Child processes that never outlive nightread."""

from __future__ import annotations

import ctypes
import signal


def stop_with_parent() -> None:
    """For `preexec_fn`, in a child before it runs: the kernel sends it SIGTERM when its parent dies,
    even by SIGKILL (Linux PR_SET_PDEATHSIG), so a crashed nightread leaves no server running."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
