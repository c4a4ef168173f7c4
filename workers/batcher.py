"""Gathers the pairs of every chunk a worker holds in flight into engine calls under a padded-token budget.

Celery hands the worker several chunks at once (threads pool, prefetch); each task thread tokenizes its chunk and
`submit`s it here, then waits on a future. One engine thread forms every engine call:

- it serves the most urgent priority that has work (interactive above bulk), except that after
  `starvation_limit` calls in a row while less urgent work waits, it serves the next level once;
- within a level, it looks at a window of the oldest pending pairs (`window_batches` budgets' worth), sorts them by
  length so that a call holds pairs of similar length (less padding), and runs the call that holds the oldest
  pair. Pairs of several chunks and jobs share calls, the oldest work is always served, and chunks finish roughly
  in arrival order, which frees Celery slots for new (and interactive) chunks steadily.

Scores go back to each chunk's future. The batcher knows nothing of Celery or Redis.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from schemas import metrics
from workers.engines.base import Engine

logger = logging.getLogger(__name__)


class Cancelled(Exception):
    """The submission was dropped before its pairs reached the engine."""


@dataclass(eq=False)
class _Group:
    """One submission (one chunk): its token ids, the scores filled in so far and the future to resolve."""

    token_ids: Sequence[Sequence[int]]
    priority: int
    is_cancelled: Callable[[], bool] | None
    future: Future[list[float]] = field(default_factory=Future)
    scores: list[float | None] = field(default_factory=list)
    left: int = 0
    checked: bool = False

    def __post_init__(self) -> None:
        self.scores = [None] * len(self.token_ids)
        self.left = len(self.token_ids)


_Item = tuple[_Group, int]


@dataclass
class BatchStats:
    batches: int = 0
    pairs: int = 0
    padded_tokens: int = 0
    real_tokens: int = 0
    engine_s: float = 0.0


def plan_batches(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped into batches: longest first, each batch's padded size (longest x count) within the budget.
    An item longer than the budget goes alone."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        if current and width * (len(current) + 1) > max_batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class Batcher:
    def __init__(
        self, engine: Engine, max_batch_tokens: int, window_batches: int = 8, starvation_limit: int = 8
    ) -> None:
        self.engine = engine
        self.max_batch_tokens = max_batch_tokens
        self.window_tokens = max_batch_tokens * window_batches
        self.starvation_limit = starvation_limit
        self.stats = BatchStats()
        self._lock = threading.Condition()
        self._pending: dict[int, deque[_Item]] = {}  # priority (higher first) -> pairs in arrival order
        self._streak = 0  # calls in a row at the top level while a lower level waited
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="engine-batcher", daemon=True)
        self._thread.start()

    def submit(
        self, token_ids: Sequence[Sequence[int]], priority: int = 0, is_cancelled: Callable[[], bool] | None = None
    ) -> Future[list[float]]:
        """Queue prompts for scoring; the future gives their scores in order. `is_cancelled` is asked once, from the
        engine thread, before the first of these pairs is scored: if it says True, none are, and the future raises
        Cancelled."""
        group = _Group(token_ids, priority, is_cancelled)
        if not token_ids:
            group.future.set_result([])
            return group.future
        with self._lock:
            if self._stopped:
                raise RuntimeError("batcher is stopped")
            self._pending.setdefault(priority, deque()).extend((group, i) for i in range(len(token_ids)))
            self._lock.notify()
        return group.future

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify()
        self._thread.join(timeout)

    def _level(self) -> int | None:
        levels = sorted((p for p, q in self._pending.items() if q), reverse=True)
        if not levels:
            return None
        if len(levels) == 1:
            self._streak = 0
            return levels[0]
        if self._streak >= self.starvation_limit:
            self._streak = 0
            return levels[1]
        self._streak += 1
        return levels[0]

    def _window(self, queue: deque[_Item]) -> list[_Item]:
        """Pop the oldest live pairs, up to the window's token size (at least one)."""
        window: list[_Item] = []
        tokens = 0
        while queue:
            group, i = queue[0]
            if not group.checked:
                group.checked = True
                if group.is_cancelled is not None and _safe_call(group.is_cancelled):
                    group.future.set_exception(Cancelled())
            if group.future.done():
                queue.popleft()
                continue
            size = len(group.token_ids[i])
            if window and tokens + size > self.window_tokens:
                break
            window.append(queue.popleft())
            tokens += size
        return window

    def _next_batch(self) -> list[_Item] | None:
        """Under the lock: the next engine call, or None when nothing is pending."""
        while (level := self._level()) is not None:
            queue = self._pending[level]
            window = self._window(queue)
            if not window:
                continue
            plans = plan_batches([len(g.token_ids[i]) for g, i in window], self.max_batch_tokens)
            chosen = next(p for p in plans if 0 in p)  # the call that serves the oldest pair
            picked = set(chosen)
            queue.extendleft(reversed([item for j, item in enumerate(window) if j not in picked]))
            return [window[j] for j in chosen]
        return None

    def _run(self) -> None:
        while True:
            with self._lock:
                batch = self._next_batch()
                while batch is None and not self._stopped:
                    self._lock.wait()
                    batch = self._next_batch()
                if batch is None:
                    return
            self._score(batch)

    def _score(self, batch: list[_Item]) -> None:
        prompts = [g.token_ids[i] for g, i in batch]
        started = time.perf_counter()
        try:
            scores = self.engine.score(prompts)
        except Exception as exc:  # the engine's failure belongs to every submission in this batch
            logger.warning("engine call of %d pairs failed: %r", len(prompts), exc)
            for g, _ in batch:
                if not g.future.done():
                    g.future.set_exception(exc)
            return
        elapsed = time.perf_counter() - started
        longest = max(len(p) for p in prompts)
        self.stats.batches += 1
        self.stats.pairs += len(prompts)
        self.stats.padded_tokens += longest * len(prompts)
        self.stats.real_tokens += sum(len(p) for p in prompts)
        self.stats.engine_s += elapsed
        metrics.PAIRS_SCORED.inc(len(prompts))
        metrics.TOKENS_SCORED.inc(sum(len(p) for p in prompts))
        metrics.BATCH_PAIRS.observe(len(prompts))
        metrics.BATCH_TOKENS.observe(longest * len(prompts))
        metrics.ENGINE_SECONDS.observe(elapsed)
        logger.debug("scored batch: pairs=%d longest=%d engine_ms=%.1f", len(prompts), longest, elapsed * 1e3)
        for (g, i), s in zip(batch, scores, strict=True):
            g.scores[i] = s
            g.left -= 1
            if g.left == 0 and not g.future.done():
                g.future.set_result([float(x) for x in g.scores if x is not None])


def _safe_call(check: Callable[[], bool]) -> bool:
    try:
        return check()
    except Exception:
        logger.warning("cancellation check failed; scoring anyway", exc_info=True)
        return False
