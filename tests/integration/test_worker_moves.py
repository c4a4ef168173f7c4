"""A worker's moves on a job, on a real Redis: a chunk delivered twice counts once; final states stay final."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest
import redis

from schemas import keys
from schemas.chunks import Chunk, ChunkRef, ChunkResult
from schemas.errors import InvalidInput
from schemas.jobs import JobStatus
from store import moves
from store.job_state import JobHandle, Recorded, Taken
from tests.jobs import create_job

pytestmark = pytest.mark.integration


@dataclass
class Worker:
    """What a worker holds to move jobs: its Redis client and the runner of the jobs' moves (`workers.runtime`)."""

    redis: redis.Redis
    run: moves.Runner

    def take(self, ref: ChunkRef, worker: str) -> Taken:
        return self.run(JobHandle(ref.job_id, ref.tenant).take(ref.index, worker, ref.lane, ref.seq))

    def record_chunk(self, ref: ChunkRef, result: ChunkResult, worker: str) -> Recorded:
        move = JobHandle(ref.job_id, ref.tenant).record_chunk(
            ref.index, result.model_dump_json(), len(result.scores), worker, result.tokens, 600
        )
        return self.run(move)

    def fail(self, job_id: str, code: str, message: str) -> bool:
        return self.run(JobHandle(job_id).fail(code, message)).moved

    def status(self, job_id: str) -> JobStatus | None:
        return self.run(JobHandle(job_id).status())


@pytest.fixture
def store(redis_url: str) -> Worker:
    client = redis.Redis.from_url(redis_url)
    return Worker(client, moves.Runner(client))


def _job(store: Worker, chunks: int, status: str = "queued") -> str:
    job_id = f"job_{uuid.uuid4().hex}"
    inputs = {i: Chunk(job_id=job_id, index=i, priority=5, segments=[]).model_dump_json() for i in range(chunks)}
    return create_job(store.redis, job_id, chunks, chunk_inputs=inputs, status=status).id


def _ref(job_id: str, index: int) -> ChunkRef:
    return ChunkRef(job_id=job_id, index=index, priority=5, lane="rerank.bulk:4", seq=index + 1)


def record_chunk(store: Worker, job_id: str, index: int, result: ChunkResult, worker: str) -> str:
    return store.record_chunk(_ref(job_id, index), result, worker).outcome


def test_redelivered_chunk_counts_once_and_last_chunk_finishes(store) -> None:
    job_id = _job(store, chunks=2)
    outcome, chunk, started = store.take(_ref(job_id, 0), "w1@h")
    assert (outcome, chunk is not None and chunk.index, started) == ("taken", 0, True)
    assert store.status(job_id) is JobStatus.running
    assert record_chunk(store, job_id, 0, ChunkResult(scores=[0.1, 0.2], tokens=7), "w1@h") == "recorded"
    assert store.take(_ref(job_id, 0), "w2@h") == ("duplicate", None, False)
    assert record_chunk(store, job_id, 0, ChunkResult(scores=[0.1, 0.2], tokens=7), "w2@h") == "duplicate"
    assert record_chunk(store, job_id, 1, ChunkResult(scores=[0.3, 0.4], tokens=5), "w2@h") == "finished"
    record = store.redis.hgetall(keys.job_key(job_id))
    assert record[b"status"] == b"succeeded" and record[b"completed"] == b"4" and record[b"finished_at"]
    assert record[b"tokens"] == b"12"
    assert store.redis.hgetall(keys.job_workers_key(job_id)) == {b"w1@h": b"2", b"w2@h": b"2"}
    assert 0 < store.redis.ttl(keys.job_scores_key(job_id)) <= 600


def test_cancelled_job_stays_cancelled_and_is_skipped(store) -> None:
    job_id = _job(store, chunks=1, status="cancelled")
    assert store.status(job_id) is JobStatus.cancelled
    assert store.take(_ref(job_id, 0), "w1@h") == ("cancelled", None, False)
    # a late chunk of a job that ended is not counted
    assert record_chunk(store, job_id, 0, ChunkResult(scores=[0.5, 0.5]), "w1@h") == "cancelled"
    assert not store.redis.exists(keys.job_scores_key(job_id))
    assert store.status(job_id) is JobStatus.cancelled
    assert not store.fail(job_id, "engine_error", "late failure")
    assert store.status(f"job_{uuid.uuid4().hex}") is None  # gone (expired): nothing to score


def test_failed_job_keeps_its_first_error(store) -> None:
    job_id = _job(store, chunks=3, status="running")
    assert store.fail(job_id, "invalid_input", "chunk 1: bad")
    assert not store.fail(job_id, "engine_error", "chunk 2: worse")
    assert store.redis.hget(keys.job_key(job_id), "error_message") == b"chunk 1: bad"


def test_final_state_of_a_waited_on_job_is_pushed_once(store) -> None:
    job_id = _job(store, chunks=1)
    store.redis.hset(keys.job_key(job_id), "notify", 1)
    assert record_chunk(store, job_id, 0, ChunkResult(scores=[0.1, 0.2]), "w1@h") == "finished"
    record_chunk(store, job_id, 0, ChunkResult(scores=[0.1, 0.2]), "w1@h")
    assert store.redis.lrange(keys.job_done_key(job_id), 0, -1) == [b"succeeded"]
    failed = _job(store, chunks=2)
    store.redis.hset(keys.job_key(failed), "notify", 1)
    store.fail(failed, "invalid_input", "bad")
    assert store.redis.lrange(keys.job_done_key(failed), 0, -1) == [b"failed"]
    assert 0 < store.redis.ttl(keys.job_done_key(failed)) <= keys.DONE_TTL_S


@pytest.mark.parametrize(
    ("error", "code"),
    [(InvalidInput("a prompt has 9000 tokens, over the limit"), "invalid_input"), (KeyError("bug"), "internal_error")],
)
def test_input_the_limits_reject_and_a_bug_fail_the_job_with_their_own_cause(store, monkeypatch, error, code) -> None:
    """A chunk the limits reject fails its job as `invalid_input`; any other error in scoring is a bug, reported as
    `internal_error` (never as the caller's fault), and counted by cause."""
    from types import SimpleNamespace

    from prometheus_client import REGISTRY

    from store.redis_memory import waiting_for_room
    from workers import runtime, scoring, tasks

    def prepare(*_: object) -> None:
        raise error

    rt = SimpleNamespace(redis=store.redis, run=store.run, with_room=waiting_for_room(0), prompts=None)
    monkeypatch.setattr(runtime, "get", lambda: rt)
    monkeypatch.setattr(scoring, "prepare", prepare)
    job_id = _job(store, chunks=1)
    before = REGISTRY.get_sample_value("rerank_jobs_failed_total", {"cause": code}) or 0.0
    assert tasks.score(_ref(job_id, 0).model_dump(), "w1@h") == "failed"
    assert store.redis.hget(keys.job_key(job_id), "error_code") == code.encode()
    assert REGISTRY.get_sample_value("rerank_jobs_failed_total", {"cause": code}) == before + 1
