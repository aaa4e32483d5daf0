"""The Triton model takes what the in-process annotator takes: a plugin engine and a LoRA adapter (with stop
strings, temperature and dtype) served by a real tritonserver give the answers LocalAnnotator gives in this
process on the same images and questions. The engine comes from the server's environment
(NIGHTREAD_INFERENCE__ENGINE), the adapter and the rest from config.pbtxt parameters; which source wins is
checked without a server on deploy/triton/.../1/model.py itself."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from integrations.errors import ConfigurationError
from integrations.ports import AnnotationRequest, ImageContext, Question
from integrations.vlm.engine import EngineOptions
from integrations.vlm.local import LocalAnnotator, resolve_checkpoint
from tests.conftest import require_or_skip

REPOSITORY = Path(__file__).resolve().parents[2] / "deploy" / "triton" / "model_repository" / "nightread_vlm"

QUESTIONS = (
    Question("effusion", "Is there a pleural effusion?"),
    Question("ptx", "Is there a pneumothorax?"),
    Question("finding", "What is the most important finding?", kind="open", max_new_tokens=4),
)


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (80, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


REQUESTS = [
    AnnotationRequest(png(i), ImageContext("DX", "CHEST", "PA"), QUESTIONS, caption_max_new_tokens=6) for i in range(4)
]


# --- where each option comes from (model.py, no server) ------------------------------------------------------


@pytest.fixture
def model_py(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """deploy/triton/.../1/model.py, imported with a stand-in for the backend's triton_python_backend_utils."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    for name in ("NIGHTREAD_TRITON_MODEL", "NIGHTREAD_TRITON_REVISION", "NIGHTREAD_TRITON_DTYPE"):
        monkeypatch.delenv(name, raising=False)
    spec = importlib.util.spec_from_file_location("nightread_vlm_model", REPOSITORY / "1" / "model.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pbtxt_config(**parameters: str) -> dict[str, Any]:
    """A model config as Triton hands it to initialize() (args["model_config"], parsed)."""
    return {"parameters": {k: {"string_value": v} for k, v in parameters.items()}}


def test_parameters_beat_the_settings_and_the_triton_variables_beat_both(model_py, monkeypatch):
    monkeypatch.setenv("NIGHTREAD_INFERENCE__ENGINE", "from-env")
    monkeypatch.setenv("NIGHTREAD_INFERENCE__ADAPTER", "/adapters/from-env")
    monkeypatch.setenv("NIGHTREAD_INFERENCE__STOP_STRINGS", '["env"]')
    monkeypatch.setenv("NIGHTREAD_INFERENCE__TRUST_REMOTE_CODE_FOR", '["/models/md2"]')
    config = pbtxt_config(model="/models/param", engine="tinyllava", stop_strings='["\\n", "."]', temperature="2.5")
    inf, temperature = model_py.inference_options(config)
    assert (inf.model, inf.engine, inf.adapter) == ("/models/param", "tinyllava", "/adapters/from-env")
    assert inf.stop_strings == ["\n", "."]
    assert inf.trust_remote_code_for == ["/models/md2"]
    assert temperature == 2.5
    monkeypatch.setenv("NIGHTREAD_TRITON_MODEL", "/models/md2")
    monkeypatch.setenv("NIGHTREAD_TRITON_DTYPE", "float32")
    inf, temperature = model_py.inference_options(
        pbtxt_config(model="/models/param", dtype="bfloat16", stop_strings="")
    )
    assert (inf.model, inf.dtype, inf.stop_strings, temperature) == ("/models/md2", "float32", ["env"], 1.0)


def test_the_shipped_parameters_are_options_and_empty_ones_leave_the_defaults(model_py, monkeypatch):
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    from flows.wiring.settings import InferenceSettings

    for name in [n for n in os.environ if n.startswith("NIGHTREAD_INFERENCE__")]:
        monkeypatch.delenv(name)
    parsed = text_format.Parse((REPOSITORY / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    config = json_format.MessageToDict(parsed, preserving_proto_field_name=True)
    keys = set(config["parameters"])
    assert keys == {*model_py.OPTION_PARAMETERS, *model_py.LIST_PARAMETERS, "temperature"}
    inf, temperature = model_py.inference_options(config)
    assert inf == InferenceSettings()
    assert temperature == 1.0


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({"stop_strings": "not json"}, "stop_strings"),
        ({"trust_remote_code_for": '"one"'}, "trust_remote_code_for"),
        ({"dtype": "float8"}, "dtype"),
        ({"threads": "many"}, "threads"),
        ({"temperature": "0"}, "temperature"),
        ({"temperature": "warm"}, "temperature"),
    ],
)
def test_a_bad_parameter_is_named(model_py, parameters, named):
    with pytest.raises(ConfigurationError, match=named):
        model_py.inference_options(pbtxt_config(**parameters))


def test_the_instance_group_places_the_model(model_py):
    assert model_py.instance_device({"model_instance_kind": "GPU", "model_instance_device_id": "1"}, "cpu") == "cuda:1"
    assert model_py.instance_device({"model_instance_kind": "CPU", "model_instance_device_id": "0"}, "cuda") == "cpu"
    assert model_py.instance_device({"model_instance_kind": "MODEL", "model_instance_device_id": "0"}, "cuda:2") == (
        "cuda:2"
    )


# --- a real tritonserver ---------------------------------------------------------------------------------------


def start_triton(work: Path, model: Path, *, env: dict[str, str] | None = None, **parameters: str) -> Any:
    """tritonserver on the repository with `parameters` written into config.pbtxt and `env` added to its
    environment, started (the caller stops it)."""
    try:
        from integrations.triton_server import pytriton_dir

        pytriton_dir()
        import tritonclient.grpc  # noqa: F401
    except Exception as exc:
        require_or_skip(f"tritonserver (pip install 'nightread[triton]'): {exc}")
    from tests.services import triton_on_free_ports

    server = triton_on_free_ports(work, model)
    server.env.update(env or {})
    config = server.repository / "nightread_vlm" / "config.pbtxt"
    text = config.read_text()
    for key, value in parameters.items():
        text, n = re.subn(
            rf'\{{ key: "{key}" value: \{{ string_value: "[^"]*" \}} \}}',
            lambda _m, k=key, v=value: f'{{ key: "{k}" value: {{ string_value: {json.dumps(v)} }} }}',
            text,
        )
        assert n == 1, key
    config.write_text(text)
    server.start()
    return server


def local_annotator(model: Path, options: EngineOptions, temperature: float = 1.0) -> LocalAnnotator:
    resolved = resolve_checkpoint(
        str(model), revision=None, cache_dir=model.parent, offline_fallback=False, tiny_family="smolvlm"
    )
    return LocalAnnotator.from_checkpoint(resolved, options=options, temperature=temperature)


def assert_same_answers(local: LocalAnnotator, url: str) -> dict[str, str]:
    """Triton's answers equal the in-process ones (captions and open answers identical, P(yes) within 1e-4) and
    the provenance agrees; the Triton model's options are returned."""
    from integrations.triton import TritonAnnotator

    expected = local.annotate(REQUESTS)
    with TritonAnnotator(url=url, max_in_flight=4) as triton:
        served = triton.annotate(REQUESTS)
        info = triton.check_ready()
    for a, b in zip(expected, served, strict=True):
        assert a.caption == b.caption
        assert [x.question_id for x in a.answers] == [x.question_id for x in b.answers]
        assert [x.text for x in a.answers] == [x.text for x in b.answers]
        assert np.allclose([x.p_yes for x in a.answers[:2]], [x.p_yes for x in b.answers[:2]], atol=1e-4, rtol=0)
    mine = local.model_info
    assert (info.name, info.revision, info.offline_stand_in) == (mine.name, mine.revision, mine.offline_stand_in)
    served_options = {k: v for k, v in info.options.items() if not k.startswith("triton_")}  # the client's own
    assert served_options == mine.options
    return served_options


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_a_plugin_model_on_triton_answers_as_in_process(tmp_path):
    """The seed plugin `tinyllava`, its engine chosen by NIGHTREAD_INFERENCE__ENGINE in the server's environment."""
    from integrations.vlm.plugins import build_tiny_plugin

    folder = build_tiny_plugin("tinyllava", tmp_path / "tinyllava")
    server = start_triton(tmp_path / "triton", folder, env={"NIGHTREAD_INFERENCE__ENGINE": "tinyllava"})
    try:
        options = assert_same_answers(local_annotator(folder, EngineOptions(engine="tinyllava")), server.grpc_url)
    finally:
        server.stop()
    assert options["family"] == "tinyllava"


@pytest.fixture
def lora_adapter(tmp_path: Path, tiny_model: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(tiny_model)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # LoRA starts as a no-op (B = 0): make this one change the model
                param.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "lora")
    return tmp_path / "lora"


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_a_lora_model_on_triton_answers_as_in_process(tmp_path, tiny_model, lora_adapter):
    """The tiny SmolVLM with a LoRA adapter, stop strings, a temperature and a dtype, all config.pbtxt parameters."""
    stops = ["\n", "."]
    server = start_triton(
        tmp_path / "triton",
        tiny_model,
        adapter=str(lora_adapter),
        stop_strings=json.dumps(stops),
        temperature="2.0",
        dtype="float32",
    )
    try:
        local = local_annotator(
            tiny_model, EngineOptions(adapter=str(lora_adapter), stop_strings=tuple(stops), dtype="float32"), 2.0
        )
        options = assert_same_answers(local, server.grpc_url)
    finally:
        server.stop()
    assert options["adapter"] == str(lora_adapter)
    assert options["stop_strings"] == json.dumps(stops)

    # the adapter and the temperature matter, so Triton really applied them: without either, the answers differ
    def p_yes(annotator: LocalAnnotator) -> list[float]:
        return [a.p_yes for r in annotator.annotate(REQUESTS) for a in r.answers[:2]]

    bare = local_annotator(tiny_model, EngineOptions(stop_strings=tuple(stops), dtype="float32"), 2.0)
    cool = local_annotator(tiny_model, local.engine.options, 1.0)
    assert p_yes(bare) != pytest.approx(p_yes(local), abs=1e-4)
    assert p_yes(cool) != pytest.approx(p_yes(local), abs=1e-4)
