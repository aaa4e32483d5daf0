"""Several Triton endpoints: requests balanced by requests in flight, at most `max_in_flight` per
endpoint, a failing endpoint left at once for another (nothing lost), probed before it serves again,
and the same model required of every endpoint. Fake clients here; two real tritonservers in
tests/integration/test_triton.py."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from integrations.errors import ConfigurationError
from integrations.ports import AnnotationRequest, ImageContext, ModelInfo
from integrations.triton import EndpointPool, TritonAnnotator, encode_result

pytestmark = pytest.mark.timeout(60)
INFO = ModelInfo(name="tiny", revision="r1", backend="transformers", options={})


class Response:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def as_numpy(self, name: str) -> np.ndarray:
        return np.array([[self.raw]], dtype=object)


class FakeServer:
    """A Triton endpoint: up or down, how many requests it answered, the most it had at once."""

    def __init__(self, name: str = "tiny", revision: str = "r1", service_s: float = 0.01) -> None:
        self.up = True
        self.answered = 0
        self.in_flight = 0
        self.peak = 0
        self.probes = 0
        self.service_s = service_s
        self.info = ModelInfo(name=name, revision=revision, backend="transformers", options={})
        self._lock = threading.Lock()

    def _check(self) -> None:
        if not self.up:
            raise ConnectionError("failed to connect to all addresses; last error: connection refused")

    def is_server_ready(self) -> bool:
        self.probes += 1
        self._check()
        return True

    def is_model_ready(self, model: str, version: str) -> bool:
        return True

    def infer(self, *args: object, **kwargs: object) -> Response:
        self._check()
        with self._lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            time.sleep(self.service_s)  # the fake's service time
            self._check()
            with self._lock:
                self.answered += 1
            return Response(encode_result(None, self.info))
        finally:
            with self._lock:
                self.in_flight -= 1


def annotator(servers: dict[str, FakeServer], **kwargs: object) -> TritonAnnotator:
    triton = TritonAnnotator(urls=list(servers), backoff_s=0.05, max_backoff_s=0.2, **kwargs)  # type: ignore[arg-type]
    triton._client = lambda url: servers[url]  # type: ignore[method-assign]
    return triton


def request() -> AnnotationRequest:
    return AnnotationRequest(image_png=b"\x89PNG", context=ImageContext(modality="CR"))


def run_requests(triton: TritonAnnotator, n: int) -> None:
    futures = [triton._pool.submit(triton._infer, request()) for _ in range(n)]
    for future in futures:
        assert future.result()


def test_requests_are_spread_over_every_endpoint_within_their_bound() -> None:
    servers = {"a:8001": FakeServer(), "b:8001": FakeServer()}
    with annotator(servers, max_in_flight=3) as triton:
        run_requests(triton, 60)
    assert servers["a:8001"].answered + servers["b:8001"].answered == 60
    assert min(s.answered for s in servers.values()) >= 15, {u: s.answered for u, s in servers.items()}
    assert max(s.peak for s in servers.values()) <= 3


def test_an_endpoint_going_down_mid_run_loses_nothing() -> None:
    servers = {"a:8001": FakeServer(), "b:8001": FakeServer()}
    with annotator(servers, max_in_flight=4, retries=0, outage_s=0) as triton:
        timer = threading.Timer(0.1, lambda: setattr(servers["b:8001"], "up", False))
        timer.start()
        run_requests(triton, 80)  # with outage_s=0 and no retries, only failover can save a request
        timer.join()
    assert servers["a:8001"].answered + servers["b:8001"].answered == 80
    assert servers["b:8001"].answered > 0, "b served before it went down"


def test_an_endpoint_back_from_a_failure_is_probed_before_it_serves() -> None:
    servers = {"a:8001": FakeServer(), "b:8001": FakeServer()}
    servers["b:8001"].up = False
    with annotator(servers, max_in_flight=2) as triton:
        run_requests(triton, 10)
        assert servers["b:8001"].answered == 0
        servers["b:8001"].up = True
        time.sleep(0.3)  # past b's backoff (0.2 s at most): the test's own clock, not a readiness wait
        probes = servers["b:8001"].probes
        run_requests(triton, 40)
    assert servers["b:8001"].probes > probes, "probed before taking traffic again"
    assert servers["b:8001"].answered > 0


def test_every_endpoint_must_serve_the_same_model() -> None:
    servers = {"a:8001": FakeServer(revision="r1"), "b:8001": FakeServer(revision="r2")}
    with annotator(servers) as triton, pytest.raises(ConfigurationError, match="different models"):
        triton.check_ready()


def test_an_endpoint_down_at_the_start_is_skipped_until_it_answers() -> None:
    servers = {"a:8001": FakeServer(), "b:8001": FakeServer()}
    servers["a:8001"].up = False
    with annotator(servers) as triton:
        assert triton.check_ready().revision == "r1"
        run_requests(triton, 5)
    assert servers["b:8001"].answered == 6  # the check's own probe request and the five


def test_the_pool_refuses_no_endpoint_or_one_listed_twice() -> None:
    with pytest.raises(ConfigurationError, match="at least one"):
        EndpointPool([], max_in_flight=1, probe=lambda url: True)
    with pytest.raises(ConfigurationError, match="twice"):
        EndpointPool(["a:1", "a:1"], max_in_flight=1, probe=lambda url: True)


def test_when_every_endpoint_is_out_the_one_back_soonest_is_tried() -> None:
    now = [0.0]
    pool = EndpointPool(["a:1", "b:1"], max_in_flight=1, probe=lambda url: False, clock=lambda: now[0])
    a, b = pool.endpoints
    pool.mark_down(a)
    now[0] = 0.1
    pool.mark_down(b)
    chosen = pool.acquire()
    assert chosen is a
    pool.release(chosen, failed=True)
