"""The prompt builder and the transformers engine against an independent reference (the model card's rule with the
full LM head)."""

from __future__ import annotations

import random

import pytest

from schemas.chunks import PairOptions
from schemas.errors import EngineLoadError
from schemas.settings import Settings
from tests.conftest import random_text
from workers.engines.factory import load_engine
from workers.engines.transformers_engine import TransformersEngine
from workers.models.qwen3_reranker import DEFAULT_INSTRUCTION, PREFIX, SUFFIX
from workers.prompts import Pair, PromptBuilder

MAX_LENGTH = 256  # the `prompts` fixture builds at this length


@pytest.fixture(scope="module")
def engine(tiny_model_dir, prompts) -> TransformersEngine:
    return TransformersEngine.load(Settings(model=str(tiny_model_dir)), prompts)


def test_scores_equal_the_reference_and_spread_over_zero_one(engine, prompts, reference) -> None:
    rng = random.Random(7)
    pairs = [Pair(random_text(rng, 2, 10), random_text(rng, 1, 120), rng.choice([None, "Find w1"])) for _ in range(24)]
    scores = engine.score(prompts.encode(pairs))
    expected = [reference.score(*p) for p in pairs]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert max(scores) - min(scores) > 0.2  # a random model with spread scores, so the check can tell pairs apart


def test_prompt_is_the_model_cards(prompts) -> None:
    ids = prompts.encode([Pair("w1 w2", "w3")])[0]
    prompt = PREFIX + f"<Instruct>: {DEFAULT_INSTRUCTION}\n<Query>: w1 w2\n<Document>: w3" + SUFFIX
    assert ids == prompts.tokenizer(prompt).input_ids
    custom = prompts.encode([Pair("w1", "w3", "Find w9")])[0]
    assert custom == prompts.tokenizer(PREFIX + "<Instruct>: Find w9\n<Query>: w1\n<Document>: w3" + SUFFIX).input_ids


def test_long_documents_are_cut_from_their_end_to_max_length(engine, prompts, reference) -> None:
    words = [f"w{i % 500}" for i in range(1000)]
    ids = prompts.encode([Pair("w1", " ".join(words))])[0]
    assert len(ids) == 256
    assert ids[-len(prompts.suffix_ids) :] == prompts.suffix_ids
    kept = (
        len(ids)
        - len(prompts.prefix_ids)
        - len(prompts.suffix_ids)
        - len(prompts.tokenizer.tokenize(f"<Instruct>: {DEFAULT_INSTRUCTION}\n<Query>: w1\n<Document>:"))
    )
    score = engine.score([ids])[0]
    assert score == pytest.approx(reference.score("w1", " ".join(words[:kept])), abs=1e-5)


def test_truncate_left_keeps_the_documents_end(engine, prompts, reference) -> None:
    """TEI's `truncation_direction: Left` and vLLM's `truncation_side: left`: the document loses its start."""
    words = [f"w{i % 500}" for i in range(1000)]
    ids = prompts.encode([Pair("w1", " ".join(words))], PairOptions(truncate_left=True))[0]
    assert len(ids) == 256
    assert ids[-len(prompts.suffix_ids) :] == prompts.suffix_ids
    head = prompts.tokenizer.tokenize(f"<Instruct>: {DEFAULT_INSTRUCTION}\n<Query>: w1\n<Document>:")
    kept = len(ids) - len(prompts.prefix_ids) - len(prompts.suffix_ids) - len(head)
    assert engine.score([ids])[0] == pytest.approx(reference.score("w1", " ".join(words[-kept:])), abs=1e-5)
    right = prompts.encode([Pair("w1", " ".join(words))])[0]
    assert right != ids and right[: len(ids) - 50] != ids[: len(ids) - 50]


def test_missing_model_gives_advice_not_a_traceback(tmp_path, prompts) -> None:
    with pytest.raises(EngineLoadError) as err:
        load_engine(Settings(model=str(tmp_path / "nowhere"), engine="transformers"), prompts)
    assert "RERANK_MODEL" in err.value.message
    with pytest.raises(EngineLoadError) as err:
        PromptBuilder.from_pretrained(str(tmp_path / "nowhere"), 256)
    assert "RERANK_MODEL" in err.value.message


def test_max_length_is_capped_to_the_models_positions(tiny_model_dir) -> None:
    assert PromptBuilder.from_pretrained(str(tiny_model_dir), 100_000).max_length == 4096
