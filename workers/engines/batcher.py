"""The transformers engine's scheduler: gathers the prompts of every submission into padded forward passes.

A padded pass costs its longest prompt times its prompts, so prompts of similar length should share one. One thread
forms every pass:

- a pass serves the most urgent priority that has work (interactive above bulk), except that after
  `starvation_limit` passes in a row while less urgent work waits, it serves the next level once;
- within a level, among a look-ahead of the oldest pending prompts (`lookahead_batches` budgets' worth, the setting
  RERANK_BATCH_WINDOW) sorted by length, it takes the pass (`plan_batches`) that holds the oldest prompt: similar
  lengths, little padding, and the oldest work always served, so submissions finish roughly in arrival order.

Prompts of several chunks and jobs share passes. A cancelled submission's pending prompts never reach the model.
vLLM needs none of this: it packs tokens without padding and schedules by priority itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from workers.engines.base import EngineStats, Scoring, name_engine_thread, settle

logger = logging.getLogger(__name__)

Forward = Callable[[Sequence[Sequence[int]]], list[float]]


_Item = tuple[Scoring, int]  # a submission and one of its prompts


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
        self,
        forward: Forward,
        max_batch_tokens: int,
        stats: EngineStats,
        lookahead_batches: int = 8,
        starvation_limit: int = 8,
    ) -> None:
        self.forward = forward
        self.max_batch_tokens = max_batch_tokens
        self.lookahead_tokens = max_batch_tokens * lookahead_batches
        self.starvation_limit = starvation_limit
        self.stats = stats
        self._lock = threading.Condition()
        self._pending: dict[int, deque[_Item]] = {}  # priority (higher first) -> prompts in arrival order
        self._streak = 0  # passes in a row at the top level while a lower level waited
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="padded-batcher", daemon=True)
        self._thread.start()

    def submit(self, prompts: Sequence[Sequence[int]], priority: int = 0) -> Scoring:
        scoring = Scoring(prompts, priority)
        if not prompts:  # settled already
            return scoring
        with self._lock:
            if self._stopped:
                raise RuntimeError("the batcher is stopped")
            self._pending.setdefault(priority, deque()).extend((scoring, i) for i in range(len(prompts)))
            self._lock.notify()
        return scoring

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
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

    def _lookahead(self, queue: deque[_Item]) -> list[_Item]:
        """Pop the oldest live prompts, up to the look-ahead's token size (at least one). (A look-ahead of the queue;
        a long document's windows are `PairOptions.window_tokens`.)"""
        ahead: list[_Item] = []
        tokens = 0
        while queue:
            scoring, i = queue[0]
            if scoring.future.done():  # cancelled (or failed): its prompts never reach the model
                queue.popleft()
                continue
            size = len(scoring.prompts[i])
            if ahead and tokens + size > self.lookahead_tokens:
                break
            ahead.append(queue.popleft())
            tokens += size
        return ahead

    def _next_batch(self) -> list[_Item] | None:
        """Under the lock: the next pass, or None when nothing is pending."""
        while (level := self._level()) is not None:
            queue = self._pending[level]
            ahead = self._lookahead(queue)
            if not ahead:
                continue
            plans = plan_batches([len(s.prompts[i]) for s, i in ahead], self.max_batch_tokens)
            chosen = next(plan for plan in plans if 0 in plan)  # the pass that serves the oldest prompt
            picked = set(chosen)
            queue.extendleft(reversed([item for j, item in enumerate(ahead) if j not in picked]))
            return [ahead[j] for j in chosen]
        return None

    def _run(self) -> None:
        name_engine_thread()
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
        prompts = [s.prompts[i] for s, i in batch]
        started = time.perf_counter()
        try:
            scores = self.forward(prompts)
        except Exception as exc:  # the pass's failure belongs to every submission in it
            logger.warning("forward pass of %d prompts failed: %r", len(prompts), exc)
            for scoring, _ in batch:
                settle(scoring.future, exception=exc)
            return
        real = sum(len(x) for x in prompts)
        self.stats.record(
            len(prompts), real, max(len(x) for x in prompts) * len(prompts), time.perf_counter() - started
        )
        for (scoring, i), score in zip(batch, scores, strict=True):
            scoring.fill(i, float(score))
