"""Webhooks through the real farm: a real HTTP receiver on localhost, a real webhook worker process."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from standardwebhooks import Webhook, WebhookVerificationError

from api.main import create_app
from schemas import keys
from schemas.settings import Settings
from tests.integration.conftest import farm_settings, wait_for
from webhooks.worker import deliver

pytestmark = pytest.mark.integration

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
HOOK_ENV = {
    "RERANK_WEBHOOK_SECRET": SECRET,
    "RERANK_WEBHOOK_ALLOWLIST": "127.0.0.1",
    "RERANK_WEBHOOK_RETRY_DELAYS": "0.3,0.3,0.3",
    "RERANK_WEBHOOK_DISPATCH_INTERVAL_S": "0.1",
}


class Receiver:
    """An HTTP server that records every delivery and answers with the next scripted status (then 200)."""

    def __init__(self) -> None:
        self.deliveries: list[dict[str, Any]] = []
        self.script: dict[str, list[int]] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                path = self.path
                receiver.deliveries.append({"path": path, "headers": dict(self.headers.items()), "body": body})
                codes = receiver.script.get(path) or [200]
                status = codes.pop(0) if len(codes) > 1 or receiver.script.get(path) else 200
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def at(self, path: str) -> list[dict[str, Any]]:
        return [d for d in self.deliveries if d["path"] == path]

    def wait(self, path: str, count: int, timeout: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.at(path)) < count:
            assert time.monotonic() < deadline, f"{len(self.at(path))} deliveries to {path}, wanted {count}"
            time.sleep(0.05)
        return self.at(path)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


def _log_tail(log_dir) -> str:
    return (log_dir / "webhooks.log").read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def webhook_worker(redis_url: str, tiny_model_dir, log_dir) -> Iterator[None]:
    import os
    import signal
    import subprocess
    import sys

    env = dict(os.environ, RERANK_REDIS_URL=redis_url, **HOOK_ENV)
    with (log_dir / "webhooks.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "rerankfarm.cli", "webhooks"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 60
    while "webhooks@" not in (log_dir / "webhooks.log").read_text() or " ready." not in _log_tail(log_dir):
        assert process.poll() is None and time.monotonic() < deadline, _log_tail(log_dir)
        time.sleep(0.2)
    yield
    process.send_signal(signal.SIGTERM)
    process.wait(30)


@pytest.fixture
def hooks_client(redis_url: str, tiny_model_dir) -> Iterator[TestClient]:
    settings = farm_settings(redis_url, tiny_model_dir, webhook_secret=SECRET, webhook_allowlist="127.0.0.1")
    with TestClient(create_app(settings)) as c:
        yield c


def _submit(client: TestClient, url: str, **extra: Any) -> dict[str, Any]:
    body = {"requests": [{"query": "w1 w2", "documents": ["w3 w4", "w5", "w6 w7 w8"]}], "webhook": {"url": url}}
    r = client.post("/v1/jobs", json={**body, **extra})
    assert r.status_code == 202, r.text
    return r.json()


def test_one_verified_delivery_per_final_state(hooks_client, worker, webhook_worker, receiver) -> None:
    path = f"/hook/{uuid.uuid4().hex}"
    job = _submit(hooks_client, receiver.url(path))
    assert wait_for(hooks_client, job["id"])["status"] == "succeeded"
    [delivery] = receiver.wait(path, 1)
    payload = Webhook(SECRET).verify(delivery["body"], delivery["headers"])
    assert payload["type"] == "job.succeeded" and payload["data"]["id"] == job["id"]
    assert payload["data"]["results_url"].endswith(f"/v1/jobs/{job['id']}/results")
    assert [len(r["results"]) for r in payload["data"]["results"]] == [3]  # small job: results inline
    time.sleep(1.5)
    assert len(receiver.at(path)) == 1  # exactly one
    shown = hooks_client.get(f"/v1/jobs/{job['id']}").json()["webhook"]
    assert shown["state"] == "delivered" and [a["status_code"] for a in shown["attempts"]] == [200]

    altered = delivery["body"].replace(b"succeeded", b"failed")
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(altered, delivery["headers"])


def test_cancelled_job_sends_job_cancelled(hooks_client, webhook_worker, receiver) -> None:
    path = f"/hook/{uuid.uuid4().hex}"
    docs = [" ".join(f"w{i % 500}" for i in range(k, k + 300)) for k in range(1500)]  # big: still running
    body = {"requests": [{"query": "w1", "documents": docs}], "webhook": {"url": receiver.url(path)}, "priority": 0}
    job = hooks_client.post("/v1/jobs", json=body).json()
    hooks_client.post(f"/v1/jobs/{job['id']}/cancel")
    [delivery] = receiver.wait(path, 1)
    payload = Webhook(SECRET).verify(delivery["body"], delivery["headers"])
    assert payload["type"] == "job.cancelled" and payload["data"]["status"] == "cancelled"
    assert "results" not in payload["data"]


def test_failing_receiver_gets_the_event_again_with_the_same_id(hooks_client, worker, webhook_worker, receiver) -> None:
    path = f"/hook/{uuid.uuid4().hex}"
    receiver.script[path] = [500, 503, 200]
    job = _submit(hooks_client, receiver.url(path))
    deliveries = receiver.wait(path, 3)
    assert len({d["headers"]["webhook-id"] for d in deliveries}) == 1
    for d in deliveries:
        Webhook(SECRET).verify(d["body"], d["headers"])
    deadline = time.monotonic() + 10
    while (shown := hooks_client.get(f"/v1/jobs/{job['id']}").json()["webhook"])["state"] != "delivered":
        assert time.monotonic() < deadline, shown
        time.sleep(0.1)
    assert [a["status_code"] for a in shown["attempts"]] == [500, 503, 200]
    time.sleep(1)
    assert len(receiver.at(path)) == 3


def test_gone_stops_and_redeliver_sends_again(hooks_client, worker, webhook_worker, receiver) -> None:
    path = f"/hook/{uuid.uuid4().hex}"
    receiver.script[path] = [410, 200]
    job = _submit(hooks_client, receiver.url(path))
    receiver.wait(path, 1)
    time.sleep(1.5)
    shown = hooks_client.get(f"/v1/jobs/{job['id']}").json()["webhook"]
    assert shown["state"] == "gone" and len(receiver.at(path)) == 1
    r = hooks_client.post(f"/v1/jobs/{job['id']}/webhook/redeliver")
    assert r.status_code == 202
    first, again = receiver.wait(path, 2)
    assert first["headers"]["webhook-id"] == again["headers"]["webhook-id"]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.1/",
        "http://localhost:9/",
        "http://[::1]/",
        "http://192.168.1.10/",
        "ftp://example.com/",
        "http://0.0.0.0/",
    ],
)
def test_webhooks_inside_the_network_are_refused_at_submit(redis_url, tiny_model_dir, url) -> None:
    settings = farm_settings(redis_url, tiny_model_dir, webhook_secret=SECRET)  # no allow-list
    with TestClient(create_app(settings)) as c:
        r = c.post("/v1/jobs", json={"requests": [{"query": "w1", "documents": ["w2"]}], "webhook": {"url": url}})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["message"].startswith("webhook.url:")


def test_webhooks_need_a_secret(redis_url, tiny_model_dir) -> None:
    with TestClient(create_app(farm_settings(redis_url, tiny_model_dir))) as c:
        r = c.post(
            "/v1/jobs",
            json={"requests": [{"query": "w1", "documents": ["w2"]}], "webhook": {"url": "https://example.com/hook"}},
        )
    assert r.status_code == 422 and "RERANK_WEBHOOK_SECRET" in r.json()["error"]["message"]


def test_address_is_checked_again_at_delivery(redis_url, receiver) -> None:
    # Allowed when submitted (say the allow-list changed since, or DNS now answers a private address): refused now.
    client = redis.Redis.from_url(redis_url)
    job_id = f"job_{uuid.uuid4().hex}"
    client.hset(
        keys.job_key(job_id),
        mapping={
            "id": job_id,
            "status": "succeeded",
            "priority": 5,
            "created_at": "2026-11-22T00:00:00+00:00",
            "total": 1,
            "completed": 1,
            "chunks_total": 1,
            "chunks_done": 1,
            "request_count": 1,
            "metadata": "null",
            "webhook_url": receiver.url("/never"),
            "webhook_events": json.dumps(["job.succeeded"]),
            "webhook_event": "job.succeeded",
            "webhook_state": "pending",
            "webhook_attempt": 0,
        },
    )
    client.zadd(keys.WEBHOOKS_DUE, {job_id: 0})
    failed_before = REGISTRY.get_sample_value("rerank_webhook_deliveries_total", {"outcome": "failed"}) or 0.0
    state = deliver(client, Settings(redis_url=redis_url, webhook_secret=SECRET, webhook_allowlist=""), job_id)
    assert state == "failed" and receiver.at("/never") == []
    assert REGISTRY.get_sample_value("rerank_webhook_deliveries_total", {"outcome": "failed"}) == failed_before + 1
    attempt = json.loads(client.lrange(keys.job_webhook_attempts_key(job_id), 0, -1)[0])
    assert "non-public" in attempt["error"]
    assert client.zscore(keys.WEBHOOKS_DUE, job_id) is None
