"""Triton Python-backend model `nightread_vlm`: the engine of integrations/vlm behind Triton.

One request per image (IMAGE: PNG bytes, TASK: JSON); the dynamic batcher hands several requests to
one execute() call. The checkpoint is loaded once per model instance (one process per instance).
Needs the nightread package (with its `inference` extra) installed in the backend's Python.

The model takes what the in-process annotator takes, as the same `InferenceSettings` and `EngineOptions`
(flows/wiring/runtime.py `build_annotator`). Each option comes from, first found:

1. NIGHTREAD_TRITON_MODEL / NIGHTREAD_TRITON_REVISION / NIGHTREAD_TRITON_DTYPE (`nightread triton serve --model`,
   compose, Kubernetes);
2. the config.pbtxt parameter of the same name, when not empty: model, revision, engine, adapter, dtype, device,
   threads, stop_strings and trust_remote_code_for (JSON lists), temperature;
3. the NIGHTREAD_INFERENCE__* settings in the server's environment, then their defaults.

The device follows the instance group (KIND_GPU: cuda:<its GPU>, KIND_CPU: cpu); only KIND_MODEL instances take
the `device` option. A missing checkpoint is an error here (no tiny stand-in), whatever
NIGHTREAD_INFERENCE__OFFLINE_FALLBACK says. Temperature (closed questions' P(yes)) is a parameter only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from pydantic import ValidationError

from flows.wiring.settings import InferenceSettings, NightreadSettings
from integrations.errors import ConfigurationError, NightreadError
from integrations.triton import IMAGE, RESULT, TASK, decode_task, encode_result
from integrations.vlm.engine import EngineOptions, remote_code_allowed
from integrations.vlm.local import LocalAnnotator, resolve_checkpoint


def _param(config: dict, key: str, default: str = "") -> str:
    return config.get("parameters", {}).get(key, {}).get("string_value", default) or default


# InferenceSettings fields a config.pbtxt parameter may set (JSON for the lists)
OPTION_PARAMETERS = ("model", "revision", "engine", "adapter", "dtype", "device", "threads")
LIST_PARAMETERS = ("stop_strings", "trust_remote_code_for")


def inference_options(config: dict) -> tuple:
    """(InferenceSettings, temperature) of this model: the NIGHTREAD_TRITON_* variables, then the config.pbtxt
    parameters, then NIGHTREAD_INFERENCE__*; a bad value is a ConfigurationError that names it."""
    try:
        values = NightreadSettings().inference.model_dump()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "NIGHTREAD_" + "__".join(str(p) for p in first["loc"]).upper()
        raise ConfigurationError(f"nightread_vlm: invalid setting {name}: {first['msg']}") from None
    for key in OPTION_PARAMETERS:
        if _param(config, key):
            values[key] = _param(config, key)
    for key in LIST_PARAMETERS:
        if _param(config, key):
            try:
                values[key] = json.loads(_param(config, key))
            except json.JSONDecodeError as exc:
                raise ConfigurationError(f'config.pbtxt parameter "{key}" must be a JSON list: {exc}') from None
    overrides = {
        "model": os.environ.get("NIGHTREAD_TRITON_MODEL"),
        "revision": os.environ.get("NIGHTREAD_TRITON_REVISION"),
        "dtype": os.environ.get("NIGHTREAD_TRITON_DTYPE"),
    }
    values.update({key: value for key, value in overrides.items() if value})
    try:
        inference = InferenceSettings.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigurationError(f'nightread_vlm: option "{first["loc"][0]}" is not valid: {first["msg"]}') from None
    try:
        temperature = float(_param(config, "temperature", "1.0"))
    except ValueError:
        temperature = float("nan")
    if not temperature > 0:
        raise ConfigurationError('config.pbtxt parameter "temperature" must be a number > 0')
    return inference, temperature


def instance_device(args: dict, configured: str) -> str:
    """Where this instance runs: the GPU Triton gave it, the CPU, or (KIND_MODEL) the configured device."""
    kind = args["model_instance_kind"]
    if kind == "GPU":
        return f"cuda:{args['model_instance_device_id']}"
    return configured if kind == "MODEL" else "cpu"


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        inf, temperature = inference_options(config)
        device = instance_device(args, inf.device)
        if inf.threads:
            import torch

            torch.set_num_threads(inf.threads)
        cache = Path(os.environ.get("NIGHTREAD_TRITON_CACHE", "/tmp/nightread-triton"))
        resolved = resolve_checkpoint(
            inf.model, revision=inf.revision, cache_dir=cache, offline_fallback=False, tiny_family=inf.tiny_family
        )
        options = EngineOptions(  # as build_annotator (flows/wiring/runtime.py) makes them
            dtype=inf.dtype,
            device=device,
            adapter=inf.adapter,
            engine=inf.engine,
            trust_remote_code=remote_code_allowed(inf.model, inf.trust_remote_code_for),
            stop_strings=tuple(inf.stop_strings),
        )
        self.annotator = LocalAnnotator.from_checkpoint(resolved, options=options, temperature=temperature)
        self.info = self.annotator.model_info
        self.logger = pb_utils.Logger
        self.logger.log_info(
            f"nightread_vlm: {self.info.name}@{self.info.revision} on {device} ({inf.dtype}, engine {inf.engine}); "
            f"one vision encoding per image: {self.annotator.encodes_once}"
        )

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
                # each image's caption, closed and open questions with one vision encoding where the engine can
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
