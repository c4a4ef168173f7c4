"""What every engine shares: prompts in as token ids (built by `workers.prompts`), P(yes) out, scheduled by the engine
itself. An engine is one scheduler: vLLM's own (continuous batching under a token budget, priority policy), or the
transformers engine's padded batcher (`workers.engines.batcher`). Engines know nothing of Celery or Redis; of prompts
they get token ids to score and, at load, the model's `workers.prompts.Prompts` (its family's card: how the model
loads; its length limit; where a document starts), never how a prompt is built.

Priority is the farm's one scale (`schemas.chunks`): a job's 0..9, INTERACTIVE_PRIORITY (10) and up for interactive
calls (by their tenant's share); higher is served first. An engine converts it at its own boundary (vLLM: lower runs
first, so it gets -priority).
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Protocol

from schemas import metrics

ENGINE_THREAD = "rf-engine"  # the kernel's name of the thread that runs an engine's passes (15 bytes at most)
PR_SET_NAME = 15  # linux/prctl.h


def name_engine_thread() -> None:
    """Give the calling thread (the one that runs forward passes) a name the kernel shows (Linux; a no-op elsewhere).
    The compute threads it starts (torch's OpenMP pool) inherit it, so per-thread CPU counters
    (/proc/PID/task/TID/stat) tell the engine's CPU time from the rest of the worker's: `rerankfarm bench` reads
    them."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(PR_SET_NAME, ENGINE_THREAD.encode(), 0, 0, 0)


class Cancelled(Exception):
    """The submission was cancelled before all its prompts were scored."""


@dataclass(eq=False)
class Scoring:
    """One submission: its prompts, their scores in order (`future`), and `cancel()`, safe from any thread: prompts
    not scored yet never reach the engine, or are aborted in it. The engine's one thread fills the scores in
    (`fill`); the last one settles the future."""

    prompts: Sequence[Sequence[int]] = field(repr=False)
    priority: int
    future: Future[list[float]] = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    scores: list[float] = field(init=False, repr=False)
    left: int = field(init=False)  # prompts not scored yet

    def __post_init__(self) -> None:
        self.scores = [math.nan] * len(self.prompts)
        self.left = len(self.prompts)
        if not self.prompts:
            self.future.set_result([])

    def fill(self, index: int, score: float) -> None:
        self.scores[index] = score
        self.left -= 1
        if self.left == 0:
            settle(self.future, result=self.scores)

    def cancel(self) -> None:
        self.cancelled.set()
        settle(self.future, exception=Cancelled())


def settle(future: Future[list[float]], result: list[float] | None = None, exception: Exception | None = None) -> None:
    """Resolve the future unless it is already (a cancel and the last score can race: the first one wins)."""
    try:
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result or [])
    except InvalidStateError:
        pass


@dataclass
class EngineStats:
    """What an engine did, for the heartbeat and the benchmarks; `record` also moves the Prometheus metrics. A call is
    one forward pass: a padded batch (transformers) or a scheduler step (vLLM, counting the prompts it finished)."""

    batches: int = 0
    pairs: int = 0
    padded_tokens: int = 0
    real_tokens: int = 0
    engine_s: float = 0.0  # wall time in forward passes
    model: str = ""  # the served model's name, the metrics' label
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, pairs: int, real_tokens: int, padded_tokens: int, seconds: float) -> None:
        with self._lock:
            self.batches += 1
            self.pairs += pairs
            self.real_tokens += real_tokens
            self.padded_tokens += padded_tokens
            self.engine_s += seconds
        metrics.PAIRS_SCORED.labels(self.model).inc(pairs)
        metrics.TOKENS_SCORED.labels(self.model).inc(real_tokens)
        metrics.BATCH_PAIRS.labels(self.model).observe(pairs)
        metrics.BATCH_TOKENS.labels(self.model).observe(padded_tokens)
        metrics.ENGINE_SECONDS.labels(self.model).observe(seconds)


class Engine(Protocol):
    """Loaded once per worker process, before it consumes; `submit` may be called from any thread."""

    name: str
    device: str
    stats: EngineStats

    def submit(self, prompts: Sequence[Sequence[int]], priority: int = 0) -> Scoring:
        """Queue prompts for scoring at `priority` (higher first); the Scoring's future gives P(yes) for each, the
        same value whatever else the engine scores beside it."""
        ...

    def health(self) -> str | None:
        """None while the engine can score; else why it cannot (its engine process died, say)."""
        ...

    def close(self) -> None:
        """Free the engine (its thread, its processes, its memory); submissions after this fail."""
        ...
