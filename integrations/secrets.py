"""Secrets nightread keeps itself when none is configured: random, in a 0600 file of the data dir."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def load_secret(configured: str, data_dir: Path, name: str) -> str:
    """The configured secret, else a random one kept (mode 0600) in data_dir/<name>."""
    if configured:
        return configured
    path = data_dir / name
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret)
    return secret
