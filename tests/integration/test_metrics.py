"""/metrics counters move when jobs run: the API's and a worker's."""

from __future__ import annotations

import contextlib

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api.main import create_app
from rerankfarm.embedded_redis import free_port
from tests.conftest import TINY
from tests.integration.conftest import WorkerProcess, farm_settings, wait_for

pytestmark = pytest.mark.integration


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A worker's /metrics, waited for as long as Prometheus' own scrape timeout allows (10 s; httpx's default 5 s
    ran out once in a full CI run, right after the worker started, with several idle vLLM workers on 2 cores)."""
    return _samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)


def test_metrics_move_when_jobs_run(fresh_url, tiny_model_dir, log_dir) -> None:
    url = fresh_url  # this worker alone scores the job
    port = free_port()
    worker = WorkerProcess(url, tiny_model_dir, log_dir, RERANK_WORKER_METRICS_PORT=str(port)).start()
    stack = contextlib.ExitStack()
    try:
        client = stack.enter_context(TestClient(create_app(farm_settings(url, tiny_model_dir))))
        before_api = _samples(client.get("/metrics").text)
        before_worker = _scrape(port)
        job = client.post("/v1/jobs", json={"requests": [{"query": "w1", "documents": ["w2 w3"] * 40}]}).json()
        assert wait_for(client, job["id"])["status"] == "succeeded"
        after_api = _samples(client.get("/metrics").text)
        key = ("rerank_jobs_submitted_total", (("kind", "bulk"), ("model", TINY)))
        assert after_api[key] == before_api.get(key, 0) + 1
        assert ("rerank_queue_depth", (("model", TINY), ("queue", f"rerank.bulk.{TINY}"))) in after_api
        assert after_api[("rerank_workers_alive", ())] >= 1
        after_worker = _scrape(port)
        pairs = ("rerank_pairs_scored_total", (("model", TINY),))
        assert after_worker[pairs] == before_worker.get(pairs, 0) + 40
        served = ("rerank_pairs_served_total", (("model", TINY), ("tenant", "default")))
        assert after_worker[served] == before_worker.get(served, 0) + 40
        first = (
            "rerank_chunk_sends_total",
            (("cause", "first"),),
        )  # 8 chunks of 5, the API fed some, the worker the rest
        fed = sum(
            after.get(first, 0) - before.get(first, 0)
            for before, after in ((before_api, after_api), (before_worker, after_worker))
        )
        assert fed == 8
        finished = ("rerank_jobs_finished_total", (("model", TINY), ("status", "succeeded")))
        assert after_worker[finished] == before_worker.get(finished, 0) + 1
        assert ("rerank_engine_seconds_count", (("model", TINY),)) in after_worker
        assert ("rerank_batch_pairs_bucket", (("le", "1.0"), ("model", TINY))) in after_worker
        assert ("rerank_job_latency_seconds_count", (("kind", "bulk"), ("model", TINY))) in after_worker

        # Failures by cause: a request the API refuses, and a job its worker fails (input over the max length with
        # truncation off).
        assert client.post("/v1/jobs", json={"requests": []}).status_code == 422
        huge = " ".join(f"w{i % 500}" for i in range(9000))
        body = {"requests": [{"query": "w1", "documents": [huge], "truncate": False}]}
        poison = client.post("/v1/jobs", json=body).json()
        assert wait_for(client, poison["id"])["status"] == "failed"
        refused = ("rerank_request_failures_total", (("cause", "invalid_request"),))
        assert _samples(client.get("/metrics").text)[refused] == after_api.get(refused, 0) + 1
        failed = ("rerank_jobs_failed_total", (("cause", "invalid_input"),))
        worker_now = _scrape(port)
        assert worker_now[failed] == after_worker.get(failed, 0) + 1
    finally:
        stack.close()
        worker.stop()
