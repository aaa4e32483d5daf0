"""An inference outage (Triton restarting, a GPU node replaced) is ridden out: a transient failure is
retried for `outage_s` from the first failure, however many tries that takes, then reported."""

from __future__ import annotations

import time

import numpy as np
import pytest

from integrations.errors import TransientError
from integrations.ports import AnnotationRequest, ImageContext
from integrations.triton import TritonAnnotator


class Response:
    def as_numpy(self, name: str) -> np.ndarray:
        return np.array([[b"{}"]], dtype=object)


class DownFor:
    """A Triton client that cannot connect until `seconds` have passed, counting the tries."""

    def __init__(self, seconds: float) -> None:
        self.until, self.tries = time.monotonic() + seconds, 0

    def infer(self, *args: object, **kwargs: object) -> Response:
        self.tries += 1
        if time.monotonic() < self.until:
            raise ConnectionError("failed to connect to all addresses; last error: connection refused")
        return Response()

    def is_server_ready(self) -> bool:  # the readiness probe an endpoint answers before it serves again
        if time.monotonic() < self.until:
            raise ConnectionError("failed to connect to all addresses; last error: connection refused")
        return True

    def is_model_ready(self, model: str, version: str) -> bool:
        return True


def request() -> AnnotationRequest:
    return AnnotationRequest(image_png=b"\x89PNG", context=ImageContext(modality="CR"))


def annotator(client: DownFor, *, outage_s: float) -> TritonAnnotator:
    triton = TritonAnnotator(url="127.0.0.1:1", retries=2, backoff_s=0.01, outage_s=outage_s, max_backoff_s=0.05)
    triton._client = lambda url: client  # type: ignore[method-assign]
    return triton


def test_an_outage_shorter_than_outage_s_is_ridden_out_past_the_retry_count() -> None:
    client = DownFor(0.4)
    assert annotator(client, outage_s=2.0)._infer(request()) == b"{}"
    assert client.tries > 3, "more tries than `retries`: the outage decided, not the count"


def test_an_outage_longer_than_outage_s_is_reported_as_transient() -> None:
    client = DownFor(60)
    started = time.monotonic()
    with pytest.raises(TransientError, match=r"failed for 0 s \(\d+ tries\)|failed for 1 s"):
        annotator(client, outage_s=0.3)._infer(request())
    assert time.monotonic() - started < 5


def test_a_triton_shutting_down_is_an_outage_not_a_wrong_model() -> None:
    """While tritonserver stops it unloads its models first: 'has no available versions' is ridden out."""

    class Unloaded(DownFor):
        def infer(self, *args: object, **kwargs: object) -> Response:
            self.tries += 1
            if time.monotonic() < self.until:
                raise RuntimeError(
                    "[StatusCode.NOT_FOUND] Request for unknown model: 'nightread_vlm' has no available versions"
                )
            return Response()

    client = Unloaded(0.3)
    assert annotator(client, outage_s=2.0)._infer(request()) == b"{}"
    assert client.tries > 1
