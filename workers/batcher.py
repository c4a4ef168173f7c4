"""Gathers the pairs of every chunk a worker holds in flight into engine calls, the way the engine wants to be fed.

Celery hands the worker several chunks at once (threads pool, prefetch); each task thread tokenizes its chunk and
`submit`s it here, then waits on the submission's future. Feeder threads (`engine.feed.calls_in_flight` of them)
form every engine call:

- a call serves the most urgent priority that has work (interactive above bulk), except that after
  `starvation_limit` calls in a row while less urgent work waits, it serves the next level once;
- within a level, a padded engine (transformers) gets the call, among a window of the oldest pending pairs
  (`window_batches` budgets' worth) sorted by length, that holds the oldest pair: similar lengths, little padding;
  a packed engine (vLLM) gets the oldest pairs up to its token budget, since padding costs it nothing;
- with more than one call in flight, the next call waits inside the engine while one runs (vLLM schedules both).

Pairs of several chunks and jobs share calls, the oldest work is always served, and chunks finish roughly in
arrival order, which frees Celery slots for new (and interactive) chunks steadily. A cancelled submission is a flag
that the task thread sets: its pending pairs never reach the engine, and an engine that queues work aborts those it
holds. The batcher knows nothing of Celery or Redis, and makes no call that can block on them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

from schemas import metrics
from workers.engines.base import Engine, Feed

logger = logging.getLogger(__name__)


class Cancelled(Exception):
    """The submission was dropped before its pairs reached the engine."""


@dataclass(eq=False)
class Submission:
    """One submitted chunk: its token ids, the scores filled in so far and the future to resolve."""

    token_ids: Sequence[Sequence[int]]
    priority: int
    future: Future[list[float]] = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    scores: list[float | None] = field(default_factory=list)
    left: int = 0

    def __post_init__(self) -> None:
        self.scores = [None] * len(self.token_ids)
        self.left = len(self.token_ids)

    def cancel(self) -> None:
        """Drop the pairs not scored yet; the future raises Cancelled. Only sets flags: safe from any thread."""
        self.cancelled.set()
        _settle(self.future, exception=Cancelled())


_Item = tuple[Submission, int]


@dataclass
class BatchStats:
    batches: int = 0
    pairs: int = 0
    padded_tokens: int = 0
    real_tokens: int = 0
    engine_s: float = 0.0  # wall time with at least one engine call in progress (calls in flight overlap)


def plan_batches(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped into padded batches: longest first, each batch's padded size (longest x count) within the
    budget. An item longer than the budget goes alone."""
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
        self, engine: Engine, window_batches: int = 8, starvation_limit: int = 8, express_level: int | None = None
    ) -> None:
        self.engine = engine
        self.feed: Feed = engine.feed
        self.window_tokens = self.feed.max_batch_tokens * (window_batches if self.feed.padded else 1)
        self.starvation_limit = starvation_limit
        self.stats = BatchStats()
        self._lock = threading.Condition()
        self._pending: dict[int, deque[_Item]] = {}  # priority (higher first) -> pairs in arrival order
        self._streak = 0  # calls in a row at the top level while a lower level waited
        self._stopped = False
        self._calls = 0  # engine calls in progress
        self._busy_since = 0.0
        self._threads = [
            threading.Thread(target=self._run, args=(False,), name=f"engine-feeder-{n}", daemon=True)
            for n in range(self.feed.calls_in_flight)
        ]
        # The express feeder: an extra call for pairs at express_level or above, when the engine takes one.
        self.express_level = express_level if self.feed.express else None
        if self.express_level is not None:
            self._threads.append(threading.Thread(target=self._run, args=(True,), name="engine-express", daemon=True))
        for thread in self._threads:
            thread.start()

    def submit(self, token_ids: Sequence[Sequence[int]], priority: int = 0) -> Submission:
        """Queue prompts for scoring; the submission's future gives their scores in order."""
        submission = Submission(token_ids, priority)
        if not token_ids:
            submission.future.set_result([])
            return submission
        with self._lock:
            if self._stopped:
                raise RuntimeError("batcher is stopped")
            self._pending.setdefault(priority, deque()).extend((submission, i) for i in range(len(token_ids)))
            self._lock.notify_all()  # the express feeder only takes top-level pairs: wake every feeder
        return submission

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        for thread in self._threads:
            thread.join(timeout)

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
            submission, i = queue[0]
            if submission.future.done():  # cancelled (or failed): its pairs never reach the engine
                queue.popleft()
                continue
            size = len(submission.token_ids[i])
            if window and tokens + size > self.window_tokens:
                break
            window.append(queue.popleft())
            tokens += size
        return window

    def _express_level(self) -> int | None:
        levels = [p for p, q in self._pending.items() if q and p >= (self.express_level or 0)]
        return max(levels) if levels else None

    def _next_batch(self, express: bool = False) -> tuple[int, list[_Item]] | None:
        """Under the lock: the next engine call and its priority, or None when nothing is pending (for the express
        feeder: nothing at its levels)."""
        while (level := self._express_level() if express else self._level()) is not None:
            queue = self._pending[level]
            window = self._window(queue)
            if not window:
                continue
            if not self.feed.padded:
                return level, window
            plans = plan_batches([len(s.token_ids[i]) for s, i in window], self.feed.max_batch_tokens)
            chosen = next(p for p in plans if 0 in p)  # the call that serves the oldest pair
            picked = set(chosen)
            queue.extendleft(reversed([item for j, item in enumerate(window) if j not in picked]))
            return level, [window[j] for j in chosen]
        return None

    def _run(self, express: bool) -> None:
        while True:
            with self._lock:
                planned = self._next_batch(express)
                while planned is None and not self._stopped:
                    self._lock.wait()
                    planned = self._next_batch(express)
                if planned is None:
                    return
            self._score(*planned)

    def _busy(self, delta: int) -> None:
        """Under the lock: count a call in or out, adding to the engine's busy time when none is left."""
        now = time.perf_counter()
        if self._calls == 0 and delta > 0:
            self._busy_since = now
        self._calls += delta
        if self._calls == 0:
            self.stats.engine_s += now - self._busy_since

    def _score(self, priority: int, batch: list[_Item]) -> None:
        prompts = [s.token_ids[i] for s, i in batch]
        with self._lock:
            self._busy(+1)
        started = time.perf_counter()
        try:
            scores = self.engine.score(prompts, priority, [s.cancelled for s, _ in batch])
        except Exception as exc:  # the engine's failure belongs to every submission in this batch
            logger.warning("engine call of %d pairs failed: %r", len(prompts), exc)
            for s, _ in batch:
                _settle(s.future, exception=exc)
            return
        finally:
            with self._lock:
                self._busy(-1)
        elapsed = time.perf_counter() - started
        real = sum(len(p) for p in prompts)
        cost = max(len(p) for p in prompts) * len(prompts) if self.feed.padded else real
        with self._lock:
            self.stats.batches += 1
            self.stats.pairs += len(prompts)
            self.stats.padded_tokens += cost
            self.stats.real_tokens += real
        metrics.PAIRS_SCORED.inc(len(prompts))
        metrics.TOKENS_SCORED.inc(real)
        metrics.BATCH_PAIRS.observe(len(prompts))
        metrics.BATCH_TOKENS.observe(cost)
        metrics.ENGINE_SECONDS.observe(elapsed)
        logger.debug("scored batch: pairs=%d tokens=%d engine_ms=%.1f", len(prompts), cost, elapsed * 1e3)
        for (s, i), score in zip(batch, scores, strict=True):
            with self._lock:
                s.scores[i] = score
                s.left -= 1
                complete = s.left == 0
            if complete:
                _settle(s.future, result=[float(x) for x in s.scores if x is not None])


def _settle(future: Future[list[float]], result: list[float] | None = None, exception: Exception | None = None) -> None:
    """Resolve the future unless it is already (a cancel and the last score can race: the first one wins)."""
    try:
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result or [])
    except InvalidStateError:
        pass
