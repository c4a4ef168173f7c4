"""The batcher with a recording engine (pure logic) and with the real transformers engine (batch invariance)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence

import pytest

from tests.conftest import random_text
from workers.batcher import Batcher, Cancelled, plan_batches
from workers.engines.base import Feed
from workers.prompts import Pair


class RecordingEngine:
    """Scores a prompt as its length / 1000 and records every batch; can be held to let submissions pile up."""

    name = "recording"
    device = "cpu"

    def __init__(
        self, max_batch_tokens: int, padded: bool = True, calls_in_flight: int = 1, express: bool = False
    ) -> None:
        self.feed = Feed(max_batch_tokens, padded, calls_in_flight, express)
        self.batches: list[list[int]] = []
        self.priorities: list[int] = []
        self.flags: list[Sequence[threading.Event] | None] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.inside = 0
        self.most_inside = 0
        self.fail_on: int | None = None
        self._lock = threading.Lock()

    def score(
        self, batch: Sequence[Sequence[int]], priority: int = 0, abandoned: Sequence[threading.Event] | None = None
    ) -> list[float]:
        with self._lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            self.batches.append([len(x) for x in batch])
            self.priorities.append(priority)
            self.flags.append(abandoned)
        self.entered.set()
        self.gate.wait(2)
        with self._lock:
            self.inside -= 1
        if self.fail_on is not None and self.fail_on in [len(x) for x in batch]:
            raise RuntimeError("engine exploded")
        return [len(x) / 1000 for x in batch]

    def health(self) -> str | None:
        return None

    def close(self) -> None:
        pass


def test_plan_batches_respects_padded_budget_and_sorts_by_length() -> None:
    lengths = [10, 300, 20, 290, 5, 1000]
    batches = plan_batches(lengths, max_batch_tokens=600)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 600
    assert batches[0] == [5]  # longer than the budget: alone
    assert [lengths[i] for i in batches[1]] == [300, 290]


def test_submissions_from_several_chunks_share_engine_calls_and_get_their_own_scores() -> None:
    engine = RecordingEngine(10_000)
    engine.gate.clear()
    batcher = Batcher(engine)
    try:
        first = batcher.submit([[1] * 3])  # taken alone while the engine is held
        assert engine.entered.wait(2)
        futures = [batcher.submit([[1] * n for n in (k + 1, k + 50)]) for k in range(5)]
        engine.gate.set()
        assert first.future.result(2) == [0.003]
        for k, f in enumerate(futures):
            assert f.future.result(2) == [(k + 1) / 1000, (k + 50) / 1000]
        assert len(engine.batches) == 2
        assert engine.batches[1] == sorted(engine.batches[1], reverse=True)
        assert len(engine.batches[1]) == 10
    finally:
        batcher.stop()


def test_higher_priority_runs_before_the_rest_of_a_round() -> None:
    engine = RecordingEngine(100)
    engine.gate.clear()
    batcher = Batcher(engine)
    try:
        batcher.submit([[1] * 7])
        assert engine.entered.wait(2)
        low = batcher.submit([[1] * 50, [1] * 50, [1] * 50], priority=1)  # three batches at the budget
        urgent = batcher.submit([[1] * 9], priority=9)
        engine.gate.set()
        urgent.future.result(2)
        low.future.result(2)
        assert engine.batches[1] == [9]
    finally:
        batcher.stop()


def test_engine_failure_fails_only_the_submissions_in_that_batch() -> None:
    engine = RecordingEngine(70)
    engine.fail_on = 66
    batcher = Batcher(engine)
    try:
        bad = batcher.submit([[1] * 66])
        with pytest.raises(RuntimeError, match="exploded"):
            bad.future.result(2)
        assert batcher.submit([[1] * 4]).future.result(2) == [0.004]
    finally:
        batcher.stop()


def test_cancelled_submission_never_reaches_the_engine() -> None:
    engine = RecordingEngine(1000)
    engine.gate.clear()
    batcher = Batcher(engine)
    try:
        batcher.submit([[1] * 2])
        assert engine.entered.wait(2)
        dropped = batcher.submit([[1] * 77])
        dropped.cancel()  # what a task thread does when it learns its job was cancelled
        with pytest.raises(Cancelled):
            dropped.future.result(0)  # at once, not after the engine call in progress
        engine.gate.set()
        assert batcher.submit([[1] * 3]).future.result(2) == [0.003]
        assert all(77 not in b for b in engine.batches)
    finally:
        batcher.stop()


def test_pair_scores_the_same_alone_and_inside_mixed_batches_from_several_jobs(tiny_model_dir) -> None:
    from schemas.settings import Settings
    from workers.engines.transformers_engine import TransformersEngine
    from workers.prompts import PromptBuilder

    prompts = PromptBuilder.from_pretrained(str(tiny_model_dir), 512)
    engine = TransformersEngine.load(Settings(model=str(tiny_model_dir), max_batch_tokens=4096), prompts)
    rng = random.Random(3)
    target = Pair(random_text(rng, 3, 6), random_text(rng, 10, 20), "Find the passage")
    alone = engine.score(prompts.encode([target]))[0]
    batcher = Batcher(engine)
    try:
        jobs = [[Pair(random_text(rng, 2, 8), random_text(rng, 1, 400)) for _ in range(7)] for _ in range(3)]
        jobs[1].insert(3, target)
        futures = [batcher.submit(prompts.encode(pairs)) for pairs in jobs]
        inside = futures[1].future.result(30)[3]
    finally:
        batcher.stop()
    assert batcher.stats.batches < sum(len(j) for j in jobs)  # pairs really were batched together
    assert inside == pytest.approx(alone, abs=1e-5)


def test_oldest_pair_is_always_served_so_chunks_finish_in_arrival_order() -> None:
    engine = RecordingEngine(100)
    engine.gate.clear()
    batcher = Batcher(engine, window_batches=2)
    try:
        batcher.submit([[1] * 5])
        assert engine.entered.wait(2)
        old = batcher.submit([[1] * 10])  # short and old
        newer = [batcher.submit([[1] * 90]) for _ in range(6)]  # long ones keep coming behind it
        engine.gate.set()
        old.future.result(2)
        for f in newer:
            f.future.result(2)
        assert 10 in engine.batches[1]
    finally:
        batcher.stop()


def test_lower_priority_is_not_starved() -> None:
    engine = RecordingEngine(10)
    engine.gate.clear()
    batcher = Batcher(engine, starvation_limit=2)
    try:
        batcher.submit([[1] * 1])
        assert engine.entered.wait(2)
        bulk = batcher.submit([[1] * 3], priority=0)
        urgent = [batcher.submit([[1] * 7], priority=10) for _ in range(6)]
        engine.gate.set()
        bulk.future.result(2)
        for f in urgent:
            f.future.result(2)
        assert engine.batches[1:4] == [[7], [7], [3]]
    finally:
        batcher.stop()


def test_packed_engine_gets_the_oldest_pairs_in_order_with_its_next_call_already_waiting() -> None:
    engine = RecordingEngine(100, padded=False, calls_in_flight=2)
    engine.gate.clear()
    batcher = Batcher(engine)
    try:
        batcher.submit([[1] * 100])
        assert engine.entered.wait(2)
        batcher.submit([[1] * 2])
        deadline = time.monotonic() + 5
        while engine.most_inside < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.most_inside == 2  # a second call entered the engine while the first was held
        subs = [batcher.submit([[1] * n]) for n in (40, 50, 30, 20, 60)]
        engine.gate.set()
        for s in subs:
            s.future.result(2)
        # Packed cost is the sum of lengths: calls fill the budget in arrival order, no length sorting.
        assert sorted(engine.batches[2:]) == [[30, 20], [40, 50], [60]]
    finally:
        batcher.stop()


def test_each_call_carries_its_priority_and_the_cancel_flags_of_its_pairs() -> None:
    engine = RecordingEngine(1000)
    batcher = Batcher(engine)
    try:
        sub = batcher.submit([[1] * 5, [1] * 6], priority=10)
        sub.future.result(2)
        assert engine.priorities[-1] == 10
        flags = engine.flags[-1]
        assert flags is not None and all(f is sub.cancelled for f in flags)
        assert not any(f.is_set() for f in flags)
        sub.cancel()
        assert all(f.is_set() for f in flags)  # what lets an engine that queues work abort it
    finally:
        batcher.stop()


@pytest.mark.parametrize("express", [True, False])
def test_top_priority_pairs_take_the_express_call_while_every_feeder_is_busy(express: bool) -> None:
    """Both feeders held in bulk calls: an interactive submission enters the engine at once through the express
    call (when the engine takes one), and bulk pairs never use it."""
    engine = RecordingEngine(100, padded=False, calls_in_flight=2, express=express)
    engine.gate.clear()
    batcher = Batcher(engine, express_level=10)
    try:
        bulk = [batcher.submit([[1] * 100]) for _ in range(4)]
        deadline = time.monotonic() + 5
        while engine.inside < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.inside == 2
        time.sleep(0.1)
        assert engine.inside == 2  # bulk pairs wait, yet the express call takes none of them
        interactive = batcher.submit([[1] * 7], priority=10)
        deadline = time.monotonic() + 1
        while engine.inside < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.inside == (3 if express else 2)
        assert (engine.priorities[-1] == 10) is express
        engine.gate.set()
        assert interactive.future.result(5) == [0.007]
        for s in bulk:
            s.future.result(5)
        assert engine.most_inside == (3 if express else 2)
    finally:
        batcher.stop()
