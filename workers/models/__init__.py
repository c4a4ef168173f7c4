"""The reranker models a worker can hold, by family: each module is one family's card (its input, the output its
score is read from, how vLLM loads it), used by both engines and by nothing else.

- `qwen3_reranker`: the Qwen3-Reranker causal LMs (0.6B, 4B, 8B), P("yes") after the model card's prompt;
- `cross_encoder`: classic sequence-classification cross-encoders, the sigmoid of their one logit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Family = Literal["qwen3-reranker", "cross-encoder"]
FAMILIES: tuple[Family, ...] = ("qwen3-reranker", "cross-encoder")


@dataclass(frozen=True)
class FamilyCard:
    """What the engines and the worker need of a family, so that none of them compares family names: how
    transformers loads it, how vLLM loads it, and the instruction its pairs get by default."""

    family: Family
    causal_lm: bool  # transformers: a causal LM scored from its LM head's label rows; else a sequence classifier
    vllm_hf_overrides: Mapping[str, object]
    prefix_caching: bool  # vLLM may share prompt prefixes (a causal LM's KV cache; an encoder keeps none)
    default_instruction: str | None  # None: the model takes no instruction


def card(family: Family) -> FamilyCard:
    return _CARDS[family]


def family_of(config: Any) -> Family:
    """A checkpoint's family from its config: Qwen3 causal LMs are Qwen3-Rerankers; a sequence classifier with one
    label (of any other architecture) is a cross-encoder."""
    architectures = getattr(config, "architectures", None) or []
    if getattr(config, "model_type", "") != "qwen3" and any(
        a.endswith("ForSequenceClassification") for a in architectures
    ):
        return "cross-encoder"
    return "qwen3-reranker"


from workers.models import cross_encoder, qwen3_reranker  # noqa: E402  # the cards, after what they are made of

_CARDS: dict[Family, FamilyCard] = {
    "qwen3-reranker": FamilyCard(
        "qwen3-reranker", True, qwen3_reranker.VLLM_HF_OVERRIDES, True, qwen3_reranker.DEFAULT_INSTRUCTION
    ),
    "cross-encoder": FamilyCard("cross-encoder", False, cross_encoder.VLLM_HF_OVERRIDES, False, None),
}
