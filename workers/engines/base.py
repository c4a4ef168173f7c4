"""The engine interface and the choice of engine."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from typing import NamedTuple, Protocol

from schemas.chunks import PairOptions
from schemas.errors import EngineLoadError
from schemas.settings import Settings

logger = logging.getLogger(__name__)


class Pair(NamedTuple):
    query: str
    document: str
    instruction: str | None = None


class Window(NamedTuple):
    """One window of a long document: its prompt and the document tokens [start, end) it holds."""

    token_ids: list[int]
    start: int
    end: int


class Engine(Protocol):
    """What the batcher and the tasks need from an engine. Implementations are loaded once per worker process and
    called from one thread only (vLLM's LLM is not thread-safe)."""

    name: str
    device: str

    def encode(self, pairs: Sequence[Pair], options: PairOptions | None = None) -> list[list[int]]:
        """Prompt token ids for each pair, cut to the max length (or InvalidInput when `options.truncate` is
        false and a prompt is too long). Thread-safe."""
        ...

    def windows(self, pair: Pair, options: PairOptions) -> list[Window]:
        """Prompts for overlapping windows of a long document; one window (the `encode` prompt) when it fits."""
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
