"""Fair shares with a real worker: two tenants at one priority, weights, a priority job overtaking, on the farm's
own backlog (`store.backlog`). The module has a database and a worker of its own, so nothing else is queued."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from api.main import create_app
from rerankfarm import chaos
from schemas import keys
from store import api_keys, backlog
from tests.conftest import TINY, random_text
from tests.integration.conftest import WorkerProcess, farm_settings, wait_for

pytestmark = pytest.mark.integration

CHUNK = 10


@pytest.fixture(scope="module")
def farm(databases, tiny_model_dir: Path, log_dir: Path) -> Iterator[tuple[str, TestClient, WorkerProcess]]:
    with databases.take() as url:
        worker = WorkerProcess(url, tiny_model_dir, log_dir, name="fair").start()
        try:
            with TestClient(create_app(farm_settings(url, tiny_model_dir, chunk_size=CHUNK, auth="on"))) as client:
                yield url, client, worker
        finally:
            worker.stop()


def tenant_headers(url: str, name: str) -> dict[str, str]:
    key, _ = api_keys.create_key(redis.Redis.from_url(url), name)
    return {"Authorization": f"Bearer {key}"}


def job_body(rng: random.Random, pairs: int, priority: int = 5) -> dict:
    documents = [random_text(rng, 20, 60) for _ in range(pairs)]
    return {"requests": [{"query": random_text(rng, 2, 5), "documents": documents}], "priority": priority}


def completed(url: str, job_ids: list[str]) -> int:
    r = redis.Redis.from_url(url)
    return sum(int(r.hget(keys.job_key(job_id), "completed") or 0) for job_id in job_ids)


def cancel_all(client: TestClient, jobs: list[str], headers: dict[str, str]) -> None:
    for job_id in jobs:
        client.post(f"/v1/jobs/{job_id}/cancel", headers=headers)


def test_a_small_job_does_not_wait_for_another_tenants_backlog(farm) -> None:
    url, client, _ = farm
    a, b = tenant_headers(url, f"a{time.time_ns()}"), tenant_headers(url, f"b{time.time_ns()}")
    rng = random.Random(1)
    backlog = [client.post("/v1/jobs", json=job_body(rng, 300), headers=a).json()["id"] for _ in range(8)]
    wait_for_progress(url, backlog, 50)
    small = client.post("/v1/jobs", json=job_body(rng, 20), headers=b).json()
    try:
        done = wait_for(client, small["id"], timeout=60, headers=b)
        assert done["status"] == "succeeded"
        served_a = completed(url, backlog)
        assert served_a < 0.5 * 8 * 300, f"the small job waited for {served_a} of tenant a's pairs"
    finally:
        cancel_all(client, backlog, a)


def wait_for_progress(url: str, jobs: list[str], pairs: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while completed(url, jobs) < pairs:
        assert time.monotonic() < deadline, f"less than {pairs} pairs scored in {timeout} s"
        time.sleep(0.05)


def test_served_shares_follow_the_weights(farm) -> None:
    """Tenants weighted 3 and 1, both with a backlog: between two looks, 3 pairs of a's are scored for 1 of b's."""
    url, client, _ = farm
    names = f"heavy{time.time_ns()}", f"light{time.time_ns()}"
    a, b = tenant_headers(url, names[0]), tenant_headers(url, names[1])
    backlog.set_weight(redis.Redis.from_url(url), names[0], 3)
    rng = random.Random(2)
    jobs_a = [client.post("/v1/jobs", json=job_body(rng, 500), headers=a).json()["id"] for _ in range(2)]
    jobs_b = [client.post("/v1/jobs", json=job_body(rng, 500), headers=b).json()["id"] for _ in range(2)]
    try:
        wait_for_progress(url, jobs_a + jobs_b, 150)  # past what the lane held before b's jobs came
        start = completed(url, jobs_a), completed(url, jobs_b)
        wait_for_progress(url, jobs_a + jobs_b, 150 + 800)
        share_a = (completed(url, jobs_a) - start[0]) / (completed(url, jobs_a + jobs_b) - sum(start))
    finally:
        cancel_all(client, jobs_a, a)
        cancel_all(client, jobs_b, b)
    print(f"tenant a (weight 3) was served {share_a:.1%} of the pairs")
    assert 0.65 <= share_a <= 0.85


def test_a_higher_priority_job_overtakes_every_tenants_backlog(farm) -> None:
    """Once the urgent job's first chunk is taken, the worker takes its other chunks before any priority-5 chunk
    but those it had reserved already (one per slot)."""
    url, client, worker = farm
    a, c = tenant_headers(url, f"a{time.time_ns()}"), tenant_headers(url, f"c{time.time_ns()}")
    rng = random.Random(3)
    backlog = [client.post("/v1/jobs", json=job_body(rng, 300, priority=5), headers=a).json()["id"] for _ in range(4)]
    same = client.post("/v1/jobs", json=job_body(rng, 300, priority=5), headers=c).json()["id"]
    wait_for_progress(url, backlog, 30)
    urgent = client.post("/v1/jobs", json=job_body(rng, 4 * CHUNK, priority=9), headers=c).json()["id"]
    try:
        assert wait_for(client, urgent, timeout=60, headers=c)["status"] == "succeeded"
    finally:
        cancel_all(client, backlog, a)
        cancel_all(client, [same], c)
    takes = [e["job"] for e in chaos.chunk_events(worker.log_path) if e["event"] == "chunk.taken"]
    first, last = takes.index(urgent), len(takes) - 1 - takes[::-1].index(urgent)
    between = [job for job in takes[first : last + 1] if job != urgent]
    assert len(between) <= worker.concurrency, between


def test_a_queued_job_says_where_it_stands(fresh_url, tiny_model_dir) -> None:
    """No worker: the API's feed fills the lane (RERANK_LANE_DEPTH chunks), the rest waits in the backlog."""
    url = fresh_url
    rng = random.Random(4)
    with TestClient(create_app(farm_settings(url, tiny_model_dir, chunk_size=5, lane_depth=8))) as client:
        first = client.post("/v1/jobs", json=job_body(rng, 200)).json()["id"]
        second = client.post("/v1/jobs", json=job_body(rng, 100)).json()["id"]
        urgent = client.post("/v1/jobs", json=job_body(rng, 30, priority=9)).json()["id"]
        assert client.get(f"/v1/jobs/{first}").json()["queue"] == {
            "pairs_waiting": 200 - 8 * 5,
            "pairs_ahead": 30,
            "tenants_sharing": 1,
            "jobs_sharing": 2,
        }
        assert client.get(f"/v1/jobs/{second}").json()["queue"]["pairs_waiting"] == 100
        scraped = client.get("/metrics").text
        assert f'rerank_backlog_pairs{{model="{TINY}",tenant="default"}} 290.0' in scraped
        assert f'rerank_backlog_chunks{{model="{TINY}",tenant="default"}} 58.0' in scraped  # 32 + 20 + 6
        client.post(f"/v1/jobs/{second}/cancel")
        assert client.get(f"/v1/jobs/{second}").json()["queue"] is None
        assert client.get(f"/v1/jobs/{first}").json()["queue"]["jobs_sharing"] == 1
        for job in (first, urgent):
            client.post(f"/v1/jobs/{job}/cancel")


def test_keys_weight_sets_a_tenants_share(fresh_url) -> None:
    env = dict(os.environ, RERANK_REDIS_URL=fresh_url)
    cli = [sys.executable, "-m", "rerankfarm.cli", "keys"]
    tenant = f"w{time.time_ns()}"
    run = subprocess.run(
        [*cli, "create", "--tenant", tenant, "--weight", "2.5"], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    listed = subprocess.run([*cli, "list"], env=env, capture_output=True, text=True, check=True).stdout
    assert f"tenant={tenant}  weight=2.5" in listed
    bad = subprocess.run([*cli, "weight", "--tenant", tenant, "0"], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "above 0" in bad.stderr
    assert backlog.weights(redis.Redis.from_url(env["RERANK_REDIS_URL"]))[tenant] == 2.5
