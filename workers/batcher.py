"""Gathers the pairs of every chunk a worker holds in flight into engine calls under a padded-token budget.

Celery hands the worker several chunks at once (threads pool, prefetch); each task thread tokenizes its chunk and
`submit`s it here, then waits on a future. One engine thread takes everything pending at the most urgent priority
as a round, sorts it by length (less padding), cuts it into batches whose padded size fits the budget, and runs
them; scores go back to each chunk's future. A round is a snapshot, so pairs that arrive later wait at most one
round at their priority, and a more urgent submission is taken before the round's next batch. The batcher knows
nothing of Celery or Redis.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

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

    def __post_init__(self) -> None:
        self.scores = [None] * len(self.token_ids)
        self.left = len(self.token_ids)


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
    def __init__(self, engine: Engine, max_batch_tokens: int) -> None:
        self.engine = engine
        self.max_batch_tokens = max_batch_tokens
        self.stats = BatchStats()
        self._lock = threading.Condition()
        self._pending: dict[int, list[_Group]] = defaultdict(list)  # priority (higher first) -> submissions
        self._rounds: dict[int, deque[list[tuple[_Group, int]]]] = defaultdict(deque)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="engine-batcher", daemon=True)
        self._thread.start()

    def submit(
        self, token_ids: Sequence[Sequence[int]], priority: int = 0, is_cancelled: Callable[[], bool] | None = None
    ) -> Future[list[float]]:
        """Queue prompts for scoring; the future gives their scores in order. `is_cancelled` is asked (from the engine
        thread) when a round is formed: if it says True, the pairs are dropped and the future raises Cancelled."""
        group = _Group(token_ids, priority, is_cancelled)
        if not token_ids:
            group.future.set_result([])
            return group.future
        with self._lock:
            if self._stopped:
                raise RuntimeError("batcher is stopped")
            self._pending[priority].append(group)
            self._lock.notify()
        return group.future

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify()
        self._thread.join(timeout)

    def _next_batch(self) -> list[tuple[_Group, int]] | None:
        """Under the lock: the next batch at the most urgent priority that has work, forming a round if needed."""
        levels = [p for p in set(self._pending) | set(self._rounds) if self._pending.get(p) or self._rounds.get(p)]
        if not levels:
            return None
        level = max(levels)
        if not self._rounds[level]:
            groups = self._pending.pop(level)
            items: list[tuple[_Group, int]] = []
            for group in groups:
                if group.is_cancelled is not None and _safe_call(group.is_cancelled):
                    group.future.set_exception(Cancelled())
                    continue
                items.extend((group, i) for i in range(len(group.token_ids)))
            lengths = [len(g.token_ids[i]) for g, i in items]
            self._rounds[level].extend([items[j] for j in b] for b in plan_batches(lengths, self.max_batch_tokens))
        return self._rounds[level].popleft() if self._rounds[level] else self._next_batch()

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

    def _score(self, batch: list[tuple[_Group, int]]) -> None:
        live = [(g, i) for g, i in batch if not g.future.done()]
        if not live:
            return
        prompts = [g.token_ids[i] for g, i in live]
        started = time.perf_counter()
        try:
            scores = self.engine.score(prompts)
        except Exception as exc:  # the engine's failure belongs to every submission in this batch
            logger.warning("engine call of %d pairs failed: %r", len(prompts), exc)
            for g, _ in live:
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
        logger.debug("scored batch: pairs=%d longest=%d engine_ms=%.1f", len(prompts), longest, elapsed * 1e3)
        for (g, i), s in zip(live, scores, strict=True):
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
