"""The engines on a GPU (CUDA build of vLLM, bf16): skipped where torch sees no CUDA device (CI never has one).
Run on a GPU host with `pytest -m gpu`. Tolerances are bf16's: rankings and scores within 0.02, never exact floats."""

from __future__ import annotations

import random

import pytest

from schemas.settings import Settings
from tests.conftest import random_text, require_vllm
from workers.prompts import Pair, PromptBuilder

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    require_vllm()


def test_vllm_on_cuda_ranks_like_transformers_on_cuda(cuda, tiny_model_dir) -> None:
    from workers.engines.transformers_engine import TransformersEngine
    from workers.engines.vllm_engine import VllmEngine

    settings = Settings(model=str(tiny_model_dir), gpu_memory_utilization=0.3, vllm_enforce_eager=True)
    prompts = PromptBuilder.from_pretrained(str(tiny_model_dir), 1024)
    rng = random.Random(5)
    pairs = [Pair(random_text(rng, 2, 10), random_text(rng, 5, 400)) for _ in range(64)]
    ids = prompts.encode(pairs)
    vllm_engine = VllmEngine.load(settings, prompts)
    try:
        assert vllm_engine.device == "cuda"
        by_vllm = vllm_engine.score(ids)
        alone = [vllm_engine.score([x])[0] for x in ids[:4]]
    finally:
        vllm_engine.close()
    by_transformers = TransformersEngine.load(settings.model_copy(update={"device": "cuda"}), prompts).score(ids)
    assert by_vllm == pytest.approx(by_transformers, abs=0.02)
    assert by_vllm[:4] == pytest.approx(alone, abs=0.02)  # batch invariance, to bf16's precision
    best = max(range(len(ids)), key=lambda i: by_vllm[i])
    assert best in sorted(range(len(ids)), key=lambda i: -by_transformers[i])[:3]
