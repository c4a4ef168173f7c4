"""Qwen3-Reranker (0.6B, 4B, 8B): everything the farm knows about the model, in one place.

A Qwen3 causal LM used as a cross-encoder. The prompt is the model card's (QwenLM/Qwen3-Embedding): a system turn,
then a user turn "<Instruct>: ...\\n<Query>: ...\\n<Document>: ...", then an empty thinking block; the score is
P("yes") = softmax over the "no" and "yes" logits of the next token. Both engines score the token ids that
`workers.prompts` builds from these texts:
- transformers keeps the two rows of the LM head for `LABELS` (`label_ids`) and takes the softmax;
- vLLM loads the LM as a one-logit classifier (`VLLM_HF_OVERRIDES`): its head is W[yes] - W[no], and the sigmoid of
  that logit is the same 2-way softmax, without the 151k-token vocabulary.
Pure Python, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping

from schemas.errors import EngineLoadError

PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"

# The tokens whose logits give the score, in the order of the 2-way softmax: P(yes) is its second entry.
LABELS = ("no", "yes")

VLLM_HF_OVERRIDES = {
    "architectures": ["Qwen3ForSequenceClassification"],
    "classifier_from_token": list(LABELS),
    "is_original_qwen3_reranker": True,
}


def format_body(query: str, document: str, instruction: str | None = None) -> str:
    """The user turn between PREFIX and SUFFIX; truncation cuts this text from its end."""
    return f"<Instruct>: {instruction or DEFAULT_INSTRUCTION}\n<Query>: {query}\n<Document>: {document}"


def label_ids(vocab: Mapping[str, int]) -> tuple[int, int]:
    """The token ids of ("no", "yes") in the tokenizer's vocabulary; EngineLoadError when it lacks them."""
    missing = [t for t in LABELS if t not in vocab]
    if missing:
        raise EngineLoadError(f"the tokenizer has no token for {missing}: this is not a Qwen3-Reranker checkpoint")
    return vocab[LABELS[0]], vocab[LABELS[1]]
