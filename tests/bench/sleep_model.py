"""A stand-in for a GPU model with a fixed service time per batch (benchmarks only), for Triton.

Speaks nightread_vlm's contract (IMAGE, TASK -> RESULT); each execute() sleeps the configured time,
whatever the batch size, as a GPU running a batch does; its answers are fixed and mean nothing.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from integrations.ports import AnnotationResult, Answer, ModelInfo
from integrations.triton import IMAGE, RESULT, TASK, decode_task, encode_result


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        default = config.get("parameters", {}).get("service_time_ms", {}).get("string_value", "250")
        self.service_s = float(os.environ.get("NIGHTREAD_SLEEP_MS", default)) / 1000.0
        self.info = ModelInfo(
            name=config["name"],
            revision="fixed",
            backend="local",
            options={"service_time_ms": str(self.service_s * 1000)},
            offline_stand_in=True,
        )

    def execute(self, requests: list) -> list:
        time.sleep(self.service_s)  # the batch's "GPU time"
        responses = []
        for request in requests:
            image = pb_utils.get_input_tensor_by_name(request, IMAGE.name).as_numpy().reshape(-1)[0]
            task = pb_utils.get_input_tensor_by_name(request, TASK.name).as_numpy().reshape(-1)[0]
            annotation, info_only = decode_task(bytes(task), bytes(image))
            result = (
                None
                if info_only
                else AnnotationResult(
                    caption="fixed caption" if annotation.caption else None,
                    answers=[
                        Answer(q.id, "no" if q.kind == "closed" else "n/a", 0.25 if q.kind == "closed" else None)
                        for q in annotation.questions
                    ],
                    prompt_version="sleep",
                    timings_ms={"service_ms": self.service_s * 1000},
                )
            )
            payload = encode_result(result, self.info)
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(RESULT.name, np.array([[payload]], dtype=object))]
                )
            )
        return responses
