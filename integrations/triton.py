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
from collections.abc import Sequence
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


class TritonAnnotator:
    """Annotator over Triton. Requests run in parallel (at most `max_in_flight`) so the server's
    dynamic batcher can form batches; each is retried with backoff on transient errors."""

    backend = "triton"

    def __init__(
        self,
        *,
        url: str,
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
        """A transient failure is retried `retries` times with doubling waits from `backoff_s`, and for
        as long as `outage_s` from the first failure (a Triton restart, a GPU node replaced), the waits
        capped at `max_backoff_s`."""
        if protocol not in ("grpc", "http"):
            raise ConfigurationError(f'Triton protocol must be "grpc" or "http", not {protocol!r}')
        self.url, self.protocol, self.model, self.version = url, protocol, model, version
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.outage_s, self.max_backoff_s = outage_s, max_backoff_s
        self._pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="triton")
        self._local = threading.local()
        self._info: ModelInfo | None = None

    # one client per thread: simple and safe for both protocols
    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            if self.protocol == "grpc":
                import tritonclient.grpc as tc
            else:
                import tritonclient.http as tc  # type: ignore[no-redef]
            client = tc.InferenceServerClient(url=self.url)
            self._local.client = client
        return client

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
    def check_ready(self) -> ModelInfo:
        """Server live and ready, the model (and version, if pinned) ready; returns its provenance."""
        try:
            client = self._client()
            if not client.is_server_ready():
                raise TransientError(f"Triton at {self.url} is not ready")
            if not client.is_model_ready(self.model, self.version):
                which = f"{self.model} version {self.version}" if self.version else self.model
                raise ConfigurationError(f"model {which} is not ready on Triton at {self.url}")
        except (TransientError, ConfigurationError):
            raise
        except Exception as exc:
            if _is_transient(exc):
                raise TransientError(f"Triton at {self.url} unreachable: {exc}") from exc
            raise PermanentError(f"Triton at {self.url}: {exc}") from exc
        probe = AnnotationRequest(image_png=b"", context=ImageContext(), caption=False)
        raw = self._infer(probe, info_only=True)
        _, info = decode_result(raw)
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
    def _infer(self, request: AnnotationRequest, *, info_only: bool = False) -> bytes:
        import numpy as np

        tc = self._module()
        image = tc.InferInput(IMAGE.name, [1, *IMAGE.dims], IMAGE.client_type)
        image.set_data_from_numpy(np.array([[request.image_png]], dtype=object))
        task = tc.InferInput(TASK.name, [1, *TASK.dims], TASK.client_type)
        task.set_data_from_numpy(np.array([[encode_task(request, info_only=info_only)]], dtype=object))
        outputs = [tc.InferRequestedOutput(RESULT.name)]
        delay = self.backoff_s
        first_failure: float | None = None
        attempt = 0
        while True:
            try:
                kwargs: dict[str, Any] = {"model_version": self.version, "outputs": outputs}
                if self.protocol == "grpc":
                    kwargs["client_timeout"] = self.timeout_s
                response = self._client().infer(self.model, [image, task], **kwargs)
                return bytes(response.as_numpy(RESULT.name).reshape(-1)[0])
            except Exception as exc:
                if not _is_transient(exc):
                    raise PermanentError(f"Triton refused the request: {exc}") from exc
                now = time.monotonic()
                first_failure = now if first_failure is None else first_failure
                attempt += 1
                if attempt > self.retries and now - first_failure + delay > self.outage_s:
                    raise TransientError(
                        f"Triton at {self.url} failed for {now - first_failure:.0f} s ({attempt} tries): {exc}"
                    ) from exc
                log.warning("Triton request failed (%s); retrying in %.1f s", exc, delay)
                self._local.client = None  # reconnect
                time.sleep(delay)  # backoff between retries of a failed call
                delay = min(delay * 2, self.max_backoff_s)

    def annotate(self, requests: Sequence[AnnotationRequest]) -> list[AnnotationResult]:
        futures = [self._pool.submit(self._infer, r) for r in requests]
        results = []
        for future in futures:
            result, _ = decode_result(future.result())
            if result is None:
                raise PermanentError("Triton answered without a result")
            results.append(result)
        return results
