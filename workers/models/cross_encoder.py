"""Classic cross-encoders (BERT, XLM-RoBERTa and kin: bge-reranker-v2-m3, ms-marco MiniLM): everything the farm knows
about the family, in one place.

A sequence-classification model with one output: the tokenizer joins query and document as a pair
(`[CLS] query [SEP] document [SEP]`, `<s> query </s></s> document </s>`), and the score is the sigmoid of the single
logit. No instruction: a request's `instruction` is not part of the input (these models were not trained with one).
Models whose pair has two segments (BERT: `type_vocab_size` 2) mark the document's tokens with token type 1; the
document starts after the first separator (`document_start`). Both engines score the token ids `workers.prompts`
builds: transformers gives the model token types 1 from that start on; vLLM loads the model as it is (no overrides)
and takes the document's start per prompt (`VLLM_TOKEN_TYPES_KEY`), as its own score API does.
"""

from __future__ import annotations

from collections.abc import Sequence

VLLM_HF_OVERRIDES: dict[str, object] = {}
VLLM_TOKEN_TYPES_KEY = "compressed_token_type_ids"  # PoolingParams.extra_kwargs: where token type 1 starts


def document_start(ids: Sequence[int], sep_id: int) -> int:
    """The position of the document's first token: after the first separator (the query's end)."""
    try:
        return list(ids).index(sep_id) + 1
    except ValueError:
        return len(ids)
