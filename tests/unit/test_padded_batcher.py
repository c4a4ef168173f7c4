"""The transformers engine's padded batcher with a recording forward pass (pure logic), and with the real transformers
engine (batch invariance)."""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence

import pytest

from tests.conftest import random_text
from workers.engines.base import Cancelled, EngineStats
from workers.engines.batcher import Batcher, plan_batches
from workers.prompts import Pair


class RecordingForward:
    """A forward pass that scores a prompt as its length / 1000 and records every batch; can be held to let
    submissions pile up."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_on: int | None = None

    def __call__(self, batch: Sequence[Sequence[int]]) -> list[float]:
        self.batches.append([len(x) for x in batch])
        self.entered.set()
        self.gate.wait(2)
        if self.fail_on is not None and self.fail_on in [len(x) for x in batch]:
            raise RuntimeError("engine exploded")
        return [len(x) / 1000 for x in batch]


def batcher_of(forward: RecordingForward, max_batch_tokens: int, **options: int) -> Batcher:
    return Batcher(forward, max_batch_tokens, EngineStats(), **options)


def test_plan_batches_respects_padded_budget_and_sorts_by_length() -> None:
    lengths = [10, 300, 20, 290, 5, 1000]
    batches = plan_batches(lengths, max_batch_tokens=600)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 600
    assert batches[0] == [5]  # longer than the budget: alone
    assert [lengths[i] for i in batches[1]] == [300, 290]


def test_submissions_from_several_chunks_share_engine_calls_and_get_their_own_scores() -> None:
    engine = RecordingForward()
    engine.gate.clear()
    batcher = batcher_of(engine, 10_000)
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
    engine = RecordingForward()
    engine.gate.clear()
    batcher = batcher_of(engine, 100)
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
    engine = RecordingForward()
    engine.fail_on = 66
    batcher = batcher_of(engine, 70)
    try:
        bad = batcher.submit([[1] * 66])
        with pytest.raises(RuntimeError, match="exploded"):
            bad.future.result(2)
        assert batcher.submit([[1] * 4]).future.result(2) == [0.004]
    finally:
        batcher.stop()


def test_cancelled_submission_never_reaches_the_engine() -> None:
    engine = RecordingForward()
    engine.gate.clear()
    batcher = batcher_of(engine, 1000)
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
    try:
        jobs = [[Pair(random_text(rng, 2, 8), random_text(rng, 1, 400)) for _ in range(7)] for _ in range(3)]
        jobs[1].insert(3, target)
        futures = [engine.submit(prompts.encode(pairs)) for pairs in jobs]
        inside = futures[1].future.result(30)[3]
    finally:
        engine.close()
    assert engine.stats.batches < sum(len(j) for j in jobs)  # pairs really were batched together
    assert inside == pytest.approx(alone, abs=1e-5)


def test_oldest_pair_is_always_served_so_chunks_finish_in_arrival_order() -> None:
    engine = RecordingForward()
    engine.gate.clear()
    batcher = batcher_of(engine, 100, lookahead_batches=2)
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
    engine = RecordingForward()
    engine.gate.clear()
    batcher = batcher_of(engine, 10, starvation_limit=2)
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
