"""The `nightread.engines` entry-point group: a small plugin engine, installed by the test as a real
distribution (a .dist-info with entry_points.txt on sys.path, as pip leaves it), found and used."""

from __future__ import annotations

import importlib
import io
import textwrap

import numpy as np
import pytest
from PIL import Image

from integrations.errors import ConfigurationError
from integrations.ports import AnnotationRequest, ImageContext, Question

PLUGIN = '''
class EchoEngine:
    """A custom architecture stand-in: answers from the question text, captions from the image size."""

    family = "echo"
    captions_only = False
    dtype = "n/a"

    def __init__(self, checkpoint, options):
        self.checkpoint, self.options = checkpoint, options

    def generate(self, image, prompt, *, max_new_tokens, min_new_tokens=0):
        return f"echo {image.size[0]}x{image.size[1]}"

    def p_yes_shared(self, image, context, questions, *, temperature=1.0):
        return [0.9 if "mass" in q else 0.1 for q in questions], {"scoring_ms": 0.0}


def load(checkpoint, options):
    return EchoEngine(checkpoint, options)
'''


@pytest.fixture
def echo_plugin(tmp_path, monkeypatch):
    (tmp_path / "nightread_echo_engine.py").write_text(textwrap.dedent(PLUGIN))
    dist = tmp_path / "nightread_echo_engine-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: nightread-echo-engine\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[nightread.engines]\necho = nightread_echo_engine:load\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    return "echo"


def test_the_plugin_is_discovered(echo_plugin):
    from integrations.vlm.engine import engine_plugins

    assert "echo" in engine_plugins()


def test_settings_select_the_plugin_engine(echo_plugin, make_settings, tiny_model):
    from flows.wiring.runtime import build_annotator

    annotator, _ = build_annotator(make_settings(inference={"engine": "echo"}))
    buf = io.BytesIO()
    Image.fromarray(np.zeros((48, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
    (result,) = annotator.annotate(
        [
            AnnotationRequest(
                buf.getvalue(),
                ImageContext("CT"),
                (Question("m", "Is there a mass?"), Question("e", "Is there an effusion?")),
            )
        ]
    )
    assert result.caption == "echo 40x48"
    assert [a.p_yes for a in result.answers] == [0.9, 0.1]
    assert annotator.model_info.options["family"] == "echo"


def test_an_unknown_plugin_is_a_clear_error(tiny_model):
    from integrations.vlm.engine import EngineOptions, load_engine

    with pytest.raises(ConfigurationError, match="no engine plugin 'nope'"):
        load_engine(tiny_model, options=EngineOptions(engine="nope"))
