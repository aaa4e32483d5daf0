"""Triton Inference Server: the tensor contract of the `nightread_vlm` model, defined once, and
`TritonAnnotator`, the Annotator port over tritonclient (gRPC, or HTTP).

One request per image. Every input is required (requests with different sets of optional inputs
are never batched together by Triton's dynamic batcher):

    IMAGE   TYPE_STRING [1]   the rendered image, PNG bytes (decoded server-side)
    TASK    TYPE_STRING [1]   JSON: image context, caption on/off and cap, questions (id, text, kind, cap)
    RESULT  TYPE_STRING [1]   JSON: caption, answers (text, P(yes) for closed), prompt version,
                              per-stage timings, the model's name/revision/options

The server side (deploy/triton/model_repository/nightread_vlm/1/model.py) imports the same
encode/decode functions, so client and server cannot drift apart.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from integrations.errors import ConfigurationError, PermanentError, TransientError
from integrations.ports import (
    AnnotationRequest,
    AnnotationResult,
    Answer,
    ImageContext,
    ModelInfo,
    Question,
)

log = logging.getLogger(__name__)

MODEL_NAME = "nightread_vlm"
CONTRACT_VERSION = "1"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    config_type: str  # as written in config.pbtxt
    client_type: str  # as tritonclient names it
    dims: tuple[int, ...]


IMAGE = TensorSpec("IMAGE", "TYPE_STRING", "BYTES", (1,))
TASK = TensorSpec("TASK", "TYPE_STRING", "BYTES", (1,))
RESULT = TensorSpec("RESULT", "TYPE_STRING", "BYTES", (1,))
INPUTS = (IMAGE, TASK)
OUTPUTS = (RESULT,)


# --- the JSON carried in TASK and RESULT -----------------------------------------------------------


def encode_task(request: AnnotationRequest, *, info_only: bool = False) -> bytes:
    return json.dumps(
        {
            "contract": CONTRACT_VERSION,
            "info_only": info_only,
            "context": asdict(request.context),
            "caption": request.caption,
            "caption_max_new_tokens": request.caption_max_new_tokens,
            "questions": [asdict(q) for q in request.questions],
        }
    ).encode()


def decode_task(task: bytes, image_png: bytes) -> tuple[AnnotationRequest, bool]:
    """(request, info_only); raises PermanentError naming what is wrong."""
    try:
        data = json.loads(task)
        if data.get("contract") != CONTRACT_VERSION:
            raise PermanentError(f"TASK contract {data.get('contract')!r} is not {CONTRACT_VERSION!r}")
        questions = tuple(Question(**q) for q in data.get("questions", []))
        request = AnnotationRequest(
            image_png=image_png,
            context=ImageContext(**data.get("context", {})),
            questions=questions,
            caption=bool(data.get("caption", True)),
            caption_max_new_tokens=int(data.get("caption_max_new_tokens", 48)),
        )
        return request, bool(data.get("info_only", False))
    except PermanentError:
        raise
    except (ValueError, TypeError, AttributeError) as exc:
        raise PermanentError(f"TASK is not a valid nightread task: {type(exc).__name__}: {exc}") from exc


def encode_result(result: AnnotationResult | None, model: ModelInfo) -> bytes:
    body: dict[str, Any] = {"contract": CONTRACT_VERSION, "model": asdict(model)}
    if result is not None:
        body.update(
            {
                "caption": result.caption,
                "answers": [asdict(a) for a in result.answers],
                "prompt_version": result.prompt_version,
                "timings_ms": result.timings_ms,
            }
        )
    return json.dumps(body).encode()


def decode_result(raw: bytes) -> tuple[AnnotationResult | None, ModelInfo]:
    data = json.loads(raw)
    model = ModelInfo(**data["model"])
    if "answers" not in data:
        return None, model
    result = AnnotationResult(
        caption=data.get("caption"),
        answers=[Answer(**a) for a in data["answers"]],
        prompt_version=data["prompt_version"],
        timings_ms=data.get("timings_ms", {}),
    )
    return result, model


# --- the client -----------------------------------------------------------------------------------

_TRANSIENT_STATUS = (
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "RESOURCE_EXHAUSTED",
    "ABORTED",
    "CANCELLED",
    # a Triton shutting down (or restarting) unloads its models first: not a wrong model name (the
    # run checked the model is ready before it started), so ridden out like any outage (make chaos)
    "has no available versions",
)


def _is_transient(exc: Exception) -> bool:
    status = str(getattr(exc, "status", lambda: "")() or "")
    text = str(exc)
    if any(s in status or s in text for s in _TRANSIENT_STATUS):
        return True
    # connection refused / reset before any status (gRPC or HTTP)
    return any(
        s in text.lower()
        for s in (
            "connection refused",
            "failed to connect",
            "connection reset",
            "socket closed",
            "timed out",
            "timeout",
        )
    )


class Endpoint:
    """One Triton server as the pool sees it: requests in flight, when it may serve again after a
    failure (`down_until`, monotonic seconds), whether it must answer a readiness probe first."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.in_flight = 0
        self.served = 0  # requests answered
        self.failures = 0  # transient failures in a row
        self.down_until = 0.0
        self.probing = False

    @property
    def suspect(self) -> bool:
        return self.failures > 0


class EndpointPool:
    """Client-side balancing over Triton endpoints: each request goes to the endpoint with the fewest
    requests in flight among those up, at most `max_in_flight` per endpoint (callers wait for a slot).
    An endpoint that fails transiently is taken out for a backoff (doubling from `backoff_s` up to
    `max_backoff_s`) and answers a readiness `probe` before it serves again. When every endpoint is
    out, the one back soonest is handed out, so the caller's own retry timing decides (an outage)."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        max_in_flight: int,
        probe: Callable[[str], bool],
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not urls:
            raise ConfigurationError("Triton: at least one endpoint URL is needed")
        if len(set(urls)) != len(urls):
            raise ConfigurationError("Triton: an endpoint URL is listed twice")
        self.endpoints = [Endpoint(u) for u in urls]
        self.max_in_flight = max_in_flight
        self._probe, self._clock = probe, clock
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self._cond = threading.Condition()

    def any_up(self, *, besides: Endpoint | None = None) -> bool:
        now = self._clock()
        return any(e.down_until <= now for e in self.endpoints if e is not besides)

    def acquire(self) -> Endpoint:
        """An endpoint for one request (release it after)."""
        while True:
            with self._cond:
                now = self._clock()
                up = [e for e in self.endpoints if e.down_until <= now and not e.probing]
                free = [e for e in up if e.in_flight < self.max_in_flight]
                if not up and not any(e.probing for e in self.endpoints):
                    chosen = min(self.endpoints, key=lambda e: e.down_until)  # all out: the one back soonest
                    chosen.in_flight += 1
                    return chosen
                if not free:
                    self._cond.wait(timeout=0.5)  # a slot, a probe's end, or a backoff's end
                    continue
                chosen = min(free, key=lambda e: (e.in_flight, e.served))
                if not chosen.suspect:
                    chosen.in_flight += 1
                    return chosen
                chosen.probing = True  # back from a failure: ready again before it takes traffic
            ready = self._safe_probe(chosen.url)
            with self._cond:
                chosen.probing = False
                if ready:
                    chosen.failures = 0
                    chosen.in_flight += 1
                    self._cond.notify_all()
                    return chosen
                self._mark_down(chosen)
                self._cond.notify_all()

    def _safe_probe(self, url: str) -> bool:
        try:
            return bool(self._probe(url))
        except Exception:  # an endpoint still down answers with an error: not ready
            return False

    def _mark_down(self, endpoint: Endpoint) -> None:
        endpoint.failures += 1
        wait = min(self.backoff_s * 2 ** (endpoint.failures - 1), self.max_backoff_s)
        endpoint.down_until = self._clock() + wait

    def release(self, endpoint: Endpoint, *, failed: bool) -> None:
        """After a request: `failed` (transiently) takes the endpoint out for a backoff."""
        with self._cond:
            endpoint.in_flight -= 1
            if failed:
                if endpoint.down_until <= self._clock():
                    self._mark_down(endpoint)
            else:
                endpoint.served += 1
                endpoint.failures = 0
            self._cond.notify_all()

    def mark_down(self, endpoint: Endpoint) -> None:
        with self._cond:
            self._mark_down(endpoint)
            self._cond.notify_all()

    def stats(self) -> dict[str, int]:
        """Requests answered per endpoint URL."""
        with self._cond:
            return {e.url: e.served for e in self.endpoints}


class TritonAnnotator:
    """Annotator over one or several Triton servers. Requests run in parallel (at most `max_in_flight`
    per endpoint) so each server's dynamic batcher can form batches; they are balanced over the
    endpoints by requests in flight, fail over at once to another endpoint when one fails, and are
    retried with backoff on transient errors while every endpoint is out (an outage)."""

    backend = "triton"

    def __init__(
        self,
        *,
        url: str | None = None,
        urls: Sequence[str] = (),
        protocol: str = "grpc",
        model: str = MODEL_NAME,
        version: str = "",
        timeout_s: float = 300.0,
        max_in_flight: int = 16,
        retries: int = 3,
        backoff_s: float = 0.5,
        outage_s: float = 90.0,
        max_backoff_s: float = 10.0,
    ) -> None:
        """`urls` (or the one `url`): the endpoints. A transient failure is retried `retries` times with
        doubling waits from `backoff_s`, and for as long as `outage_s` from the first failure (a Triton
        restart, a GPU node replaced), the waits capped at `max_backoff_s`; with several endpoints a
        failure moves the request to another one at once."""
        if protocol not in ("grpc", "http"):
            raise ConfigurationError(f'Triton protocol must be "grpc" or "http", not {protocol!r}')
        endpoints = list(urls) or ([url] if url else [])
        self.protocol, self.model, self.version = protocol, model, version
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.outage_s, self.max_backoff_s = outage_s, max_backoff_s
        self.endpoints = EndpointPool(
            endpoints,
            max_in_flight=max_in_flight,
            probe=self._ready,
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
        )
        self.url = ", ".join(endpoints)  # for messages
        self._pool = ThreadPoolExecutor(max_workers=max_in_flight * len(endpoints), thread_name_prefix="triton")
        self._local = threading.local()
        self._info: ModelInfo | None = None

    # one client per thread and endpoint: simple and safe for both protocols
    def _client(self, url: str) -> Any:
        clients: dict[str, Any] = self._local.__dict__.setdefault("clients", {})
        client = clients.get(url)
        if client is None:
            client = clients[url] = self._module().InferenceServerClient(url=url)
        return client

    def _forget_client(self, url: str) -> None:
        self._local.__dict__.setdefault("clients", {}).pop(url, None)

    def _module(self) -> Any:
        if self.protocol == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc  # type: ignore[no-redef]
        return tc

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> TritonAnnotator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- readiness ------------------------------------------------------------------------------
    def _ready(self, url: str) -> bool:
        client = self._client(url)
        return bool(client.is_server_ready() and client.is_model_ready(self.model, self.version))

    def _check_endpoint(self, url: str) -> ModelInfo:
        try:
            client = self._client(url)
            if not client.is_server_ready():
                raise TransientError(f"Triton at {url} is not ready")
            if not client.is_model_ready(self.model, self.version):
                which = f"{self.model} version {self.version}" if self.version else self.model
                raise ConfigurationError(f"model {which} is not ready on Triton at {url}")
        except (TransientError, ConfigurationError):
            raise
        except Exception as exc:
            self._forget_client(url)
            if _is_transient(exc):
                raise TransientError(f"Triton at {url} unreachable: {exc}") from exc
            raise PermanentError(f"Triton at {url}: {exc}") from exc
        probe = AnnotationRequest(image_png=b"", context=ImageContext(), caption=False)
        _, info = decode_result(self._infer_at(url, probe, info_only=True))
        return info

    def check_ready(self) -> ModelInfo:
        """Every endpoint checked: at least one live and ready with the model (and version, if pinned);
        the others are taken out until they answer a probe. All that answer must serve the same model
        and revision (one provenance per run). Returns the model's provenance."""
        infos: dict[str, ModelInfo] = {}
        errors: list[Exception] = []
        for endpoint in self.endpoints.endpoints:
            try:
                infos[endpoint.url] = self._check_endpoint(endpoint.url)
            except (TransientError, ConfigurationError, PermanentError) as exc:
                errors.append(exc)
                self.endpoints.mark_down(endpoint)
                log.warning("Triton endpoint %s is not ready (%s); it is probed again before use", endpoint.url, exc)
        if not infos:
            raise errors[0]
        served = {(i.name, i.revision) for i in infos.values()}
        if len(served) > 1:
            listed = "; ".join(f"{url}: {i.name} {i.revision}" for url, i in infos.items())
            raise ConfigurationError(f"Triton endpoints serve different models ({listed}): one model per run")
        info = next(iter(infos.values()))
        self._info = ModelInfo(
            name=info.name,
            revision=info.revision,
            backend=self.backend,
            options={**info.options, "triton_model": self.model, "triton_version": self.version or "latest"},
            offline_stand_in=info.offline_stand_in,
        )
        return self._info

    @property
    def model_info(self) -> ModelInfo:
        return self._info or self.check_ready()

    # --- inference --------------------------------------------------------------------------------
    def _inputs(self, request: AnnotationRequest, *, info_only: bool) -> tuple[list[Any], list[Any]]:
        import numpy as np

        tc = self._module()
        image = tc.InferInput(IMAGE.name, [1, *IMAGE.dims], IMAGE.client_type)
        image.set_data_from_numpy(np.array([[request.image_png]], dtype=object))
        task = tc.InferInput(TASK.name, [1, *TASK.dims], TASK.client_type)
        task.set_data_from_numpy(np.array([[encode_task(request, info_only=info_only)]], dtype=object))
        return [image, task], [tc.InferRequestedOutput(RESULT.name)]

    def _infer_at(self, url: str, request: AnnotationRequest, *, info_only: bool = False) -> bytes:
        """One request to one endpoint, no retries."""
        inputs, outputs = self._inputs(request, info_only=info_only)
        kwargs: dict[str, Any] = {"model_version": self.version, "outputs": outputs}
        if self.protocol == "grpc":
            kwargs["client_timeout"] = self.timeout_s
        response = self._client(url).infer(self.model, inputs, **kwargs)
        return bytes(response.as_numpy(RESULT.name).reshape(-1)[0])

    def _infer(self, request: AnnotationRequest, *, info_only: bool = False) -> bytes:
        delay = self.backoff_s
        first_failure: float | None = None
        attempt = 0
        while True:
            endpoint = self.endpoints.acquire()
            try:
                raw = self._infer_at(endpoint.url, request, info_only=info_only)
            except Exception as exc:
                transient = _is_transient(exc)
                self.endpoints.release(endpoint, failed=transient)
                if not transient:
                    raise PermanentError(f"Triton refused the request: {exc}") from exc
                self._forget_client(endpoint.url)  # reconnect
                if self.endpoints.any_up(besides=endpoint):  # fail over at once (each failure takes one out)
                    log.warning("Triton endpoint %s failed (%s); the request moves to another", endpoint.url, exc)
                    continue
                now = time.monotonic()
                first_failure = now if first_failure is None else first_failure
                attempt += 1
                if attempt > self.retries and now - first_failure + delay > self.outage_s:
                    raise TransientError(
                        f"Triton at {self.url} failed for {now - first_failure:.0f} s ({attempt} tries): {exc}"
                    ) from exc
                log.warning("Triton request failed (%s); retrying in %.1f s", exc, delay)
                time.sleep(delay)  # backoff between retries of a failed call: every endpoint is out
                delay = min(delay * 2, self.max_backoff_s)
                continue
            self.endpoints.release(endpoint, failed=False)
            return raw

    def annotate(self, requests: Sequence[AnnotationRequest]) -> list[AnnotationResult]:
        futures = [self._pool.submit(self._infer, r) for r in requests]
        results = []
        for future in futures:
            result, _ = decode_result(future.result())
            if result is None:
                raise PermanentError("Triton answered without a result")
            results.append(result)
        return results
