"""Every move of a job's state, on fakeredis (with Lua): the scripts of `store.job_state`, and the API store's
submit when enqueueing fails. Pure logic, so a change to them is checked in seconds."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import fakeredis
import pytest

from schemas import keys
from schemas.chunks import Chunk, ChunkResult, Segment
from schemas.jobs import JobCreate, JobStatus
from schemas.settings import Settings
from schemas.webhooks import WebhookAttempt, WebhookState
from store import codec, job_state, moves
from store.job_state import JobHandle, JobRecord, Taken
from tests.jobs import create_job


def new_job(r: fakeredis.FakeRedis, job_id: str = "job_1", tenant: str = "acme", chunks: int = 2, **extra: Any):
    return create_job(r, job_id, chunks, tenant=tenant, **extra)


def record(r: fakeredis.FakeRedis, run: moves.Runner, index: int, job_id: str = "job_1") -> str:
    result = ChunkResult(scores=[0.5, 0.25], tokens=10)
    move = JobHandle(job_id, "acme").record_chunk(index, result.model_dump_json(), 2, "w@h", 10, 3600)
    return run(move).outcome


def chunk(index: int, job_id: str = "job_1") -> Chunk:
    return Chunk(
        job_id=job_id,
        index=index,
        priority=5,
        segments=[Segment(request=0, query="q", instruction=None, documents=["a", "b"])],
    )


def store_chunks(r: fakeredis.FakeRedis, count: int, job_id: str = "job_1") -> None:
    r.hset(keys.job_chunks_key(job_id), mapping={i: chunk(i, job_id).model_dump_json() for i in range(count)})


def stored(r: fakeredis.FakeRedis, job_id: str = "job_1") -> JobRecord:
    return JobRecord.from_hash(r.hgetall(keys.job_key(job_id)))


def test_record_round_trips_through_the_hash(r) -> None:
    written = new_job(r, metadata=json.dumps({"team": "search"}), webhook_url="https://h.example/x")
    assert stored(r) == written
    job = stored(r).to_job({"w@h": 4})
    assert job.status is JobStatus.queued and job.metadata == {"team": "search"} and job.workers == {"w@h": 4}
    assert job.progress.total == 4 and job.error is None


def take(run: moves.Runner, index: int, job_id: str = "job_1", seq: int = 1) -> Taken:
    return run(JobHandle(job_id).take(index, "w@h", "rerank.bulk:4", seq))


def test_chunks_move_a_job_from_queued_to_running_to_succeeded_counting_each_once(r, run) -> None:
    new_job(r)
    store_chunks(r, 2)
    r.zadd(keys.CHUNKS_OPEN, {"job_1:0": 1.0, "job_1:1": 1.0})
    assert take(run, 0) == Taken("taken", chunk(0), True)  # the first take starts the job
    assert stored(r).status == "running" and stored(r).started_at
    assert take(run, 1, seq=2).started is False  # only once
    assert record(r, run, 0) == "recorded"
    assert r.zscore(keys.CHUNKS_OPEN, "job_1:0") is None  # recorded: no longer open
    assert take(run, 0) == Taken("duplicate")
    assert record(r, run, 0) == "duplicate"  # a redelivered chunk counts once
    assert stored(r).completed == 2 and stored(r).chunks_done == 1
    assert record(r, run, 1) == "finished"
    done = stored(r)
    assert done.status == "succeeded" and done.completed == 4 and done.tokens == 20 and done.finished_at
    assert r.hgetall(keys.job_workers_key("job_1")) == {b"w@h": b"4"}
    assert not r.sismember(keys.tenant_inflight_key("acme"), "job_1")  # the tenant's slot is free again
    assert record(r, run, 1) == "duplicate"
    assert record(r, run, 0, job_id="job_gone") == "missing"


def test_take_marks_the_holder_vouches_for_the_chunk_and_raises_the_lanes_mark(r, run) -> None:
    new_job(r)
    store_chunks(r, 1)
    r.zadd(keys.CHUNKS_OPEN, {"job_1:0": 1.0})
    assert take(run, 0, seq=7).outcome == "taken"
    ledger = r.hgetall(keys.job_ledger_key("job_1"))
    assert ledger[b"0:holder"] == b"w@h" and ledger[b"0:taken_at"]
    assert r.zscore(keys.CHUNKS_OPEN, "job_1:0") > 1.0
    assert r.hget(keys.lane_key("rerank.bulk:4"), "taken") == b"7"
    assert take(run, 0, seq=3).outcome == "taken"  # an older message of the lane leaves the mark where it was
    assert r.hget(keys.lane_key("rerank.bulk:4"), "taken") == b"7"
    assert take(run, 0, job_id="job_gone") == Taken("gone")
    assert run(JobHandle("job_1", "acme").cancel()).moved
    assert take(run, 0, seq=9) == Taken("cancelled")  # a final job's chunks need no scoring
    assert r.hget(keys.lane_key("rerank.bulk:4"), "taken") == b"9"  # the lane moved on all the same


def test_a_final_move_drops_the_ledger_and_the_inputs_unless_results_echo_them(r, run) -> None:
    for job_id, keep in (("job_1", 0), ("job_2", 1)):
        new_job(r, job_id=job_id, keep_input=keep)
        store_chunks(r, 1, job_id)
        r.hset(keys.job_ledger_key(job_id), mapping={"0:sends": 1})
        assert run(JobHandle(job_id, "acme").cancel()).moved
        assert not r.exists(keys.job_ledger_key(job_id))
        assert bool(r.exists(keys.job_chunks_key(job_id))) == bool(keep)


@pytest.mark.parametrize("move", ["fail", "cancel"])
def test_a_final_move_frees_the_slot_wakes_the_waiter_and_schedules_the_webhook(r, run, move) -> None:
    events = json.dumps(["job.failed", "job.cancelled"])
    new_job(r, notify=1, webhook_url="https://h.example/x", webhook_events=events)
    m = (
        JobHandle("job_1", "acme").fail("engine_error", "boom")
        if move == "fail"
        else JobHandle("job_1", "acme").cancel()
    )
    assert run(m).moved
    status = "failed" if move == "fail" else "cancelled"
    done = stored(r)
    assert done.status == status and done.finished_at
    assert (done.error_code, done.error_message) == (("engine_error", "boom") if move == "fail" else ("", ""))
    assert not r.sismember(keys.tenant_inflight_key("acme"), "job_1")
    assert r.lrange(keys.job_done_key("job_1"), 0, -1) == [status.encode()]
    assert 0 < r.ttl(keys.job_done_key("job_1")) <= keys.DONE_TTL_S
    assert (done.webhook_event, done.webhook_state) == (f"job.{status}", "pending")
    assert r.zscore(keys.webhooks_due_key("acme"), "job_1") is not None  # due for its tenant
    assert r.smembers(keys.WEBHOOK_TENANTS) == {b"acme"}
    assert not run(m).moved  # a final job does not move again
    assert r.llen(keys.job_done_key("job_1")) == 1


def test_no_done_list_without_a_waiter_and_no_webhook_for_an_event_not_asked(r, run) -> None:
    new_job(r, webhook_url="https://h.example/x", webhook_events=json.dumps(["job.succeeded"]))
    assert run(JobHandle("job_1", "acme").cancel()).moved
    assert r.llen(keys.job_done_key("job_1")) == 0
    assert stored(r).webhook_state == "" and r.zscore(keys.webhooks_due_key("acme"), "job_1") is None


def test_a_succeeded_job_cannot_be_cancelled_or_failed(r, run) -> None:
    new_job(r, chunks=1)
    assert record(r, run, 0) == "finished"
    assert not run(JobHandle("job_1", "acme").cancel()).moved
    assert not run(JobHandle("job_1", "acme").fail("x", "y")).moved
    assert stored(r).status == "succeeded"


@pytest.mark.parametrize(
    "end", [lambda: JobHandle("job_1", "acme").cancel(), lambda: JobHandle("job_1", "acme").expire()]
)
def test_a_job_that_ended_records_nothing_more(r, run, end) -> None:
    """A chunk in flight when its job was cancelled or expired is not counted: the job's scores stay what they were
    when it ended (an expired job's results are read from them)."""
    new_job(r, chunks=3)
    assert record(r, run, 0) == "recorded"
    assert run(end()).moved
    assert record(r, run, 1) in ("cancelled", "failed")
    assert stored(r).completed == 2 and r.hkeys(keys.job_scores_key("job_1")) == [b"0"]


class _UnreachableQueue:
    """A Celery app whose broker refuses every message: enqueueing fails after the job was admitted."""

    def producer_or_acquire(self) -> Any:
        import contextlib

        return contextlib.nullcontext(None)

    def send_task(self, *args: Any, **kwargs: Any) -> None:
        raise ConnectionError("broker unreachable")


def test_enqueue_failure_ends_the_job_through_the_one_final_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The job fails through FINISH: its tenant's in-flight slot is freed (not held for the result TTL), a waiter is
    woken and the webhook scheduled, and the caller gets 503."""
    from api.job_store import JobStore
    from schemas.errors import Unavailable
    from store import redis_memory

    async def no_limit(_: object) -> redis_memory.Memory:  # fakeredis has no INFO
        return redis_memory.Memory(used=0, maxmemory=0, policy="noeviction")

    monkeypatch.setattr(redis_memory, "aread_memory", no_limit)

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
    move = JobHandle("job_9", "acme").cancel()
    assert move.keys == [
        keys.job_key("job_9"),
        keys.job_scores_key("job_9"),
        keys.job_workers_key("job_9"),
        keys.job_input_key("job_9"),
        keys.job_done_key("job_9"),
        keys.webhooks_due_key("acme"),
        keys.tenant_inflight_key("acme"),
        keys.job_chunks_key("job_9"),
        keys.job_ledger_key("job_9"),
        keys.CHUNKS_OPEN,
        keys.job_webhook_attempts_key("job_9"),
        keys.WEBHOOK_TENANTS,
        keys.JOB_DEADLINES,
    ]
    assert move.args[:3] == ["cancelled", "", ""] and move.args[-1] == keys.DONE_TTL_S
    failed = JobHandle("job_9", "acme").fail("code", "m" * 5000)
    assert failed.args[:2] == ["failed", "code"] and failed.args[2] == "m" * 2000  # long messages are cut
    assert codec.as_str(b"x") == "x" and codec.as_str(3) == "3"
    assert codec.now_iso().endswith("+00:00")


def test_a_job_keeps_its_slowest_chunks_timings_and_its_queue_time(r, run) -> None:
    """Chunks run in parallel: the caller's tokenization and inference times are the slowest chunk's, and a chunk
    recorded twice does not move them."""
    new_job(r, chunks=3)
    store_chunks(r, 3)
    assert stored(r).to_job().timings is None  # not started: no worker took a chunk yet
    take(run, 0)
    for index, tokenize_ms, inference_ms in ((0, 5, 300), (1, 9, 120), (1, 50, 900)):
        result = ChunkResult(scores=[0.5, 0.25], tokens=10).model_dump_json()
        move = JobHandle("job_1", "acme").record_chunk(index, result, 2, "w@h", 10, 3600, tokenize_ms, inference_ms)
        run(move)
    timings = stored(r).to_job().timings
    assert timings is not None and (timings.tokenization_ms, timings.inference_ms) == (9, 300)
    assert 0 <= timings.queue_ms < 5000


def test_moves_return_what_their_callers_read_next(r, run) -> None:
    """The last chunk returns the finished record (the worker's latency comes from it); fail and cancel return the
    job as the API shows it; unknown jobs read as None."""
    new_job(r, chunks=1)
    scores = ChunkResult(scores=[0.5, 0.25]).model_dump_json()
    recorded = run(JobHandle("job_1", "acme").record_chunk(0, scores, 2, "w@h", 10, 3600))
    assert recorded.outcome == "finished" and recorded.record is not None
    assert recorded.record.status == "succeeded" and recorded.record.duration_s is not None
    assert recorded.record.duration_s >= 0
    new_job(r, job_id="job_2")
    finished = run(JobHandle("job_2", "acme").fail("engine_error", "boom"))
    assert finished.moved and finished.job is not None
    assert finished.job.to_job().error is not None and finished.job.to_job().status is JobStatus.failed
    assert run(JobHandle("job_none", "acme").cancel()) == job_state.Finished(False, None)
    assert run(JobHandle("job_none").read()) is None and run(JobHandle("job_none").status()) is None
    assert run(JobHandle("job_2").status()) is JobStatus.failed
    view = run(JobHandle("job_1").read())
    assert view is not None and view.workers == {"w@h": 2} and view.to_job().progress.completed == 2


def test_webhook_attempts_and_redelivery_are_moves_of_the_job(r, run) -> None:
    """An attempt is appended (the newest kept), sets the job's webhook state and the next due time, or takes the job
    out of the due set; a redelivery makes the last event pending again from attempt 0."""
    events = json.dumps(["job.cancelled"])
    new_job(r, webhook_url="https://h.example/x", webhook_events=events)
    assert run(JobHandle("job_1", "acme").redeliver()) is None  # no event yet: nothing to send again
    assert run(JobHandle("job_1", "acme").cancel()).moved
    for number in (1, 2, 3):
        attempt = WebhookAttempt(attempt=number, at=codec.now_iso(), status_code=503)
        run(JobHandle("job_1", "acme").webhook_attempt(attempt, WebhookState.pending, 1000.0 + number, 2, 3600))
    assert stored(r).webhook_attempt == 3 and r.zscore(keys.webhooks_due_key("acme"), "job_1") == 1003.0
    view = run(JobHandle("job_1").read())
    assert view is not None and [json.loads(a)["attempt"] for a in view.attempts] == [2, 3]  # the newest 2 kept
    delivered = WebhookAttempt(attempt=4, at=codec.now_iso(), status_code=200)
    run(JobHandle("job_1", "acme").webhook_attempt(delivered, WebhookState.delivered, None, 2, 3600))
    assert stored(r).webhook_state == "delivered" and r.zscore(keys.webhooks_due_key("acme"), "job_1") is None
    again = run(JobHandle("job_1", "acme").redeliver())
    assert again is not None and again.to_job().webhook is not None
    assert (again.record.webhook_state, again.record.webhook_attempt) == ("pending", 0)
    assert (
        again.record.webhook_event == "job.cancelled" and r.zscore(keys.webhooks_due_key("acme"), "job_1") is not None
    )


def test_the_async_runner_runs_the_same_moves() -> None:
    async def scenario() -> tuple[job_state.Finished, JobStatus | None]:
        client = fakeredis.aioredis.FakeRedis()
        record = JobRecord(id="job_1", tenant="acme", priority=5, created_at=codec.now_iso(), total=2,
                           chunks_total=1, request_count=1)  # fmt: skip
        await client.hset(keys.job_key("job_1"), mapping=record.to_hash())
        run = moves.AsyncRunner(client)
        return await run(JobHandle("job_1", "acme").cancel()), await run(JobHandle("job_1").status())

    finished, status = asyncio.run(scenario())
    assert finished.moved and finished.job is not None and status is JobStatus.cancelled


def test_delete_frees_a_finished_job_at_once_and_refuses_one_not_ended(r, run) -> None:
    new_job(r, chunks=1)
    store_chunks(r, 1)
    r.zadd(keys.recent_jobs_key("acme"), {"job_1": 1.0})
    assert run(JobHandle("job_1", "acme").delete()) == "queued"  # nothing deleted
    assert r.exists(keys.job_key("job_1")) and r.exists(keys.job_chunks_key("job_1"))
    assert record(r, run, 0) == "finished"
    view = run(JobHandle("job_1").read())
    assert view is not None and view.expires_at is not None  # the result TTL runs from the last record
    assert 3590 < (view.expires_at - datetime.now(UTC)).total_seconds() <= 3600
    assert run(JobHandle("job_1", "acme").delete()) == "deleted"
    assert r.keys("rerank:job:job_1*") == [] and r.zscore(keys.recent_jobs_key("acme"), "job_1") is None
    assert run(JobHandle("job_1", "acme").delete()) is None


def test_a_job_that_ended_is_counted_once_by_its_status_and_cause(r, run) -> None:
    """The move counts its own end (`Move.then`): no caller has to."""
    from prometheus_client import REGISTRY

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    new_job(r, job_id="job_f", model="m-ended")
    new_job(r, job_id="job_c", model="m-ended")
    before = (sample("rerank_jobs_finished_total", status="failed", model="m-ended"),
              sample("rerank_jobs_failed_total", cause="engine_error"),
              sample("rerank_jobs_finished_total", status="cancelled", model="m-ended"))  # fmt: skip
    for _ in range(2):  # the second time nothing moves: nothing is counted
        assert run(JobHandle("job_f", "acme").fail("engine_error", "boom")).moved is (_ == 0)
        assert run(JobHandle("job_c", "acme").cancel()).moved is (_ == 0)
    assert sample("rerank_jobs_finished_total", status="failed", model="m-ended") == before[0] + 1
    assert sample("rerank_jobs_failed_total", cause="engine_error") == before[1] + 1
    assert sample("rerank_jobs_finished_total", status="cancelled", model="m-ended") == before[2] + 1


def test_a_job_past_its_deadline_is_found_and_ends_expired(r, run) -> None:
    soon = datetime.now(UTC) + timedelta(seconds=30)
    record = JobRecord(id="job_d", tenant="acme", priority=5, created_at=codec.now_iso(), total=4, chunks_total=2,
                       request_count=1, deadline_at=soon.isoformat())  # fmt: skip
    with r.pipeline(transaction=True) as pipe:
        job_state.create(pipe, job_state.NewJob(record, '{"requests": []}', {}), 3600)
        pipe.execute()
    r.zadd(keys.JOB_DEADLINES, {"job_gone": 1.0})  # a job that left Redis without ending
    assert run(job_state.overdue(soon.timestamp() - 1)) == []
    assert not job_state.past_deadline(record, soon.timestamp() - 1)
    assert run(job_state.overdue(soon.timestamp() + 1)) == [JobHandle("job_d", "acme")]
    assert job_state.past_deadline(record, soon.timestamp() + 1)
    assert r.zscore(keys.JOB_DEADLINES, "job_gone") is None  # its entry left
    expired = run(JobHandle("job_d", "acme").expire())
    assert expired.moved and expired.job is not None
    job = expired.job.to_job()
    assert job.status is JobStatus.failed and job.error is not None and job.error.code == "expired"
    assert job.deadline_at == soon
    assert r.zscore(keys.JOB_DEADLINES, "job_d") is None  # an ended job leaves the deadlines
    assert not run(JobHandle("job_d", "acme").expire()).moved  # once
