"""A flow that only records when it ran: the work-queue priority test deploys it (no heavy imports)."""

from __future__ import annotations

import time

from prefect import flow


@flow(name="probe")
def probe(label: str) -> dict[str, object]:
    return {"label": label, "at": time.time()}
