"""Webhooks through the real farm: real HTTP receivers on localhost (fast, failing, hanging), a real webhook worker
process, tenants with their own signing secrets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from standardwebhooks import Webhook, WebhookVerificationError

from api.main import create_app
from rerankfarm import RerankFarm, verify_webhook
from schemas import keys
from schemas.settings import Settings
from schemas.webhooks import destination
from store import api_keys, moves, webhook_queue, webhook_secrets
from store.webhook_queue import Claimed
from tests.integration.conftest import farm_settings
from tests.jobs import create_job
from webhooks.worker import Deliveries

pytestmark = pytest.mark.integration

FARM_SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # the farm-wide secret: authentication off only
HOOK_ENV = {
    "RERANK_AUTH": "on",  # each tenant's webhooks signed with its own secret
    "RERANK_WEBHOOK_ALLOWLIST": "127.0.0.1",
    "RERANK_WEBHOOK_RETRY_DELAYS": "0.3,0.3,0.3",
    "RERANK_WEBHOOK_DISPATCH_INTERVAL_S": "0.1",
    "RERANK_WEBHOOK_TIMEOUT_S": "4",
    "RERANK_WEBHOOK_LEASE_S": "5",  # a killed worker's delivery is taken again after 5 s
    "RERANK_WEBHOOK_BREAKER_FAILURES": "3",
    "RERANK_WEBHOOK_METRICS_PORT": "0",
}


class Receiver:
    """An HTTP server that records every delivery and answers with the next scripted status (then 200); `"hang"`
    holds the request until `release` is set."""

    def __init__(self) -> None:
        self.deliveries: list[dict[str, Any]] = []
        self.script: dict[str, list[int | str]] = {}
        self.always: dict[str, int | str] = {}
        self.release = threading.Event()
        self.holding = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                path = self.path
                receiver.deliveries.append(
                    {"path": path, "headers": dict(self.headers.items()), "body": body, "at": time.time()}
                )
                codes = receiver.script.get(path)
                answer = codes.pop(0) if codes else receiver.always.get(path, 200)
                if answer == "hang":
                    receiver.holding += 1
                    receiver.release.wait(60)
                    receiver.holding -= 1
                    answer = 200
                with contextlib.suppress(OSError):  # the worker may be gone (killed, timed out)
                    self.send_response(int(answer))
                    self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
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
    r.release.set()
    r.server.shutdown()
    r.server.server_close()


class WebhookWorker:
    """`rerankfarm webhooks` as a user starts it; `kill()` SIGKILLs it mid-work, `start()` starts it again."""

    def __init__(self, redis_url: str, log_dir: Path) -> None:
        self.env = dict(os.environ, RERANK_REDIS_URL=redis_url, **HOOK_ENV)
        self.log_path = log_dir / "webhooks.log"
        self.process: subprocess.Popen[bytes] | None = None

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def start(self) -> None:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "rerankfarm.cli", "webhooks"], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 60
        while " ready: " not in self.log_path.read_text(errors="replace")[offset:]:
            assert self.process.poll() is None and time.monotonic() < deadline, self.log_tail()
            time.sleep(0.1)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)


@pytest.fixture(scope="module")
def webhook_worker(redis_url: str, log_dir: Path) -> Iterator[WebhookWorker]:
    w = WebhookWorker(redis_url, log_dir)
    w.start()
    yield w
    w.stop()


@dataclass
class Tenant:
    name: str
    headers: dict[str, str]
    secret: str


def new_tenant(redis_url: str, prefix: str) -> Tenant:
    """A tenant with an API key and a webhook signing secret, as `rerankfarm keys create` makes them."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_url)
    key, _ = api_keys.create_key(client, name)
    made, move = webhook_secrets.rotate(name, 86400, only_if_none=True)
    assert moves.Runner(client)(move)
    return Tenant(name, {"authorization": f"Bearer {key}"}, made.secret)


@pytest.fixture
def hooks_client(redis_url: str, tiny_model_dir: Path) -> Iterator[TestClient]:
    settings = farm_settings(redis_url, tiny_model_dir, auth="on", webhook_allowlist="127.0.0.1")
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def alice(redis_url: str) -> Tenant:
    return new_tenant(redis_url, "alice")


@pytest.fixture
def bob(redis_url: str) -> Tenant:
    return new_tenant(redis_url, "bob")


def _submit(client: TestClient, tenant: Tenant, url: str, **extra: Any) -> dict[str, Any]:
    body = {"requests": [{"query": "w1 w2", "documents": ["w3 w4", "w5", "w6 w7 w8"]}], "webhook": {"url": url}}
    r = client.post("/v1/jobs", json={**body, **extra}, headers=tenant.headers)
    assert r.status_code == 202, r.text
    return r.json()


def _job(client: TestClient, tenant: Tenant, job_id: str) -> dict[str, Any]:
    return client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).json()


def _finished(client: TestClient, tenant: Tenant, job_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (job := _job(client, tenant, job_id))["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job


def _webhook_state(client: TestClient, tenant: Tenant, job_id: str, state: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while (shown := _job(client, tenant, job_id)["webhook"])["state"] != state:
        assert time.monotonic() < deadline, shown
        time.sleep(0.1)
    return shown


def test_one_delivery_per_final_state_signed_with_its_tenants_own_secret(
    hooks_client, worker, webhook_worker, receiver, alice, bob
) -> None:
    path = f"/hook/{uuid.uuid4().hex}"
    job = _submit(hooks_client, alice, receiver.url(path))
    assert _finished(hooks_client, alice, job["id"])["status"] == "succeeded"
    [delivery] = receiver.wait(path, 1)
    payload = Webhook(alice.secret).verify(delivery["body"], delivery["headers"])
    assert payload["type"] == "job.succeeded" and payload["data"]["id"] == job["id"]
    assert payload["data"]["results_url"].endswith(f"/v1/jobs/{job['id']}/results")
    assert [len(r["results"]) for r in payload["data"]["results"]] == [3]  # small job: results inline
    with pytest.raises(WebhookVerificationError):  # another tenant's secret cannot have signed it ...
        Webhook(bob.secret).verify(delivery["body"], delivery["headers"])
    forged = Webhook(bob.secret).sign(delivery["headers"]["webhook-id"], datetime.now(UTC), delivery["body"].decode())
    with pytest.raises(WebhookVerificationError):  # ... and what another tenant signs, alice's receiver refuses
        Webhook(alice.secret).verify(delivery["body"], {**delivery["headers"], "webhook-signature": forged})
    time.sleep(1.5)
    assert len(receiver.at(path)) == 1  # exactly one
    shown = _job(hooks_client, alice, job["id"])["webhook"]
    assert shown["state"] == "delivered" and [a["status_code"] for a in shown["attempts"]] == [200]
    altered = delivery["body"].replace(b"succeeded", b"failed")
    with pytest.raises(WebhookVerificationError):
        Webhook(alice.secret).verify(altered, delivery["headers"])


def test_cancelled_job_sends_job_cancelled(hooks_client, webhook_worker, receiver, alice) -> None:
    path = f"/hook/{uuid.uuid4().hex}"
    docs = [" ".join(f"w{i % 500}" for i in range(k, k + 300)) for k in range(1500)]  # big: still running
    body = {"requests": [{"query": "w1", "documents": docs}], "webhook": {"url": receiver.url(path)}, "priority": 0}
    job = hooks_client.post("/v1/jobs", json=body, headers=alice.headers).json()
    hooks_client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice.headers)
    [delivery] = receiver.wait(path, 1)
    payload = Webhook(alice.secret).verify(delivery["body"], delivery["headers"])
    assert payload["type"] == "job.cancelled" and payload["data"]["status"] == "cancelled"
    assert "results" not in payload["data"]


def test_failing_receiver_gets_the_event_again_with_the_same_id(
    hooks_client, worker, webhook_worker, receiver, alice
) -> None:
    path = f"/hook/{uuid.uuid4().hex}"
    receiver.script[path] = [500, 503, 200]
    job = _submit(hooks_client, alice, receiver.url(path))
    deliveries = receiver.wait(path, 3)
    assert len({d["headers"]["webhook-id"] for d in deliveries}) == 1
    for d in deliveries:
        Webhook(alice.secret).verify(d["body"], d["headers"])
    shown = _webhook_state(hooks_client, alice, job["id"], "delivered")
    assert [a["status_code"] for a in shown["attempts"]] == [500, 503, 200]
    time.sleep(1)
    assert len(receiver.at(path)) == 3


def test_gone_stops_and_redeliver_sends_again(hooks_client, worker, webhook_worker, receiver, alice) -> None:
    path = f"/hook/{uuid.uuid4().hex}"
    receiver.script[path] = [410, 200]
    job = _submit(hooks_client, alice, receiver.url(path))
    receiver.wait(path, 1)
    time.sleep(1.5)
    shown = _job(hooks_client, alice, job["id"])["webhook"]
    assert shown["state"] == "gone" and len(receiver.at(path)) == 1
    r = hooks_client.post(f"/v1/jobs/{job['id']}/webhook/redeliver", headers=alice.headers)
    assert r.status_code == 202
    first, again = receiver.wait(path, 2)
    assert first["headers"]["webhook-id"] == again["headers"]["webhook-id"]


def test_a_rotated_secret_signs_beside_the_old_one_for_its_window(
    hooks_client, worker, webhook_worker, receiver, alice
) -> None:
    before = hooks_client.get("/v1/webhooks/secret", headers=alice.headers).json()["secrets"]
    assert len(before) == 1 and "secret" not in before[0] and before[0]["expires_at"] is None  # never shown again
    r = hooks_client.post("/v1/webhooks/secret/rotate", json={"overlap_s": 600}, headers=alice.headers)
    assert r.status_code == 201, r.text
    rotated = r.json()
    new_secret = rotated["secret"]
    assert new_secret.startswith("whsec_") and new_secret != alice.secret
    assert [s["id"] for s in rotated["signing"]] == [rotated["id"], before[0]["id"]]
    assert rotated["signing"][1]["expires_at"] is not None  # the old one signs for its window only
    path = f"/hook/{uuid.uuid4().hex}"
    _submit(hooks_client, alice, receiver.url(path))
    [delivery] = receiver.wait(path, 1)
    assert len(delivery["headers"]["webhook-signature"].split()) == 2  # one signature per live secret
    verify_webhook(alice.secret, delivery["body"], delivery["headers"])  # receivers not yet switched
    verify_webhook(new_secret, delivery["body"], delivery["headers"])  # receivers switched
    hooks_client.headers.update(alice.headers)
    farm = RerankFarm(http=hooks_client)  # the Python client: rotate now, the old ones stop signing at once
    newest_rotation = farm.rotate_webhook_secret(overlap_s=0)
    newest = newest_rotation["secret"]
    assert [s["id"] for s in farm.webhook_secrets()["secrets"]] == [newest_rotation["id"]]
    path = f"/hook/{uuid.uuid4().hex}"
    _submit(hooks_client, alice, receiver.url(path))
    [delivery] = receiver.wait(path, 1)
    Webhook(newest).verify(delivery["body"], delivery["headers"])
    for old in (alice.secret, new_secret):
        with pytest.raises(WebhookVerificationError):
            Webhook(old).verify(delivery["body"], delivery["headers"])


def test_a_hanging_receiver_of_one_tenant_does_not_delay_another_tenants_event(
    hooks_client, worker, webhook_worker, receiver, alice, bob
) -> None:
    """Alice's 40 deliveries go to a receiver (another host) that never answers: each attempt hangs until it times
    out. Bob's event, due after all of them, still arrives within 5 s of his job's end, and at most the
    destination's cap of alice's attempts is under way at once."""
    stuck_receiver = Receiver()
    stuck, fast = "/stuck", f"/fast/{uuid.uuid4().hex}"
    stuck_receiver.always[stuck] = "hang"
    try:
        jobs = [_submit(hooks_client, alice, stuck_receiver.url(stuck)) for _ in range(40)]
        for job in jobs:
            _finished(hooks_client, alice, job["id"])
        stuck_receiver.wait(stuck, 4)  # alice's attempts hang
        job = _submit(hooks_client, bob, receiver.url(fast))
        finished = datetime.fromisoformat(_finished(hooks_client, bob, job["id"])["finished_at"]).timestamp()
        [delivery] = receiver.wait(fast, 1, timeout=30)
        late = delivery["at"] - finished
        print(f"bob's event arrived {late:.2f} s after his job ended, behind alice's 40 hanging deliveries")
        assert late < 5.0
        Webhook(bob.secret).verify(delivery["body"], delivery["headers"])
        # Attempts time out after 4 s: those that arrived within 4 s of each other were under way together.
        arrivals = sorted(d["at"] for d in stuck_receiver.at(stuck))
        assert max(sum(1 for b in arrivals if a <= b < a + 3.9) for a in arrivals) <= 4  # the destination's cap
    finally:
        stuck_receiver.release.set()
        stuck_receiver.server.shutdown()
        stuck_receiver.server.server_close()


def test_a_failing_destination_is_paused_and_its_attempts_recorded_as_not_sent(
    hooks_client, worker, webhook_worker, receiver, alice, bob
) -> None:
    broken = f"/broken/{uuid.uuid4().hex}"
    receiver.always[broken] = 500
    first = _submit(hooks_client, alice, receiver.url(broken))
    shown = _webhook_state(hooks_client, alice, first["id"], "failed")
    codes = [a["status_code"] for a in shown["attempts"]]
    assert codes == [500, 500, 500, None]  # 3 failures in a row pause it: the 4th is not sent
    assert "paused until" in shown["attempts"][3]["error"]
    second = _submit(hooks_client, alice, receiver.url(broken))
    shown = _webhook_state(hooks_client, alice, second["id"], "failed")
    assert all(a["status_code"] is None and "not sent" in a["error"] for a in shown["attempts"])
    assert len(receiver.at(broken)) == 3  # no request went to the paused destination
    path = f"/hook/{uuid.uuid4().hex}"  # bob's webhooks to the same host are not paused
    _submit(hooks_client, bob, receiver.url(path))
    receiver.wait(path, 1)
    receiver.always.pop(broken)


def test_a_webhook_worker_killed_mid_delivery_delivers_the_event_again_with_its_id(
    hooks_client, worker, webhook_worker, receiver, alice
) -> None:
    path = f"/hook/{uuid.uuid4().hex}"
    receiver.script[path] = ["hang"]  # the first attempt hangs: the worker dies during it
    receiver.release.clear()
    job = _submit(hooks_client, alice, receiver.url(path))
    receiver.wait(path, 1)
    webhook_worker.kill()
    receiver.release.set()
    webhook_worker.start()
    first, again = receiver.wait(path, 2, timeout=30)  # taken again once its lease (5 s) ends
    assert first["headers"]["webhook-id"] == again["headers"]["webhook-id"]
    Webhook(alice.secret).verify(again["body"], again["headers"])
    shown = _webhook_state(hooks_client, alice, job["id"], "delivered")
    assert [a["status_code"] for a in shown["attempts"]] == [200]  # the killed attempt was never recorded
    time.sleep(6)
    assert len(receiver.at(path)) == 2  # and not sent a third time


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
    settings = farm_settings(redis_url, tiny_model_dir, webhook_secret=FARM_SECRET)  # no allow-list
    with TestClient(create_app(settings)) as c:
        r = c.post("/v1/jobs", json={"requests": [{"query": "w1", "documents": ["w2"]}], "webhook": {"url": url}})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["message"].startswith("webhook.url:")


def test_webhooks_need_a_secret_to_sign_them(redis_url, tiny_model_dir) -> None:
    body = {"requests": [{"query": "w1", "documents": ["w2"]}], "webhook": {"url": "https://example.com/hook"}}
    with TestClient(create_app(farm_settings(redis_url, tiny_model_dir))) as c:  # auth off, no farm-wide secret
        r = c.post("/v1/jobs", json=body)
        assert r.status_code == 422 and "RERANK_WEBHOOK_SECRET" in r.json()["error"]["message"]
        assert c.post("/v1/webhooks/secret/rotate").status_code == 409  # no tenants' secrets without auth
    client = redis.Redis.from_url(redis_url)
    name = f"nosecret-{uuid.uuid4().hex[:8]}"
    key, _ = api_keys.create_key(client, name)  # a key, and no secret yet
    body["webhook"] = {"url": "http://127.0.0.1:9/hook"}
    settings = farm_settings(redis_url, tiny_model_dir, auth="on", webhook_allowlist="127.0.0.1")
    with TestClient(create_app(settings)) as c:
        headers = {"authorization": f"Bearer {key}"}
        r = c.post("/v1/jobs", json=body, headers=headers)
        assert r.status_code == 422 and "no webhook signing secret" in r.json()["error"]["message"]
        assert c.get("/v1/webhooks/secret", headers=headers).json() == {"secrets": []}
        made = c.post("/v1/webhooks/secret/rotate", headers=headers)
        assert made.status_code == 201 and made.json()["secret"].startswith("whsec_")
        r = c.post("/v1/jobs", json=body, headers=headers)
        assert r.status_code == 202, r.text
        c.post(f"/v1/jobs/{r.json()['id']}/cancel", headers=headers)


def test_address_is_checked_again_at_delivery_and_a_paused_destination_shows(
    redis_url, tiny_model_dir, receiver
) -> None:
    # Allowed when submitted (say the allow-list changed since, or DNS now answers a private address): refused now.
    client = redis.Redis.from_url(redis_url)
    url = receiver.url("/never")
    job_id = create_job(client, chunks=1, pairs_per_chunk=1, status="succeeded", completed=1, chunks_done=1,
                        webhook_url=url, webhook_dest=destination(url), webhook_events=json.dumps(["job.succeeded"]),
                        webhook_event="job.succeeded", webhook_state="pending").id  # fmt: skip
    # A paused destination shows in the job while its webhook is pending.
    field = webhook_queue.breaker_field("default", destination(url))
    client.hset(keys.WEBHOOK_BREAKER, field, f"3 {time.time() + 60:.3f} {time.time():.3f}")
    with TestClient(create_app(farm_settings(redis_url, tiny_model_dir))) as c:
        assert c.get(f"/v1/jobs/{job_id}").json()["webhook"]["paused_until"] is not None
    client.hdel(keys.WEBHOOK_BREAKER, field)

    failed_before = _deliveries("failed", "default")
    settings = Settings(redis_url=redis_url, auth="off", webhook_secret=FARM_SECRET, webhook_allowlist="")
    claimed = Claimed(job_id, "default", destination(url), None)

    async def deliver() -> str:
        aclient = aioredis.from_url(redis_url)
        try:
            return await Deliveries(aclient, settings, 1).deliver(claimed)
        finally:
            await aclient.aclose()

    assert asyncio.run(deliver()) == "failed" and receiver.at("/never") == []
    assert _deliveries("failed", "default") == failed_before + 1
    attempt = json.loads(client.lrange(keys.job_webhook_attempts_key(job_id), 0, -1)[0])
    assert "non-public" in attempt["error"]
    assert client.zscore(keys.webhooks_due_key("default"), job_id) is None


def _deliveries(outcome: str, tenant: str) -> float:
    return REGISTRY.get_sample_value("rerank_webhook_deliveries_total", {"outcome": outcome, "tenant": tenant}) or 0.0
