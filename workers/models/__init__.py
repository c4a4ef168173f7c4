"""The reranker models a worker can hold, by family: each module is one family's card (its input, the output its
score is read from, how vLLM loads it), used by both engines and by nothing else.

- `qwen3_reranker`: the Qwen3-Reranker causal LMs (0.6B, 4B, 8B), P("yes") after the model card's prompt;
- `cross_encoder`: classic sequence-classification cross-encoders, the sigmoid of their one logit.
"""

from __future__ import annotations

from typing import Any, Literal

Family = Literal["qwen3-reranker", "cross-encoder"]
FAMILIES: tuple[Family, ...] = ("qwen3-reranker", "cross-encoder")


def family_of(config: Any) -> Family:
    """A checkpoint's family from its config: Qwen3 causal LMs are Qwen3-Rerankers; a sequence classifier with one
    label (of any other architecture) is a cross-encoder."""
    architectures = getattr(config, "architectures", None) or []
    if getattr(config, "model_type", "") != "qwen3" and any(
        a.endswith("ForSequenceClassification") for a in architectures
    ):
        return "cross-encoder"
    return "qwen3-reranker"
