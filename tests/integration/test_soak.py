"""A test-sized chaos soak (`rerankfarm.chaos`): many jobs from several concurrent clients while a worker is
SIGKILLed every few seconds and replaced, at least 3 times while jobs are still coming. Every accepted job must
succeed, no pair may be counted twice, and every score must equal the reference's."""

from __future__ import annotations

import pytest

from rerankfarm import chaos
from tests.conftest import VLLM_TEST_ENV
from tests.integration.conftest import farm_settings, serve

pytestmark = pytest.mark.integration

# Kills are paced by how fast a replacement starts (each kill waits for its victim to consume), so the clients go on
# past JOBS until MIN_KILLS kills have happened; their load is a closed loop (a few jobs unfinished per client), so
# a slow machine gets a longer run, not a flood of jobs. What proves the mechanism is a chunk in hand recovered.
JOBS, KILL_EVERY_S, MIN_KILLS = 600, 6.0, 3


@pytest.mark.timeout(900)
def test_soak_with_workers_sigkilled_every_few_seconds(fresh_url, tiny_model_dir, log_dir, reference) -> None:

    url = fresh_url  # only this test's workers consume there
    settings = farm_settings(url, tiny_model_dir, max_jobs_in_flight_per_tenant=10_000, rate_limit_per_minute=0)
    env = {**VLLM_TEST_ENV, "RERANK_WORKER_HEARTBEAT_S": "1", "RERANK_WORKER_METRICS_PORT": "0"}
    with serve(settings) as api:
        report = chaos.run(
            api,
            url,
            tiny_model_dir,
            log_dir,
            JOBS,
            KILL_EVERY_S,
            worker_env=env,
            score_of=reference.score,
            seed=7,
            documents=(3, 8),  # enough work that kills find chunks in hand
            words=(20, 60),
            min_kills=MIN_KILLS,
        )
    print(f"soak:\n{report.table()}")
    assert report.refused == []
    assert report.kills >= MIN_KILLS, "too few kills to prove anything"
    assert report.chunks_recovered > 0, "no kill found a chunk in hand: the soak proved nothing"
    assert report.jobs >= JOBS
    assert (report.succeeded, report.lost, report.counted_twice, report.wrong_scores) == (report.jobs, 0, 0, 0)
    assert report.longest_recovery_s < 60
    assert report.left_running == 0  # killed launchers took their workers and engines with them
