"""Every move of a job's state, on fakeredis (with Lua): the scripts of `store.job_state`, and the API store's
submit when enqueueing fails. Pure logic, so a change to them is checked in seconds."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import fakeredis
import pytest

from schemas import keys
from schemas.chunks import ChunkResult
from schemas.jobs import JobCreate, JobStatus
from schemas.settings import Settings
from store import job_state
from store.job_state import JobRecord


def new_job(r: fakeredis.FakeRedis, job_id: str = "job_1", tenant: str = "acme", chunks: int = 2, **extra: Any):
    record = JobRecord(
        id=job_id,
        tenant=tenant,
        kind="bulk",
        priority=5,
        created_at=job_state.now_iso(),
        total=chunks * 2,
        chunks_total=chunks,
        request_count=1,
        **extra,
    )
    r.hset(keys.job_key(job_id), mapping=record.to_hash())
    r.sadd(keys.tenant_inflight_key(tenant), job_id)
    return record


def record(r: fakeredis.FakeRedis, scripts: job_state.Scripts, index: int, job_id: str = "job_1") -> str:
    result = ChunkResult(scores=[0.5, 0.25], tokens=10)
    move = job_state.record_chunk(job_id, "acme", index, result.model_dump_json(), 2, "w@h", 10, 3600)
    return scripts.run(move).decode()


@pytest.fixture
def r() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


@pytest.fixture
def scripts(r) -> job_state.Scripts:
    return job_state.Scripts(r)


def stored(r: fakeredis.FakeRedis, job_id: str = "job_1") -> JobRecord:
    return JobRecord.from_hash(r.hgetall(keys.job_key(job_id)))


def test_record_round_trips_through_the_hash(r) -> None:
    written = new_job(r, metadata=json.dumps({"team": "search"}), webhook_url="https://h.example/x")
    assert stored(r) == written
    job = stored(r).to_job({"w@h": 4})
    assert job.status is JobStatus.queued and job.metadata == {"team": "search"} and job.workers == {"w@h": 4}
    assert job.progress.total == 4 and job.error is None


def take(scripts: job_state.Scripts, index: int, job_id: str = "job_1", seq: int = 1) -> list[Any]:
    return scripts.run(job_state.take(job_id, index, "w@h", "rerank.bulk:4", seq))


def test_chunks_move_a_job_from_queued_to_running_to_succeeded_counting_each_once(r, scripts) -> None:
    new_job(r)
    r.hset(keys.job_chunks_key("job_1"), mapping={0: "input 0", 1: "input 1"})
    r.zadd(keys.CHUNKS_OPEN, {"job_1:0": 1.0, "job_1:1": 1.0})
    assert take(scripts, 0) == [b"taken", b"input 0", 1]  # the first take starts the job
    assert stored(r).status == "running" and stored(r).started_at
    assert take(scripts, 1, seq=2)[2] == 0  # only once
    assert record(r, scripts, 0) == "recorded"
    assert r.zscore(keys.CHUNKS_OPEN, "job_1:0") is None  # recorded: no longer open
    assert take(scripts, 0) == [b"duplicate"]
    assert record(r, scripts, 0) == "duplicate"  # a redelivered chunk counts once
    assert stored(r).completed == 2 and stored(r).chunks_done == 1
    assert record(r, scripts, 1) == "finished"
    done = stored(r)
    assert done.status == "succeeded" and done.completed == 4 and done.tokens == 20 and done.finished_at
    assert r.hgetall(keys.job_workers_key("job_1")) == {b"w@h": b"4"}
    assert not r.sismember(keys.tenant_inflight_key("acme"), "job_1")  # the tenant's slot is free again
    assert record(r, scripts, 1) == "duplicate"
    assert record(r, scripts, 0, job_id="job_gone") == "missing"


def test_take_marks_the_holder_vouches_for_the_chunk_and_raises_the_lanes_mark(r, scripts) -> None:
    new_job(r)
    r.hset(keys.job_chunks_key("job_1"), mapping={0: "input 0"})
    r.zadd(keys.CHUNKS_OPEN, {"job_1:0": 1.0})
    assert take(scripts, 0, seq=7)[0] == b"taken"
    ledger = r.hgetall(keys.job_ledger_key("job_1"))
    assert ledger[b"0:holder"] == b"w@h" and ledger[b"0:taken_at"]
    assert r.zscore(keys.CHUNKS_OPEN, "job_1:0") > 1.0
    assert r.hget(keys.lane_key("rerank.bulk:4"), "taken") == b"7"
    assert take(scripts, 0, seq=3)[0] == b"taken"  # an older message of the lane leaves the mark where it was
    assert r.hget(keys.lane_key("rerank.bulk:4"), "taken") == b"7"
    assert take(scripts, 0, job_id="job_gone") == [b"gone"]
    assert scripts.run(job_state.cancel("job_1", "acme")) == 1
    assert take(scripts, 0, seq=9) == [b"cancelled"]  # a final job's chunks need no scoring
    assert r.hget(keys.lane_key("rerank.bulk:4"), "taken") == b"9"  # the lane moved on all the same


def test_a_final_move_drops_the_ledger_and_the_inputs_unless_results_echo_them(r, scripts) -> None:
    for job_id, keep in (("job_1", 0), ("job_2", 1)):
        new_job(r, job_id=job_id, keep_input=keep)
        r.hset(keys.job_chunks_key(job_id), mapping={0: "input 0"})
        r.hset(keys.job_ledger_key(job_id), mapping={"0:sends": 1})
        assert scripts.run(job_state.cancel(job_id, "acme")) == 1
        assert not r.exists(keys.job_ledger_key(job_id))
        assert bool(r.exists(keys.job_chunks_key(job_id))) == bool(keep)


@pytest.mark.parametrize("move", ["fail", "cancel"])
def test_a_final_move_frees_the_slot_wakes_the_waiter_and_schedules_the_webhook(r, scripts, move) -> None:
    events = json.dumps(["job.failed", "job.cancelled"])
    new_job(r, notify=1, webhook_url="https://h.example/x", webhook_events=events)
    m = job_state.fail("job_1", "acme", "engine_error", "boom") if move == "fail" else job_state.cancel("job_1", "acme")
    assert scripts.run(m) == 1
    status = "failed" if move == "fail" else "cancelled"
    done = stored(r)
    assert done.status == status and done.finished_at
    assert (done.error_code, done.error_message) == (("engine_error", "boom") if move == "fail" else ("", ""))
    assert not r.sismember(keys.tenant_inflight_key("acme"), "job_1")
    assert r.lrange(keys.job_done_key("job_1"), 0, -1) == [status.encode()]
    assert 0 < r.ttl(keys.job_done_key("job_1")) <= keys.DONE_TTL_S
    assert (done.webhook_event, done.webhook_state) == (f"job.{status}", "pending")
    assert r.zscore(keys.WEBHOOKS_DUE, "job_1") is not None
    assert scripts.run(m) == 0  # a final job does not move again
    assert r.llen(keys.job_done_key("job_1")) == 1


def test_no_done_list_without_a_waiter_and_no_webhook_for_an_event_not_asked(r, scripts) -> None:
    new_job(r, webhook_url="https://h.example/x", webhook_events=json.dumps(["job.succeeded"]))
    assert scripts.run(job_state.cancel("job_1", "acme")) == 1
    assert r.llen(keys.job_done_key("job_1")) == 0
    assert stored(r).webhook_state == "" and r.zscore(keys.WEBHOOKS_DUE, "job_1") is None


def test_a_succeeded_job_cannot_be_cancelled_or_failed(r, scripts) -> None:
    new_job(r, chunks=1)
    assert record(r, scripts, 0) == "finished"
    assert scripts.run(job_state.cancel("job_1", "acme")) == 0
    assert scripts.run(job_state.fail("job_1", "acme", "x", "y")) == 0
    assert stored(r).status == "succeeded"


class _UnreachableQueue:
    """A Celery app whose broker refuses every message: enqueueing fails after the job was admitted."""

    def producer_or_acquire(self) -> Any:
        import contextlib

        return contextlib.nullcontext(None)

    def send_task(self, *args: Any, **kwargs: Any) -> None:
        raise ConnectionError("broker unreachable")


def test_enqueue_failure_ends_the_job_through_the_one_final_path() -> None:
    """The job fails through FINISH: its tenant's in-flight slot is freed (not held for the result TTL), a waiter is
    woken and the webhook scheduled, and the caller gets 503."""
    from api.job_store import JobStore
    from schemas.errors import Unavailable

    async def scenario() -> tuple[str, JobRecord, fakeredis.aioredis.FakeRedis]:
        server = fakeredis.FakeServer()
        client = fakeredis.aioredis.FakeRedis(server=server)
        settings = Settings(auth="off", rate_limit_per_minute=0, redis_replica_wait_ms=0)
        store = JobStore(client, _UnreachableQueue(), settings, client)  # type: ignore[arg-type]
        body = JobCreate.model_validate({"requests": [{"query": "q", "documents": ["a", "b"]}]})
        with pytest.raises(Unavailable):
            await store.submit(body, "acme", interactive=True)
        [job_id] = [k.decode().split(":")[2] for k in await client.keys("rerank:job:*") if k.count(b":") == 2]
        return job_id, JobRecord.from_hash(await client.hgetall(keys.job_key(job_id))), client

    job_id, rec, client = asyncio.run(scenario())
    assert rec.status == "failed" and rec.error_code == "enqueue_failed" and rec.finished_at

    async def after() -> tuple[int, list[bytes]]:
        return (
            await client.scard(keys.tenant_inflight_key("acme")),
            await client.lrange(keys.job_done_key(job_id), 0, -1),
        )

    inflight, done = asyncio.run(after())
    assert inflight == 0  # before the fix: 1, for a day
    assert done == [b"failed"]  # the interactive waiter hears of it at once


def test_the_api_sees_every_field_of_the_record() -> None:
    from datetime import datetime

    attempt = json.dumps({"attempt": 1, "at": "2026-11-23T10:00:00+00:00", "status_code": 503, "error": None})
    record = JobRecord(
        id="job_2",
        tenant="acme",
        kind="interactive",
        priority=9,
        created_at="2026-11-23T10:00:00+00:00",
        started_at="2026-11-23T10:00:01+00:00",
        finished_at="2026-11-23T10:00:02+00:00",
        total=7,
        chunks_total=2,
        request_count=3,
        status="failed",
        completed=5,
        tokens=321,
        metadata=json.dumps({"k": "v"}),
        error_code="engine_error",
        error_message="boom",
        webhook_url="https://h.example/x",
        webhook_events=json.dumps(["job.failed"]),
        webhook_event="job.failed",
        webhook_state="pending",
    )
    job = JobRecord.from_hash(record.to_hash()).to_job({"w@h": 5}, [attempt])
    assert (job.id, job.status, job.kind, job.priority, job.tokens, job.request_count) == (
        "job_2",
        JobStatus.failed,
        "interactive",
        9,
        321,
        3,
    )
    assert job.created_at == datetime.fromisoformat("2026-11-23T10:00:00+00:00")
    assert job.started_at == datetime.fromisoformat("2026-11-23T10:00:01+00:00")
    assert job.finished_at == datetime.fromisoformat("2026-11-23T10:00:02+00:00")
    assert (job.progress.completed, job.progress.total) == (5, 7)
    assert job.metadata == {"k": "v"} and job.workers == {"w@h": 5}
    assert job.error is not None and (job.error.code, job.error.message) == ("engine_error", "boom")
    assert job.webhook is not None
    assert (job.webhook.url, job.webhook.events, job.webhook.state, job.webhook.event) == (
        "https://h.example/x",
        ["job.failed"],
        "pending",
        "job.failed",
    )
    assert [(a.attempt, a.status_code) for a in job.webhook.attempts] == [(1, 503)]


def test_a_fresh_record_shows_nothing_it_does_not_have() -> None:
    job = JobRecord(id="job_3", priority=5, created_at="2026-11-23T10:00:00+00:00", total=1, chunks_total=1,
                    request_count=1).to_job()  # fmt: skip
    assert job.kind == "bulk" and job.status is JobStatus.queued
    assert job.started_at is None and job.finished_at is None and job.error is None and job.webhook is None
    assert job.metadata is None and job.workers == {}
    assert JobRecord(id="j", priority=5, created_at="2026-11-23T10:00:00+00:00", total=1, chunks_total=1,
                     request_count=1, metadata="").to_job().metadata is None  # fmt: skip
    assert "started_at" not in JobRecord(id="j", priority=5, created_at="t", total=1, chunks_total=1,
                                         request_count=1).to_hash()  # fmt: skip


def test_moves_address_the_jobs_keys_and_the_tenants_in_flight_set() -> None:
    move = job_state.cancel("job_9", "acme")
    assert move.keys == [
        keys.job_key("job_9"),
        keys.job_scores_key("job_9"),
        keys.job_workers_key("job_9"),
        keys.job_input_key("job_9"),
        keys.job_done_key("job_9"),
        keys.WEBHOOKS_DUE,
        keys.tenant_inflight_key("acme"),
        keys.job_chunks_key("job_9"),
        keys.job_ledger_key("job_9"),
        keys.CHUNKS_OPEN,
    ]
    assert move.args[:3] == ["cancelled", "", ""] and move.args[-1] == keys.DONE_TTL_S
    failed = job_state.fail("job_9", "acme", "code", "m" * 5000)
    assert failed.args[:2] == ["failed", "code"] and failed.args[2] == "m" * 2000  # long messages are cut
    assert job_state.as_str(b"x") == "x" and job_state.as_str(3) == "3"
    assert job_state.now_iso().endswith("+00:00")


def test_a_job_keeps_its_slowest_chunks_timings_and_its_queue_time(r, scripts) -> None:
    """Chunks run in parallel: the caller's tokenization and inference times are the slowest chunk's, and a chunk
    recorded twice does not move them."""
    new_job(r, chunks=3)
    r.hset(keys.job_chunks_key("job_1"), mapping={0: "input 0", 1: "input 1", 2: "input 2"})
    assert stored(r).to_job().timings is None  # not started: no worker took a chunk yet
    take(scripts, 0)
    for index, tokenize_ms, inference_ms in ((0, 5, 300), (1, 9, 120), (1, 50, 900)):
        result = ChunkResult(scores=[0.5, 0.25], tokens=10).model_dump_json()
        move = job_state.record_chunk("job_1", "acme", index, result, 2, "w@h", 10, 3600, tokenize_ms, inference_ms)
        scripts.run(move)
    timings = stored(r).to_job().timings
    assert timings is not None and (timings.tokenization_ms, timings.inference_ms) == (9, 300)
    assert 0 <= timings.queue_ms < 5000
