"""Triton: does dynamic batching pay, and does the nightly flow keep the server busy?

A model with a fixed service time per batch stands in for a GPU (tests/bench/sleep_model.py), served
by the tritonserver binary of the nvidia-pytriton wheel on free loopback ports.

(a) throughput with dynamic batching on vs off at the same client concurrency (same requests);
(b) the nightly flow end to end (sample PACS → render → Triton → SQLite): how busy it keeps the server.
    The server counts requests, not images: a CT slice is rendered (and sent) once per window its
    questions need, so a run sends more requests than it renders images. Saturation is therefore the
    server's request rate over the run ÷ its request ceiling (max batch / service time per batch);
    beside it, the share of the run's wall time the model was executing (its busy time, from Triton's
    statistics API: the compute time of every batch), and the images/s the flow rendered.

Run: `make bench-triton`. Last line: `P3 saturation=<b> batching_gain=<a> busy=<share> images_per_s=<x>
requests_per_s=<y>`. Nothing is asserted.
"""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # before prefect is imported
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import argparse
import io
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from integrations.ports import AnnotationRequest, ImageContext, Question
from integrations.sample_pacs import SamplePacs, generate_studies
from integrations.triton import TritonAnnotator
from integrations.triton_server import TritonServer, prepare_repository
from tests.services import REPO, free_port

MAX_BATCH = 8


def png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((256, 256, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def throughput(url: str, model: str, *, requests: int, in_flight: int) -> float:
    request = AnnotationRequest(
        png(),
        ImageContext("CR", "CHEST", "PA"),
        tuple(Question(f"q{i}", f"Question {i}?") for i in range(7)),
        caption=True,
    )
    with TritonAnnotator(url=url, model=model, max_in_flight=in_flight) as triton:
        triton.check_ready()
        triton.annotate([request] * in_flight)  # warm-up
        t0 = time.perf_counter()
        triton.annotate([request] * requests)
        return requests / (time.perf_counter() - t0)


def nightly_run(url: str, *, copies: int, concurrency: int, work: Path) -> tuple[float, int]:
    """The nightly over `copies` × 5 sample studies against Triton at `url`: (wall seconds, images rendered)."""
    from prefect.testing.utilities import prefect_test_harness

    from db.migrate import upgrade
    from flows.nightly import run_nightly
    from flows.wiring.settings import NightreadSettings

    studies = [
        s for seed in range(copies) for s in generate_studies(seed=100 + seed, xr_size=512, ct_size=256, ct_slices=30)
    ]
    with prefect_test_harness(server_startup_timeout=120), SamplePacs(studies=studies) as pacs:
        settings = NightreadSettings(
            data_dir=work / "data",
            pacs={"port": pacs.port},
            inference={"backend": "triton"},
            triton={"url": url, "model": "nightread_sleep", "max_in_flight": 4 * MAX_BATCH},
            flow={"concurrency": concurrency, "retry_delay_s": 0},
        )
        upgrade(settings.database_url)
        t0 = time.perf_counter()
        result = run_nightly(settings)
        wall = time.perf_counter() - t0
    return wall, int(result["rendered"])


@dataclass(frozen=True)
class ServerStats:
    """What the server did for one model so far."""

    requests: int  # successful inference requests (one per image rendering sent)
    executions: int  # model executions (batches)
    busy_s: float  # time the model was executing batches (compute input + infer + output of every batch)
    compute_metric_s: float  # nv_inference_compute_infer_duration_us: summed per request, so a batch counts n times


def server_stats(server: TritonServer, model: str) -> ServerStats:
    """`model`'s counts from Triton's statistics API (per batch) and its metrics endpoint (per request)."""
    import json
    import re
    import urllib.request

    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model}/stats", timeout=10) as r:
        stats = json.load(r)["model_stats"]
    busy_ns = sum(
        int(b[part]["ns"])
        for m in stats
        for b in m.get("batch_stats", [])
        for part in ("compute_input", "compute_infer", "compute_output")
    )
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()

    def total(name: str) -> float:
        pattern = rf'^{name}{{model="{model}"[^}}]*}} (\S+)$'
        return sum(float(m.group(1)) for m in re.finditer(pattern, text, re.M))

    return ServerStats(
        requests=int(total("nv_inference_request_success")),
        executions=int(total("nv_inference_exec_count")),
        busy_s=busy_ns / 1e9,
        compute_metric_s=total("nv_inference_compute_infer_duration_us") / 1e6,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--service-ms", type=float, default=250.0, help="(a): service time per batch")
    parser.add_argument(
        "--flow-service-ms",
        type=float,
        default=2500.0,
        help="(b): service time per batch; its ceiling must stay below the pipeline's capacity",
    )
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--copies", type=int, default=32, help="(b): copies of the 5 sample studies")
    parser.add_argument("--concurrency", type=int, default=3, help="(b): NIGHTREAD_FLOW__CONCURRENCY")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-triton-"))
    env = {"PYTHONPATH": str(REPO)}
    try:
        repo = prepare_repository(
            REPO / "tests" / "bench" / "triton_repository", work / "repo", instance_count=1, instance_kind="KIND_CPU"
        )
        ports: dict[str, Any] = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
        with TritonServer(
            repository=repo, work_dir=work / "a", env={**env, "NIGHTREAD_SLEEP_MS": str(args.service_ms)}, **ports
        ) as server:
            on = throughput(server.grpc_url, "nightread_sleep", requests=args.requests, in_flight=args.in_flight)
            off = throughput(
                server.grpc_url, "nightread_sleep_nobatch", requests=args.requests // 4, in_flight=args.in_flight
            )
        print(
            f"(a) {args.in_flight} requests in flight, {args.service_ms:g} ms per batch: "
            f"batching on {on:.1f} req/s, off {off:.1f} req/s, gain {on / off:.2f}x "
            f"(ceiling {MAX_BATCH / args.service_ms * 1000:.1f} req/s)",
            flush=True,
        )
        ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
        with TritonServer(
            repository=repo, work_dir=work / "c", env={**env, "NIGHTREAD_SLEEP_MS": "1"}, **ports
        ) as server:
            wall, images = nightly_run(
                server.grpc_url, copies=args.copies // 2, concurrency=args.concurrency, work=work / "capacity"
            )
            stats = server_stats(server, "nightread_sleep")
        print(
            f"    the pipeline's own capacity (1 ms per batch): {images / wall:.2f} images/s, "
            f"{stats.requests / wall:.2f} requests/s",
            flush=True,
        )
        ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
        with TritonServer(
            repository=repo, work_dir=work / "b", env={**env, "NIGHTREAD_SLEEP_MS": str(args.flow_service_ms)}, **ports
        ) as server:
            wall, images = nightly_run(server.grpc_url, copies=args.copies, concurrency=args.concurrency, work=work)
            stats = server_stats(server, "nightread_sleep")
        ceiling = MAX_BATCH / args.flow_service_ms * 1000  # requests/s
        requests_per_s = stats.requests / wall
        saturation, busy = requests_per_s / ceiling, stats.busy_s / wall
        print(
            f"(b) nightly flow, {images} images as {stats.requests} requests in {wall:.0f} s, "
            f"{args.flow_service_ms:g} ms per batch of {MAX_BATCH}: {requests_per_s:.2f} requests/s of a "
            f"{ceiling:.2f} requests/s ceiling ({saturation:.2f}); {images / wall:.2f} images/s",
            flush=True,
        )
        print(
            f"    the server executed {stats.executions} batches (mean {stats.requests / max(stats.executions, 1):.1f} "
            f"requests) for {stats.busy_s:.0f} s of the {wall:.0f} s run: busy {busy:.2f} "
            f"({stats.executions} x {args.flow_service_ms / 1000:g} s = "
            f"{stats.executions * args.flow_service_ms / 1000:.0f} s; per-request compute metric "
            f"{stats.compute_metric_s:.0f} s)",
            flush=True,
        )
        print(
            f"P3 saturation={saturation:.2f} batching_gain={on / off:.2f} busy={busy:.2f} "
            f"images_per_s={images / wall:.2f} requests_per_s={requests_per_s:.2f}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
