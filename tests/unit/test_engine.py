"""The transformers engine against an independent reference (the model card's rule with the full LM head)."""

from __future__ import annotations

import random

import pytest

from schemas.errors import EngineLoadError
from schemas.prompt import DEFAULT_INSTRUCTION, PREFIX, SUFFIX
from schemas.settings import Settings
from tests.conftest import random_text
from workers.engines.base import Pair, load_engine


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return load_engine(Settings(model=str(tiny_model_dir), max_length=256))


def test_scores_equal_the_reference_and_spread_over_zero_one(engine, reference) -> None:
    rng = random.Random(7)
    pairs = [Pair(random_text(rng, 2, 10), random_text(rng, 1, 120), rng.choice([None, "Find w1"])) for _ in range(24)]
    scores = engine.score(engine.encode(pairs))
    expected = [reference.score(*p) for p in pairs]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert max(scores) - min(scores) > 0.2  # a random model with spread scores, so the check can tell pairs apart


def test_prompt_is_the_model_cards(engine) -> None:
    ids = engine.encode([Pair("w1 w2", "w3")])[0]
    prompt = PREFIX + f"<Instruct>: {DEFAULT_INSTRUCTION}\n<Query>: w1 w2\n<Document>: w3" + SUFFIX
    assert ids == engine.tokenizer(prompt).input_ids
    custom = engine.encode([Pair("w1", "w3", "Find w9")])[0]
    assert custom == engine.tokenizer(PREFIX + "<Instruct>: Find w9\n<Query>: w1\n<Document>: w3" + SUFFIX).input_ids


def test_long_documents_are_cut_from_their_end_to_max_length(engine, reference) -> None:
    words = [f"w{i % 500}" for i in range(1000)]
    ids = engine.encode([Pair("w1", " ".join(words))])[0]
    assert len(ids) == 256
    assert ids[-len(engine.suffix_ids) :] == engine.suffix_ids
    kept = (
        len(ids)
        - len(engine.prefix_ids)
        - len(engine.suffix_ids)
        - len(engine.tokenizer.tokenize(f"<Instruct>: {DEFAULT_INSTRUCTION}\n<Query>: w1\n<Document>:"))
    )
    score = engine.score([ids])[0]
    assert score == pytest.approx(reference.score("w1", " ".join(words[:kept])), abs=1e-5)


def test_missing_model_gives_advice_not_a_traceback(tmp_path) -> None:
    with pytest.raises(EngineLoadError) as err:
        load_engine(Settings(model=str(tmp_path / "nowhere"), engine="transformers"))
    assert "RERANK_MODEL" in err.value.message
