"""API keys and tenants, and pushing back instead of falling over."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import redis
from fastapi.testclient import TestClient

from api.main import create_app
from schemas import keys
from schemas.settings import Settings
from store import api_keys as auth
from store import webhook_secrets
from store.queueing import bulk_queue_keys
from tests.conftest import TINY
from tests.integration.conftest import farm_settings, wait_for

pytestmark = pytest.mark.integration

JOB = {"requests": [{"query": "w1 w2", "documents": ["w3", "w4 w5"]}]}


def _key(redis_url: str, tenant: str) -> str:
    """A key made with the CLI, as an operator does."""
    env = dict(os.environ, RERANK_REDIS_URL=redis_url)
    out = subprocess.run(
        [sys.executable, "-m", "rerankfarm.cli", "keys", "create", "--tenant", tenant],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    [key] = [line for line in out.splitlines() if line.startswith("rk_")]
    return key


def test_keys_create_shows_the_tenants_webhook_secret_once(redis_url) -> None:
    env = dict(os.environ, RERANK_REDIS_URL=redis_url)
    tenant = f"dave-{time.time_ns()}"
    command = [sys.executable, "-m", "rerankfarm.cli", "keys", "create", "--tenant", tenant]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    [secret] = [line for line in first.splitlines() if line.startswith("whsec_")]
    assert not any(line.startswith("whsec_") for line in second.splitlines())  # shown once, with the first key
    assert "has a webhook signing secret already" in second
    stored = redis.Redis.from_url(redis_url).hget(keys.WEBHOOK_SECRETS, tenant)
    assert webhook_secrets.signing_secrets(Settings(), stored) == [secret]
    rotate = [sys.executable, "-m", "rerankfarm.cli", "keys", "webhook-secret", "--tenant", tenant, "--overlap", "60"]
    out = subprocess.run(rotate, env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    [new] = [line for line in out.splitlines() if line.startswith("whsec_")]
    stored = redis.Redis.from_url(redis_url).hget(keys.WEBHOOK_SECRETS, tenant)
    assert webhook_secrets.signing_secrets(Settings(), stored) == [new, secret]  # both sign during the overlap


def test_keys_map_to_tenants_and_tenants_never_see_each_other(redis_url, tiny_model_dir, worker) -> None:
    alice, bob = _key(redis_url, "alice"), _key(redis_url, "bob")
    client = redis.Redis.from_url(redis_url)
    stored = client.hgetall(auth.API_KEYS)
    assert alice.encode() not in b"".join(list(stored) + list(stored.values()))  # only the hash is kept
    with TestClient(create_app(farm_settings(redis_url, tiny_model_dir, auth="on"))) as c:
        assert c.post("/v1/jobs", json=JOB).status_code == 401
        r = c.post("/v1/jobs", json=JOB, headers={"authorization": "Bearer rk_wrong"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.post("/v1/rerank", json={"query": "w1", "documents": ["w2"]}).status_code == 401
        a, b = {"authorization": f"Bearer {alice}"}, {"authorization": f"Bearer {bob}"}
        job = c.post("/v1/jobs", json=JOB, headers=a).json()
        assert wait_for_as(c, job["id"], a)["status"] == "succeeded"
        assert c.get(f"/v1/jobs/{job['id']}/results", headers=a).status_code == 200
        for method, path in [("GET", ""), ("GET", "/results"), ("POST", "/cancel"), ("POST", "/webhook/redeliver")]:
            r = c.request(method, f"/v1/jobs/{job['id']}{path}", headers=b)
            assert r.status_code == 404, (method, path, r.text)
        assert [j["id"] for j in c.get("/v1/jobs", headers=b).json()["data"]] == []
        assert job["id"] in [j["id"] for j in c.get("/v1/jobs", headers=a).json()["data"]]
        assert c.post("/v1/rerank", json={"query": "w1", "documents": ["w2"]}, headers=b).status_code == 200
        assert c.get("/openapi.json").status_code == 200  # docs public by default
        [alice_id] = [i["id"] for i in auth.list_keys(client) if i["tenant"] == "alice"][-1:]
        env = dict(os.environ, RERANK_REDIS_URL=redis_url)
        subprocess.run(
            [sys.executable, "-m", "rerankfarm.cli", "keys", "revoke", alice_id],
            env=env,
            check=True,
            capture_output=True,
            timeout=60,
        )
        assert c.get(f"/v1/jobs/{job['id']}", headers=a).status_code == 401


def wait_for_as(c: TestClient, job_id: str, headers: dict[str, str]) -> dict:
    deadline = time.monotonic() + 60
    while (job := c.get(f"/v1/jobs/{job_id}", headers=headers).json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    return job


def test_docs_can_be_protected(redis_url, tiny_model_dir) -> None:
    key = _key(redis_url, "carol")
    settings = farm_settings(redis_url, tiny_model_dir, auth="on", docs_public=False)
    with TestClient(create_app(settings)) as c:
        assert c.get("/openapi.json").status_code == 401
        assert c.get("/docs").status_code == 401
        assert c.get("/openapi.json", headers={"authorization": f"Bearer {key}"}).json()["info"]["title"]
        assert c.get("/healthz").status_code == 200  # probes stay open


def test_body_size_limit_is_413(redis_url, tiny_model_dir) -> None:
    with TestClient(create_app(farm_settings(redis_url, tiny_model_dir, max_body_bytes=2048))) as c:
        big = {"requests": [{"query": "w1", "documents": ["w2 " * 1000]}]}
        r = c.post("/v1/jobs", json=big)
        assert r.status_code == 413 and "2048 bytes" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "too_large"
        assert c.post("/v1/jobs", json=JOB).status_code == 202
        # through the error table: in the caller's shape (as far as the unread body allows), and counted
        voyage = c.post("/v1/rerank", json={"query": "q", "documents": ["w " * 2000]},
                        headers={"x-voyage-client-user-agent": "voyage-python"})  # fmt: skip
        assert voyage.status_code == 413 and "2048 bytes" in voyage.json()["detail"]
        assert 'rerank_request_failures_total{cause="too_large"}' in c.get("/metrics").text


def test_limits_answer_429_with_retry_after_and_leave_the_queue_alone(fresh_url, tiny_model_dir) -> None:
    url = fresh_url  # no worker: jobs stay queued
    with TestClient(create_app(farm_settings(url, tiny_model_dir, max_jobs_in_flight_per_tenant=2))) as c:
        first = [c.post("/v1/jobs", json=JOB).json() for _ in range(2)]
        r = c.post("/v1/jobs", json=JOB)
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
        assert "2 jobs" in r.json()["error"]["message"]
        c.post(f"/v1/jobs/{first[0]['id']}/cancel")  # a job that ends frees its slot
        assert c.post("/v1/jobs", json=JOB).status_code == 202
    client = redis.Redis.from_url(url)
    depth = sum(client.llen(k) for k in bulk_queue_keys(TINY))
    with TestClient(create_app(farm_settings(url, tiny_model_dir, max_queue_depth=depth + 1))) as c:
        r = c.post("/v1/jobs", json={"requests": [{"query": "w1", "documents": ["w2"] * 12}]})  # 3 chunks of 5
        assert r.status_code == 429 and r.headers["retry-after"] == "30"
        assert sum(client.llen(k) for k in bulk_queue_keys(TINY)) == depth  # nothing was enqueued
    with TestClient(
        create_app(farm_settings(url, tiny_model_dir, rate_limit_per_minute=2, max_jobs_in_flight_per_tenant=100))
    ) as c:
        client.delete(keys.tenant_rate_key("default", int(time.time() // 60)))  # this minute's earlier submissions
        minute = int(time.time() // 60)
        codes = [c.post("/v1/jobs", json=JOB).status_code for _ in range(4)]
        if int(time.time() // 60) == minute:  # all four in one minute (else the counter started again)
            assert codes == [202, 202, 429, 429]  # exactly the limit gets through


def test_poison_input_fails_its_job_without_blocking_the_queue(client, worker) -> None:
    huge = " ".join(f"w{i % 500}" for i in range(9000))  # over the max length, and truncation is refused
    poison = client.post(
        "/v1/jobs", json={"requests": [{"query": "w1", "documents": [huge], "truncate": False}]}
    ).json()
    after = client.post("/v1/jobs", json=JOB).json()
    failed = wait_for(client, poison["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_input"
    assert "truncation is off" in failed["error"]["message"]
    assert wait_for(client, after["id"])["status"] == "succeeded"
