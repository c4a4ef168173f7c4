"""Settings that decide names: a model's public name is part of its queues' names."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from schemas.settings import Settings


@pytest.mark.parametrize(
    ("model", "served"),
    [("Qwen/Qwen3-Reranker-0.6B", "qwen3-reranker-0.6b"), ("/models/bge-reranker-v2-m3/", "bge-reranker-v2-m3")],
)
def test_the_public_name_is_the_models_last_part_lowercased(model: str, served: str) -> None:
    assert Settings(model=model).served_name == served


def test_a_model_whose_name_cannot_name_queues_asks_for_a_public_name() -> None:
    with pytest.raises(ValidationError, match="set RERANK_MODEL_NAME"):
        Settings(model="/models/my reranker:v2")  # ':' is kombu's priority separator in list names
    assert Settings(model="/models/my reranker:v2", model_name="my-reranker").served_name == "my-reranker"
    with pytest.raises(ValidationError):
        Settings(model="m", model_name="my reranker")


def test_the_default_model_of_requests_is_the_workers_public_name() -> None:
    """A request that names no model goes to RERANK_MODEL_NAME's queues, not to a name derived from the path (which
    kombu would split on ':')."""
    settings = Settings(model="/models/my reranker:v2", model_name="my-reranker")
    assert settings.default_served == "my-reranker"
    assert Settings(model="Qwen/Qwen3-Reranker-0.6B").default_served == "qwen3-reranker-0.6b"
    assert Settings(model="m", model_name="a", default_model="b").default_served == "b"
