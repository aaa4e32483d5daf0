"""TritonAnnotator against a real tritonserver: readiness, errors, retries, batching, the nightly flow."""

from __future__ import annotations

import io
import re
import socket
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image
from sqlmodel import Session, select

from integrations.errors import ConfigurationError, PermanentError, TransientError
from integrations.ports import AnnotationRequest, ImageContext, Question
from integrations.triton import IMAGE, TASK, TritonAnnotator

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((48, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def metric(server, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    values = [float(m.group(1)) for m in re.finditer(rf'^{name}{{model="nightread_vlm"[^}}]*}} (\S+)$', text, re.M)]
    return sum(values)


def test_dynamic_batcher_forms_batches(triton_server):
    requests_before = metric(triton_server, "nv_inference_request_success")
    executions_before = metric(triton_server, "nv_inference_exec_count")
    request = AnnotationRequest(png(), ImageContext("CR", "CHEST"), (Question("q", "Is there a mass?"),), caption=False)
    with TritonAnnotator(url=triton_server.grpc_url, max_in_flight=16) as triton:
        assert len(triton.annotate([request] * 32)) == 32
    # Triton refreshes its metrics on an interval (2 s by default): poll until they show every request
    deadline = time.monotonic() + 15
    while (requests := metric(triton_server, "nv_inference_request_success") - requests_before) < 32:
        assert time.monotonic() < deadline, f"the metrics show {requests} of 32 requests"
        time.sleep(0.1)
    executions = metric(triton_server, "nv_inference_exec_count") - executions_before
    assert requests == 32
    assert executions < requests, f"{requests} requests ran in {executions} executions: no batches formed"


def test_http_protocol_works_too(triton_server):
    with TritonAnnotator(url=triton_server.http_url, protocol="http") as triton:
        (result,) = triton.annotate(
            [AnnotationRequest(png(), ImageContext("MR"), caption=True, caption_max_new_tokens=3)]
        )
    assert isinstance(result.caption, str)


def test_unknown_model_or_version_is_a_configuration_error(triton_server):
    with pytest.raises(ConfigurationError, match="not ready"):
        TritonAnnotator(url=triton_server.grpc_url, model="no_such_model").check_ready()
    with pytest.raises(ConfigurationError, match="version 7"):
        TritonAnnotator(url=triton_server.grpc_url, version="7").check_ready()


def test_a_bad_request_is_a_permanent_error(triton_server):
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(url=triton_server.grpc_url)
    image = tc.InferInput(IMAGE.name, [1, 1], "BYTES")
    image.set_data_from_numpy(np.array([[png()]], dtype=object))
    task = tc.InferInput(TASK.name, [1, 1], "BYTES")
    task.set_data_from_numpy(np.array([[b'{"contract": "1", "questions": [{"nope": 1}]}']], dtype=object))
    with pytest.raises(Exception, match="not a valid nightread task"):
        client.infer("nightread_vlm", [image, task])
    # and through the annotator: a PermanentError, not retried
    with TritonAnnotator(url=triton_server.grpc_url, retries=3) as triton:
        bad = AnnotationRequest(b"not a png", ImageContext("CR"), caption=True, caption_max_new_tokens=2)
        with pytest.raises(PermanentError):
            triton.annotate([bad])


def test_server_down_is_transient_after_retries():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    triton = TritonAnnotator(url=f"127.0.0.1:{port}", retries=2, backoff_s=0.01, timeout_s=2, outage_s=0)
    with pytest.raises(TransientError):
        triton.check_ready()
    with pytest.raises(TransientError, match=r"\(3 tries\)"):
        triton.annotate([AnnotationRequest(png(), ImageContext("CR"), caption=False)])
    triton.close()


@pytest.mark.slow
def test_nightly_flow_runs_against_triton(prefect_harness, make_settings, sample_pacs, triton_server):
    from db.migrate import upgrade
    from db.models import Caption, Finding, ModelVersion
    from db.session import make_engine
    from flows.nightly import run_nightly

    settings = make_settings(
        pacs={"port": sample_pacs.port}, inference={"backend": "triton"}, triton={"url": triton_server.grpc_url}
    )
    upgrade(settings.database_url)
    result = run_nightly(settings)
    assert result["studies_done"] == 5
    assert "on Triton" in result["model_note"]
    engine = make_engine(settings.database_url)
    with Session(engine) as s:
        (mv,) = s.exec(select(ModelVersion)).all()
        assert mv.backend == "triton"
        assert mv.name == "tiny-random-smolvlm"
        assert mv.options["triton_model"] == "nightread_vlm"
        assert len(s.exec(select(Caption)).all()) == 12
        assert len(s.exec(select(Finding)).all()) == 6 * 8 + 3 * 3 + 3 * 3
    assert run_nightly(settings)["new"] == 0
    engine.dispose()


def test_nightly_refuses_to_start_when_triton_is_down(prefect_harness, make_settings, sample_pacs):
    from db.migrate import upgrade
    from flows.nightly import run_nightly

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = make_settings(
        pacs={"port": sample_pacs.port},
        inference={"backend": "triton"},
        triton={"url": f"127.0.0.1:{port}", "retries": 0, "timeout_s": 2},
    )
    upgrade(settings.database_url)
    with pytest.raises(TransientError, match="unreachable"):
        run_nightly(settings)


def test_two_endpoints_share_the_work_and_one_stopping_loses_nothing(triton_server, tiny_model, tmp_path):
    """Two real tritonservers behind one TritonAnnotator: both serve, then one is stopped in the middle of
    a batch of requests and every request is still answered (by the other)."""
    from tests.services import triton_on_free_ports

    second = triton_on_free_ports(tmp_path / "second", tiny_model)
    second.start()
    try:
        request = AnnotationRequest(png(), ImageContext("CR", "CHEST"), (Question("q", "Is there a mass?"),), False)
        with TritonAnnotator(urls=[triton_server.grpc_url, second.grpc_url], max_in_flight=4, backoff_s=0.1) as triton:
            triton.check_ready()
            assert len(triton.annotate([request] * 16)) == 16
            served = triton.endpoints.stats()
            assert all(n > 0 for n in served.values()), served
            futures = [triton._pool.submit(triton._infer, request) for _ in range(48)]
            deadline = time.monotonic() + 60
            while sum(triton.endpoints.stats().values()) < sum(served.values()) + 8:
                assert time.monotonic() < deadline, "no progress before the stop"
                time.sleep(0.05)
            second.stop()  # mid-run: requests in flight there fail over to the first
            answered = [f.result(timeout=120) for f in futures]
        assert len(answered) == 48
        after = triton.endpoints.stats()
        assert after[triton_server.grpc_url] > served[triton_server.grpc_url]
    finally:
        second.stop()
