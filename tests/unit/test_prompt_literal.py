"""The prompt is the Qwen3-Reranker model card's, byte for byte. The literal below is copied from the model card
(QwenLM/Qwen3-Embedding, "Qwen3-Reranker" usage), not built from the code under test: a change to the system
line, the tags, the newlines or the empty think block makes this test fail."""

from __future__ import annotations

from workers.models.qwen3_reranker import DEFAULT_INSTRUCTION, PREFIX, SUFFIX, format_body
from workers.prompts import Pair

MODEL_CARD_PROMPT = (
    "<|im_start|>system\n"
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n"
    "<Instruct>: Given a web search query, retrieve relevant passages that answer the query\n"
    "<Query>: w1 w2\n"
    "<Document>: w3 w4 w5"
    "<|im_end|>\n"
    "<|im_start|>assistant\n"
    "<think>\n\n</think>\n\n"
)


def test_the_prompt_text_is_the_model_cards_byte_for_byte() -> None:
    built = PREFIX + format_body("w1 w2", "w3 w4 w5") + SUFFIX
    assert built.encode() == MODEL_CARD_PROMPT.encode()
    assert DEFAULT_INSTRUCTION == "Given a web search query, retrieve relevant passages that answer the query"
    custom = PREFIX + format_body("w1 w2", "w3 w4 w5", "Find w9") + SUFFIX
    assert custom == MODEL_CARD_PROMPT.replace(f"<Instruct>: {DEFAULT_INSTRUCTION}", "<Instruct>: Find w9")


def test_the_token_ids_every_engine_scores_are_the_tokenized_model_card_prompt(prompts) -> None:
    """Both engines score exactly what `PromptBuilder.encode` gives (they take token ids and nothing else)."""
    expected = prompts.tokenizer(MODEL_CARD_PROMPT, add_special_tokens=False).input_ids
    assert prompts.encode([Pair("w1 w2", "w3 w4 w5")])[0] == expected
    assert prompts.tokenizer.unk_token_id not in expected  # every part of the card's text is a known token
    assert prompts.encode([Pair("w1 w2", "w3 w4 w5")])[0][-len(prompts.suffix_ids) :] == prompts.suffix_ids
