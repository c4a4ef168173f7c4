"""Retried submissions against a real API (uvicorn, real Redis): one job per Idempotency-Key, whatever the timing."""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from rerankfarm.client import RerankFarm
from schemas import keys
from tests.integration.conftest import farm_settings, serve

BODY = {"requests": [{"custom_id": "a", "query": "capital of China?", "documents": ["Beijing", "Paris", "Rome"]}]}


@pytest.fixture
def api(redis_url: str, tiny_model_dir: Path) -> Any:
    with serve(farm_settings(redis_url, tiny_model_dir, rate_limit_per_minute=0)) as url:
        yield url


def recent_jobs(redis_url: str) -> set[str]:
    with redis.Redis.from_url(redis_url) as client:
        return {m.decode() for m in client.zrange(keys.recent_jobs_key("default"), 0, -1)}


def test_concurrent_requests_with_one_key_create_one_job(api: str, redis_url: str) -> None:
    key = str(uuid.uuid4())
    before = recent_jobs(redis_url)
    answers: list[httpx.Response] = []
    start = threading.Barrier(8)

    def post() -> None:
        with httpx.Client(base_url=api, timeout=30) as http:
            start.wait()
            answers.append(http.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": key}))

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = Counter(a.status_code for a in answers)
    assert codes[202] == 1 and set(codes) <= {200, 202, 409}, codes
    created = recent_jobs(redis_url) - before
    assert len(created) == 1
    [job_id] = created
    for answer in answers:
        if answer.status_code == 200:
            assert answer.json()["id"] == job_id and answer.headers["Idempotent-Replayed"] == "true"
        elif answer.status_code == 409:
            assert answer.json()["error"]["code"] == "idempotency_in_progress" and answer.headers["Retry-After"]
    with httpx.Client(base_url=api) as http:
        again = http.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": key})
        other = http.post("/v1/jobs", json={**BODY, "priority": 9}, headers={"Idempotency-Key": key})
        fresh = http.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": str(uuid.uuid4())})
    assert again.status_code == 200 and again.json()["id"] == job_id
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert fresh.status_code == 202 and fresh.json()["id"] != job_id
    assert "Idempotent-Replayed" not in fresh.headers


def test_files_and_batches_are_created_once_per_key(api: str) -> None:
    line = {"custom_id": "r1", "method": "POST", "url": "/v1/rerank", "body": {"query": "q", "documents": ["a"]}}
    content = (json.dumps(line) + "\n").encode()
    file_key, batch_key = str(uuid.uuid4()), str(uuid.uuid4())
    with httpx.Client(base_url=api) as http:

        def upload(data: bytes) -> httpx.Response:
            files = {"file": ("in.jsonl", data)}
            return http.post("/v1/files", data={"purpose": "batch"}, files=files, headers={"Idempotency-Key": file_key})

        first, second, changed = upload(content), upload(content), upload(content + content)
        assert first.status_code == 200 and "Idempotent-Replayed" not in first.headers
        assert second.json()["id"] == first.json()["id"] and second.headers["Idempotent-Replayed"] == "true"
        assert changed.status_code == 422  # another file under the same key
        body = {"input_file_id": first.json()["id"], "endpoint": "/v1/rerank", "completion_window": "24h"}
        batches = [http.post("/v1/batches", json=body, headers={"Idempotency-Key": batch_key}) for _ in range(2)]
    assert [b.status_code for b in batches] == [200, 200]
    assert batches[0].json()["id"] == batches[1].json()["id"] and batches[1].headers["Idempotent-Replayed"] == "true"


class TimesOutOnce(httpx.HTTPTransport):
    """Sends the first submission to the farm, then loses its answer (a proxy timing out): the caller retries."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.sent.append(request.headers.get("idempotency-key"))
        if len(self.sent) == 1:
            response.read()
            raise httpx.ReadTimeout("the answer was lost", request=request)
        return response


def test_the_client_retries_a_lost_answer_without_a_second_job(api: str, redis_url: str) -> None:
    transport = TimesOutOnce()
    before = recent_jobs(redis_url)
    with RerankFarm(http=httpx.Client(base_url=api, transport=transport)) as farm:
        job = farm.submit(BODY["requests"])
    assert len(transport.sent) == 2 and transport.sent[0] == transport.sent[1] and transport.sent[0]
    assert recent_jobs(redis_url) - before == {job["id"]}
