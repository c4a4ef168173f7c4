"""The backlog's fair order (`store.backlog`), on fakeredis with Lua: which chunk the feed sends next between
priorities, tenants by weight and one tenant's jobs, what it writes into the ledger, and what leaves the backlog.
Nothing is published here (the lanes stay empty), so each feed sends `depth` chunks."""

from __future__ import annotations

import time
from collections import Counter

import fakeredis

from schemas import keys
from schemas.chunks import ChunkRef
from store import backlog, codec, job_state, moves
from store.job_state import JobHandle, JobRecord, NewJob

MODEL = "m"
SIZE = 4  # pairs per chunk


def submit(r: fakeredis.FakeRedis, job_id: str, tenant: str, pairs: int, priority: int = 5, **extra: object) -> None:
    """A bulk job as the API creates it: its record and its place in the backlog, in one transaction."""
    chunks = -(-pairs // SIZE)
    record = JobRecord(
        id=job_id,
        tenant=tenant,
        model=MODEL,
        priority=priority,
        created_at=codec.now_iso(),
        total=pairs,
        chunks_total=chunks,
        chunk_size=SIZE,
        request_count=1,
        **extra,  # type: ignore[arg-type]
    )
    with r.pipeline(transaction=True) as pipe:
        job_state.create(pipe, NewJob(record, "{}", {i: "{}" for i in range(chunks)}), 3600)
        backlog.Backlog(r).enqueue(pipe, MODEL, job_id, tenant, priority, chunks, pairs)
        pipe.execute()


def feed(run: moves.Runner, depth: int, now: float | None = None) -> list[ChunkRef]:
    return run(backlog.feed(MODEL, depth, 3600, now))


def order(refs: list[ChunkRef]) -> list[str]:
    return [ref.job_id for ref in refs]


def test_tenants_take_turns_whoever_queued_first(r, run) -> None:
    submit(r, "a1", "a", 400)  # 100 chunks
    assert order(feed(run, 3)) == ["a1"] * 3
    submit(r, "b1", "b", 8)  # 2 chunks, while a's backlog waits
    assert order(feed(run, 4)) == ["b1", "a1", "b1", "a1"]
    assert order(feed(run, 2)) == ["a1", "a1"]


def test_shares_follow_the_weights_in_pairs(r, run) -> None:
    r.hset(keys.TENANT_WEIGHTS, "a", 3)
    submit(r, "a1", "a", 4000)
    submit(r, "b1", "b", 4000)
    served = Counter(order(feed(run, 400)))
    assert served == {"a1": 300, "b1": 100}


def test_pairs_not_chunks_are_shared(r, run) -> None:
    # The last chunk of each of b's 5-pair jobs holds 1 pair: b's turns are cheaper, so b gets more of them.
    submit(r, "a1", "a", 400)
    for n in range(20):
        submit(r, f"b{n}", "b", 5)
    refs = feed(run, 30)
    sizes = {"a": 0, "b": 0}
    for ref in refs:
        sizes[ref.tenant] += SIZE if ref.tenant == "a" or ref.index == 0 else 1
    assert abs(sizes["a"] - sizes["b"]) <= SIZE


def test_a_tenants_small_job_does_not_wait_for_its_big_one(r, run) -> None:
    submit(r, "big", "a", 4000)
    feed(run, 10)
    submit(r, "small", "a", 8)
    assert order(feed(run, 4)) == ["small", "big", "small", "big"]


def test_priority_is_strict(r, run) -> None:
    submit(r, "low", "a", 400, priority=5)
    submit(r, "high", "b", 8, priority=9)
    submit(r, "lowest", "c", 8, priority=0)
    refs = feed(run, 6)
    assert order(refs) == ["high", "high", "low", "low", "low", "low"]
    assert {ref.lane for ref in refs if ref.job_id == "high"} == {keys.bulk_queue(MODEL)}
    assert {ref.lane for ref in refs if ref.job_id == "low"} == {f"{keys.bulk_queue(MODEL)}:4"}


def test_a_fed_chunk_is_in_the_ledger_and_the_open_set(r, run) -> None:
    submit(r, "a1", "a", 10)  # chunks of 4, 4, 2
    refs = feed(run, 5)
    assert [(ref.index, ref.seq, ref.send) for ref in refs] == [(0, 1, 1), (1, 2, 1), (2, 3, 1)]
    ledger = codec.decode_hash(r.hgetall(keys.job_ledger_key("a1")))
    assert ledger == {"0:sends": "1", "0:seq": "1", "1:sends": "1", "1:seq": "2", "2:sends": "1", "2:seq": "3"}
    assert {m.decode() for m in r.zrange(keys.CHUNKS_OPEN, 0, -1)} == {"a1:0", "a1:1", "a1:2"}
    assert run(backlog.waiting(MODEL)) == backlog.Waiting(0, 0, {})  # nothing of a's waits: its counts went
    assert feed(run, 5) == []  # the whole job was sent


def test_the_lanes_waiting_chunks_count_against_the_depth(r, run) -> None:
    submit(r, "a1", "a", 400)
    r.rpush(f"{keys.bulk_queue(MODEL)}:4", "m1", "m2")
    assert len(feed(run, 3)) == 1


def test_a_job_that_ends_leaves_the_backlog_with_what_it_had_not_sent(r, run) -> None:
    submit(r, "a1", "a", 40)
    submit(r, "a2", "a", 40)
    submit(r, "b1", "b", 20)
    assert run(backlog.waiting(MODEL)) == backlog.Waiting(25, 100, {"a": (20, 80), "b": (5, 20)})
    assert order(feed(run, 2)) == ["a1", "b1"]
    assert run(JobHandle("a2", "a").cancel()).moved
    assert run(backlog.waiting(MODEL)) == backlog.Waiting(13, 52, {"a": (9, 36), "b": (4, 16)})
    assert "a2" not in order(feed(run, 100))


def test_a_job_past_its_deadline_is_never_fed(r, run) -> None:
    submit(r, "late", "a", 40, deadline_at=codec.now_iso())
    r.zadd(keys.JOB_DEADLINES, {"late": time.time() - 1})
    submit(r, "b1", "b", 8)
    assert order(feed(run, 10)) == ["b1", "b1"]
    assert run(backlog.waiting(MODEL)).chunks == 0


def test_a_job_gone_from_redis_leaves_the_backlog(r, run) -> None:
    submit(r, "a1", "a", 40)
    r.delete(keys.job_key("a1"))
    assert feed(run, 10) == []
    assert run(backlog.waiting(MODEL)).chunks == 0
    assert r.zcard(f"{keys.backlog_prefix(MODEL)}:5:tenants") == 0


def test_a_tenant_that_comes_back_saved_no_credit(r, run) -> None:
    submit(r, "a1", "a", 8)
    feed(run, 2)  # a's backlog is empty: it left
    submit(r, "b1", "b", 400)
    feed(run, 50)  # b alone, for a while
    submit(r, "a2", "a", 400)
    served = Counter(order(feed(run, 20)))
    assert abs(served["a2"] - served["b1"]) <= 2  # turns, not a's 50 chunks first


def test_position_of_a_queued_job(r, run) -> None:
    submit(r, "a1", "a", 40)
    submit(r, "a2", "a", 40)
    submit(r, "b1", "b", 20)
    submit(r, "hi", "c", 12, priority=7)
    pos = run(backlog.position(MODEL, "a2", "a", 5))
    assert pos == backlog.Position(pairs_waiting=40, pairs_ahead=12, tenants_sharing=2, jobs_sharing=2)
