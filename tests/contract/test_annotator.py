"""The same contract on both Annotator backends: in-process (LocalAnnotator) and Triton (TritonAnnotator).

Both run the same tiny checkpoint, so beyond the contract they must give the same numbers.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from integrations.ports import AnnotationRequest, Annotator, ImageContext, Question
from integrations.vlm import prompts


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (80, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


QUESTIONS = (
    Question("effusion", "Is there a pleural effusion?", flag_threshold=0.7),
    Question("ptx", "Is there a pneumothorax?"),
    Question("finding", "What is the most important finding?", kind="open", max_new_tokens=4),
)
REQUESTS = [
    AnnotationRequest(png(i), ImageContext("DX", "CHEST", "PA"), QUESTIONS, caption_max_new_tokens=6) for i in range(5)
]


@pytest.fixture(params=["local", pytest.param("triton", marks=pytest.mark.integration)])
def annotator(request, tiny_model):
    from integrations.vlm.local import LocalAnnotator, resolve_checkpoint

    if request.param == "local":
        resolved = resolve_checkpoint(
            str(tiny_model), revision=None, cache_dir=tiny_model.parent, offline_fallback=False, tiny_family="smolvlm"
        )
        yield LocalAnnotator.from_checkpoint(resolved)
        return
    from integrations.triton import TritonAnnotator

    server = request.getfixturevalue("triton_server")
    with TritonAnnotator(url=server.grpc_url, max_in_flight=8) as triton:
        yield triton


def test_is_an_annotator(annotator):
    assert isinstance(annotator, Annotator)


def test_one_result_per_request_in_order_with_every_answer(annotator):
    results = annotator.annotate(REQUESTS)
    assert len(results) == len(REQUESTS)
    for result in results:
        assert isinstance(result.caption, str)
        assert [a.question_id for a in result.answers] == ["effusion", "ptx", "finding"]
        assert all(0.0 <= a.p_yes <= 1.0 for a in result.answers[:2])
        assert result.answers[2].p_yes is None
        assert result.prompt_version == prompts.PROMPT_VERSION


def test_provenance(annotator):
    info = annotator.model_info
    assert info.name == "tiny-random-smolvlm"
    assert len(info.revision) == 12
    assert info.offline_stand_in
    assert info.options["prompt_version"] == prompts.PROMPT_VERSION


def test_no_caption_when_not_asked(annotator):
    (result,) = annotator.annotate([AnnotationRequest(png(9), ImageContext("CT"), QUESTIONS[:1], caption=False)])
    assert result.caption is None


@pytest.mark.integration
def test_triton_and_in_process_give_the_same_answers(tiny_model, triton_server):
    from integrations.triton import TritonAnnotator
    from integrations.vlm.local import LocalAnnotator, resolve_checkpoint

    resolved = resolve_checkpoint(
        str(tiny_model), revision=None, cache_dir=tiny_model.parent, offline_fallback=False, tiny_family="smolvlm"
    )
    local = LocalAnnotator.from_checkpoint(resolved).annotate(REQUESTS)
    with TritonAnnotator(url=triton_server.grpc_url) as triton:
        remote = triton.annotate(REQUESTS)
        assert triton.model_info.revision == resolved.revision
    for a, b in zip(local, remote, strict=True):
        assert a.caption == b.caption
        assert [x.text for x in a.answers] == [x.text for x in b.answers]
        assert np.allclose([x.p_yes for x in a.answers[:2]], [x.p_yes for x in b.answers[:2]], atol=1e-5)
