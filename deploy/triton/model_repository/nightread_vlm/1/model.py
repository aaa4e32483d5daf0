"""Triton Python-backend model `nightread_vlm`: the engine of integrations/vlm behind Triton.

One request per image (IMAGE: PNG bytes, TASK: JSON); the dynamic batcher hands several requests to
one execute() call. The checkpoint is named by the config parameter "model" or the environment
variable NIGHTREAD_TRITON_MODEL; it is loaded once per model instance (one process per instance).
Needs the nightread package (with its `inference` extra) installed in the backend's Python.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from integrations.errors import NightreadError
from integrations.triton import IMAGE, RESULT, TASK, decode_task, encode_result
from integrations.vlm.engine import EngineOptions
from integrations.vlm.local import LocalAnnotator, resolve_checkpoint


def _param(config: dict, key: str, default: str = "") -> str:
    return config.get("parameters", {}).get(key, {}).get("string_value", default) or default


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        model = os.environ.get("NIGHTREAD_TRITON_MODEL") or _param(config, "model")
        revision = os.environ.get("NIGHTREAD_TRITON_REVISION") or _param(config, "revision") or None
        dtype = os.environ.get("NIGHTREAD_TRITON_DTYPE") or _param(config, "dtype", "auto")
        device = f"cuda:{args['model_instance_device_id']}" if args["model_instance_kind"] == "GPU" else "cpu"
        cache = Path(os.environ.get("NIGHTREAD_TRITON_CACHE", "/tmp/nightread-triton"))
        resolved = resolve_checkpoint(
            model, revision=revision, cache_dir=cache, offline_fallback=False, tiny_family="smolvlm"
        )
        self.annotator = LocalAnnotator.from_checkpoint(resolved, options=EngineOptions(dtype=dtype, device=device))
        self.info = self.annotator.model_info
        self.logger = pb_utils.Logger
        self.logger.log_info(f"nightread_vlm: {self.info.name}@{self.info.revision} on {device} ({dtype})")

    def execute(self, requests: list) -> list:
        decoded, responses = [], [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                image = pb_utils.get_input_tensor_by_name(request, IMAGE.name).as_numpy().reshape(-1)[0]
                task = pb_utils.get_input_tensor_by_name(request, TASK.name).as_numpy().reshape(-1)[0]
                annotation, info_only = decode_task(bytes(task), bytes(image))
            except NightreadError as exc:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
                continue
            if info_only:
                responses[i] = self._respond(encode_result(None, self.info))
            else:
                decoded.append((i, annotation))
        if decoded:
            try:
                results = self.annotator.annotate([a for _, a in decoded])
                for (i, _), result in zip(decoded, results, strict=True):
                    responses[i] = self._respond(encode_result(result, self.info))
            except NightreadError:  # one bad request must not fail its batch: answer each on its own
                for i, annotation in decoded:
                    try:
                        (result,) = self.annotator.annotate([annotation])
                        responses[i] = self._respond(encode_result(result, self.info))
                    except NightreadError as exc:  # e.g. questions to a captions-only model
                        responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
        return responses

    @staticmethod
    def _respond(payload: bytes):
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(RESULT.name, np.array([[payload]], dtype=object))]
        )
