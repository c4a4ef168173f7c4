"""The cross-encoder family on the tiny random BERT cross-encoder: its inputs are the tokenizer's pair encoding,
and both engines give the model card's score (the sigmoid of the one logit, token types included) for every pair,
alone or in any batch."""

from __future__ import annotations

import random

import pytest

from schemas.chunks import PairOptions
from schemas.errors import InvalidInput
from schemas.settings import Settings
from tests.conftest import VLLM_TEST_ENV, random_text, require_vllm
from workers.engines.transformers_engine import TransformersEngine
from workers.models import family_of, qwen3_reranker
from workers.prompts import Pair, PairPromptBuilder, load_prompts

MAX_LENGTH = 128


@pytest.fixture(scope="module")
def ce_prompts(tiny_cross_encoder_dir) -> PairPromptBuilder:
    built = load_prompts(Settings(model=str(tiny_cross_encoder_dir), max_length=MAX_LENGTH))
    assert isinstance(built, PairPromptBuilder)
    return built


@pytest.fixture(scope="module")
def pairs() -> list[Pair]:
    rng = random.Random(3)
    # up to 113 tokens with the specials: every pair fits MAX_LENGTH whole, as the reference scores it
    return [Pair(random_text(rng, 2, 10), random_text(rng, 1, 100), rng.choice([None, "ignored"])) for _ in range(30)]


def test_the_family_is_read_from_the_checkpoint(tiny_cross_encoder_dir, tiny_model_dir) -> None:
    from transformers import AutoConfig

    assert family_of(AutoConfig.from_pretrained(tiny_cross_encoder_dir)) == "cross-encoder"
    assert family_of(AutoConfig.from_pretrained(tiny_model_dir)) == "qwen3-reranker"
    forced = load_prompts(Settings(model=str(tiny_model_dir), model_family="qwen3-reranker"))
    assert forced.family == "qwen3-reranker"


def test_inputs_are_the_tokenizers_pair_encoding_cut_from_the_document(ce_prompts) -> None:
    tok = ce_prompts.tokenizer
    [ids] = ce_prompts.encode([Pair("w1 w2", "w3 w4 w5", "an instruction the family does not read")])
    assert ids == tok("w1 w2", "w3 w4 w5")["input_ids"]
    assert ce_prompts.document_start(ids) == 4  # [CLS] w1 w2 [SEP] | w3 ...
    long_doc = " ".join(f"w{i % 400}" for i in range(400))
    [cut] = ce_prompts.encode([Pair("w1 w2", long_doc)])
    assert len(cut) == MAX_LENGTH and cut[:4] == ids[:4] and cut[4] == tok.convert_tokens_to_ids("w0")
    [left] = ce_prompts.encode([Pair("w1 w2", long_doc)], PairOptions(truncate_left=True))
    assert len(left) == MAX_LENGTH and left[-2] == tok.convert_tokens_to_ids("w399")  # the end is kept
    with pytest.raises(InvalidInput):
        ce_prompts.encode([Pair("w1", long_doc)], PairOptions(truncate=False))


def test_windows_cover_a_long_document(ce_prompts) -> None:
    doc = " ".join(f"w{i}" for i in range(300))
    windows = ce_prompts.windows(Pair("w1", doc), PairOptions(windows=True, window_tokens=100, window_overlap=20))
    assert [(w.start, w.end) for w in windows] == [(0, 100), (80, 180), (160, 260), (240, 300)]
    assert all(len(w.token_ids) <= MAX_LENGTH for w in windows)


def test_transformers_scores_equal_the_model_card_alone_and_in_batches(
    ce_prompts, pairs, tiny_cross_encoder_dir, cross_encoder_reference
) -> None:
    engine = TransformersEngine.load(Settings(model=str(tiny_cross_encoder_dir)), ce_prompts)
    try:
        ids = ce_prompts.encode(pairs)
        batched = engine.score(ids)
        alone = [engine.score([x])[0] for x in ids[:8]]
    finally:
        engine.close()
    expected = [cross_encoder_reference.score(p.query, p.document) for p in pairs]
    assert max(abs(a - b) for a, b in zip(batched, expected, strict=True)) < 1e-5
    assert max(abs(a - b) for a, b in zip(alone, expected[:8], strict=True)) < 1e-5
    assert max(expected) - min(expected) > 0.2  # the scores spread: a wrong rule cannot pass by accident


def test_vllm_scores_equal_the_model_card(ce_prompts, pairs, tiny_cross_encoder_dir, cross_encoder_reference) -> None:
    require_vllm()
    from workers.engines.vllm_engine import VllmEngine

    env = {k.removeprefix("RERANK_").lower(): v for k, v in VLLM_TEST_ENV.items()}
    engine = VllmEngine.load(Settings(model=str(tiny_cross_encoder_dir), engine="vllm", **env), ce_prompts)
    try:
        ids = ce_prompts.encode(pairs)
        by_vllm = engine.submit(ids, 5).future.result(120)
    finally:
        engine.close()
    expected = [cross_encoder_reference.score(p.query, p.document) for p in pairs]
    assert max(abs(a - b) for a, b in zip(by_vllm, expected, strict=True)) < 1e-4


@pytest.mark.parametrize(
    ("family", "causal", "prefix", "overrides", "instruction"),
    [
        ("qwen3-reranker", True, True, qwen3_reranker.VLLM_HF_OVERRIDES, qwen3_reranker.DEFAULT_INSTRUCTION),
        ("cross-encoder", False, False, {}, None),
    ],
)
def test_each_familys_card_says_how_the_engines_load_it(family, causal, prefix, overrides, instruction) -> None:
    """The engines read the family's card instead of comparing family names: vLLM's arguments follow it."""
    from workers.engines.vllm_engine import engine_kwargs
    from workers.models import card

    family_card = card(family)
    assert (family_card.causal_lm, family_card.default_instruction) == (causal, instruction)
    kwargs = engine_kwargs(Settings(), 512, True, family)
    assert kwargs["hf_overrides"] == dict(overrides) and kwargs["enable_prefix_caching"] is prefix
