"""config.pbtxt of the Triton model and the client's constants must agree: defined once, checked here."""

from __future__ import annotations

from pathlib import Path

import pytest

from integrations.errors import PermanentError
from integrations.ports import AnnotationRequest, AnnotationResult, Answer, ImageContext, ModelInfo, Question
from integrations.triton import INPUTS, MODEL_NAME, OUTPUTS, decode_result, decode_task, encode_result, encode_task
from integrations.triton_server import prepare_repository

REPO = Path(__file__).resolve().parents[2] / "deploy" / "triton"


def parse(path: Path):
    pytest.importorskip("tritonclient")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def type_name(value: int) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(value)


@pytest.mark.parametrize("config", [REPO / "model_repository" / MODEL_NAME / "config.pbtxt", REPO / "config.gpu.pbtxt"])
def test_config_matches_the_client_constants(config):
    cfg = parse(config)
    assert cfg.name == MODEL_NAME
    assert cfg.backend == "python"
    assert [(i.name, type_name(i.data_type), tuple(i.dims)) for i in cfg.input] == [
        (t.name, t.config_type, t.dims) for t in INPUTS
    ]
    assert [(o.name, type_name(o.data_type), tuple(o.dims)) for o in cfg.output] == [
        (t.name, t.config_type, t.dims) for t in OUTPUTS
    ]
    assert not any(i.optional for i in cfg.input), "optional inputs keep requests from being batched together"
    assert cfg.max_batch_size >= max(cfg.dynamic_batching.preferred_batch_size)
    assert cfg.dynamic_batching.max_queue_delay_microseconds > 0


def test_gpu_config_runs_on_gpus_in_bf16():
    cfg = parse(REPO / "config.gpu.pbtxt")
    from tritonclient.grpc import model_config_pb2

    assert {g.kind for g in cfg.instance_group} == {model_config_pb2.ModelInstanceGroup.Kind.KIND_GPU}
    assert cfg.parameters["dtype"].string_value == "bfloat16"


def test_prepare_repository_rewrites_instance_group(tmp_path):
    repo = prepare_repository(REPO / "model_repository", tmp_path / "r", instance_count=3, instance_kind="KIND_GPU")
    cfg = parse(repo / MODEL_NAME / "config.pbtxt")
    from tritonclient.grpc import model_config_pb2

    kind_gpu = model_config_pb2.ModelInstanceGroup.Kind.KIND_GPU
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(3, kind_gpu)]
    assert (repo / MODEL_NAME / "1" / "model.py").is_file()


def test_task_and_result_roundtrip():
    request = AnnotationRequest(
        b"\x89PNG",
        ImageContext("CT", "CHEST", "", "HFS"),
        (
            Question("q1", "Is there a nodule?", flag_threshold=0.7, critical=True),
            Question("q2", "Which plane?", kind="open", max_new_tokens=5),
        ),
        caption=False,
        caption_max_new_tokens=9,
    )
    back, info_only = decode_task(encode_task(request), b"\x89PNG")
    assert back == request
    assert info_only is False
    result = AnnotationResult("a caption", [Answer("q1", "no", 0.25), Answer("q2", "axial")], "p1-x", {"scoring_ms": 1})
    model = ModelInfo("m", "r", "local", {"dtype": "float32"}, False)
    assert decode_result(encode_result(result, model)) == (result, model)
    assert decode_result(encode_result(None, model)) == (None, model)


@pytest.mark.parametrize("task", [b"not json", b'{"contract": "0"}', b'{"contract": "1", "questions": [{"idx": 1}]}'])
def test_bad_tasks_are_permanent_errors(task):
    with pytest.raises(PermanentError):
        decode_task(task, b"")
