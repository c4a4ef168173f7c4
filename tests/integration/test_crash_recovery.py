"""Nothing lost: a worker killed with SIGKILL mid-job, and Redis restarted under a running farm."""

from __future__ import annotations

import os
import random
import signal
import time

import psutil
import pytest
import redis
from fastapi.testclient import TestClient

from api.main import create_app
from rerankfarm.embedded_redis import EmbeddedRedis
from schemas import keys
from tests.conftest import random_text
from tests.integration.conftest import WorkerProcess, farm_settings, wait_for

pytestmark = pytest.mark.integration

FAST_REDELIVERY = {"RERANK_VISIBILITY_TIMEOUT_S": "8"}


def _kill_worker(w: WorkerProcess) -> None:
    """SIGKILL the worker process itself (its pid from its heartbeat) and its launcher: no warm shutdown."""
    [hostname] = w.alive_hostnames()
    info = w.redis.get(keys.worker_key(hostname))
    assert info is not None
    import json

    os.kill(json.loads(info)["pid"], signal.SIGKILL)
    assert w.process is not None
    w.process.kill()
    w.process.wait()
    w.redis.delete(keys.worker_key(hostname))  # its heartbeat would linger until its TTL


def _worker_pid(w: WorkerProcess) -> int:
    [hostname] = w.alive_hostnames()
    info = w.redis.get(keys.worker_key(hostname))
    assert info is not None
    import json

    return int(json.loads(info)["pid"])


def _assert_every_pair_scored_once(client: TestClient, job: dict, body: dict, redis_url: str) -> None:
    done = client.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "succeeded"
    assert (
        done["progress"]["completed"] == done["progress"]["total"] == sum(len(r["documents"]) for r in body["requests"])
    )
    assert sum(done["workers"].values()) == done["progress"]["total"]  # no chunk counted twice
    data = client.get(f"/v1/jobs/{job['id']}/results").json()["data"]
    for request, entry in zip(body["requests"], data, strict=True):
        assert sorted(r["index"] for r in entry["results"]) == list(range(len(request["documents"])))
    r = redis.Redis.from_url(redis_url)
    assert r.hlen(keys.job_scores_key(job["id"])) == -(-done["progress"]["total"] // 10)


def test_worker_killed_mid_job_twice_loses_nothing(redis_url, tiny_model_dir, log_dir) -> None:
    rng = random.Random(41)
    body = {
        "requests": [
            {"query": random_text(rng, 2, 5), "documents": [random_text(rng, 100, 250) for _ in range(120)]}
            for _ in range(5)
        ]
    }
    settings = farm_settings(redis_url, tiny_model_dir, chunk_size=10)
    with TestClient(create_app(settings)) as client:
        first = WorkerProcess(redis_url, tiny_model_dir, log_dir, **FAST_REDELIVERY).start()
        job = client.post("/v1/jobs", json=body).json()
        wait_for(client, job["id"], until=("running",), timeout=60)
        time.sleep(1)
        _kill_worker(first)
        progress_at_kill = client.get(f"/v1/jobs/{job['id']}").json()["progress"]["completed"]
        assert progress_at_kill < 600

        second = WorkerProcess(redis_url, tiny_model_dir, log_dir, **FAST_REDELIVERY).start()
        deadline = time.monotonic() + 60
        while client.get(f"/v1/jobs/{job['id']}").json()["progress"]["completed"] <= progress_at_kill + 20:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        _kill_worker(second)

        third = WorkerProcess(redis_url, tiny_model_dir, log_dir, **FAST_REDELIVERY).start()
        try:
            done = wait_for(client, job["id"], timeout=120)
            assert done["status"] == "succeeded", done
            _assert_every_pair_scored_once(client, job, body, redis_url)
        finally:
            third.stop()


def test_redis_restart_under_a_running_farm(tiny_model_dir, log_dir, tmp_path) -> None:
    server = EmbeddedRedis(data_dir=str(tmp_path), appendonly=True).start()
    url = server.url
    rng = random.Random(42)
    body = {
        "requests": [
            {"query": random_text(rng, 2, 5), "documents": [random_text(rng, 100, 250) for _ in range(100)]}
            for _ in range(4)
        ]
    }
    worker = WorkerProcess(url, tiny_model_dir, log_dir, **FAST_REDELIVERY).start()
    try:
        with TestClient(create_app(farm_settings(url, tiny_model_dir, chunk_size=10))) as client:
            jobs = [client.post("/v1/jobs", json=body).json() for _ in range(2)]
            wait_for(client, jobs[0]["id"], until=("running",), timeout=60)
            server.stop()
            down = client.get(f"/v1/jobs/{jobs[0]['id']}")
            assert down.status_code == 503 and down.headers["retry-after"]
            assert client.post("/v1/jobs", json=body).status_code == 503
            assert client.get("/readyz").status_code == 503
            time.sleep(3)
            restarted = EmbeddedRedis(port=server.port, data_dir=str(tmp_path), appendonly=True).start()
            try:
                for job in jobs:
                    done = wait_for(client, job["id"], timeout=120)
                    assert done["status"] == "succeeded", done
                    _assert_every_pair_scored_once(client, job, body, url)
                deadline = time.monotonic() + 30
                while client.get("/readyz").status_code != 200:  # the same worker is back, by itself
                    assert time.monotonic() < deadline
                    time.sleep(0.5)
            finally:
                restarted.stop()
    finally:
        worker.stop()
        server.stop()


@pytest.mark.parametrize("in_process", ["true", "false"])
def test_killed_vllm_worker_loses_nothing_and_leaves_no_engine_process(
    in_process, redis_url, tiny_model_dir, log_dir
) -> None:
    """SIGKILL of the worker process alone (its launcher lives on and starts a new one), mid-job: the job completes
    with every pair scored once, and nothing the killed worker started outlives it (vLLM's engine core, when it
    runs in a process of its own, would hold the model's memory)."""
    rng = random.Random(43)
    body = {
        "requests": [
            {"query": random_text(rng, 2, 5), "documents": [random_text(rng, 100, 250) for _ in range(80)]}
            for _ in range(3)
        ]
    }
    worker = WorkerProcess(
        redis_url, tiny_model_dir, log_dir, RERANK_VLLM_IN_PROCESS=in_process, **FAST_REDELIVERY
    ).start()
    try:
        with TestClient(create_app(farm_settings(redis_url, tiny_model_dir, chunk_size=10))) as client:
            pid = _worker_pid(worker)
            tree = psutil.Process(pid).children(recursive=True)
            engine_processes = [
                p for p in tree if "VLLM" in " ".join(p.cmdline()) or "spawn_main" in " ".join(p.cmdline())
            ]
            if in_process == "false":
                assert engine_processes, "expected vLLM's engine core in a process of its own"
            else:
                assert not engine_processes, [p.cmdline() for p in engine_processes]
            job = client.post("/v1/jobs", json=body).json()
            wait_for(client, job["id"], until=("running",), timeout=60)
            os.kill(pid, signal.SIGKILL)
            _, alive = psutil.wait_procs(tree, timeout=20)
            assert not alive, [p.cmdline() for p in alive]
            done = wait_for(client, job["id"], timeout=180)
            assert done["status"] == "succeeded", done
            _assert_every_pair_scored_once(client, job, body, redis_url)
            assert _worker_pid(worker) != pid  # the launcher started a fresh worker, which finished the job
    finally:
        worker.stop()
