"""The engine interface and the choice of engine."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from typing import NamedTuple, Protocol

from schemas.errors import EngineLoadError
from schemas.settings import Settings

logger = logging.getLogger(__name__)


class Pair(NamedTuple):
    query: str
    document: str
    instruction: str | None = None


class Engine(Protocol):
    """What the batcher and the tasks need from an engine. Implementations are loaded once per worker process and
    called from one thread only (vLLM's LLM is not thread-safe)."""

    name: str
    device: str

    def encode(self, pairs: Sequence[Pair]) -> list[list[int]]:
        """Prompt token ids for each pair, already truncated to the engine's max length. Thread-safe."""
        ...

    def score(self, batch: Sequence[Sequence[int]]) -> list[float]:
        """P(yes) for each prompt; the same value whatever else is in the batch."""
        ...


def choose_engine(settings: Settings) -> str:
    """`auto` is transformers (on CUDA when present) until the vLLM engine lands."""
    return "transformers" if settings.engine == "auto" else settings.engine


def load_engine(settings: Settings) -> Engine:
    """Load the configured engine, or raise EngineLoadError with a message that says what to do."""
    kind = choose_engine(settings)
    logger.info("loading %s engine for model %s", kind, settings.model)
    if kind == "vllm":
        raise EngineLoadError("the vLLM engine is not available in this release yet; set RERANK_ENGINE=transformers")
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        raise EngineLoadError(
            "the transformers engine needs torch and transformers: install the worker extra, "
            "e.g. pip install 'rerankfarm[cpu]'"
        )
    from workers.engines.transformers_engine import TransformersEngine

    return TransformersEngine.load(settings)
