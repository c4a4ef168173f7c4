"""The chunk ledger and the recovery that reads it, on fakeredis (with Lua): which chunks count as lost, waiting or
closed, the re-send's compare-and-set and its cap, and the one-process lock."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import fakeredis
import pytest

from schemas import keys
from schemas.settings import Settings
from store.chunk_ledger import Ledger
from store.job_state import JobRecord
from store.queueing import interactive_steps, job_lane, step_lane
from tests.jobs import create_job
from workers.recovery import Recovery

LANE = job_lane("bulk", 5, "m")  # rerank.bulk.m:4
NOW = 10_000.0
GRACE = 40.0


class RecordingCelery:
    """Stands in for the Celery app `publish` sends through: keeps what would have been sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[dict[str, Any], str, int]] = []

    def producer_or_acquire(self) -> Any:
        return contextlib.nullcontext(None)

    def send_task(self, name: str, args: list[Any], queue: str, priority: int, producer: Any) -> None:
        assert name == keys.TASK_SCORE_CHUNK
        self.sent.append((args[0], queue, priority))


@pytest.fixture
def r() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


def new_job(r: fakeredis.FakeRedis, chunks: int, job_id: str = "job_1", at: float = NOW - 100) -> int:
    """A running bulk job (priority 5) whose chunks were all sent at `at`; returns chunk 0's sequence number."""
    create_job(r, job_id, chunks, pairs_per_chunk=1, tenant="acme", model="m", status="running")
    ledger = Ledger(r)
    with r.pipeline(transaction=True) as pipe:
        ledger.open_chunks(pipe, job_id, [LANE] * chunks, LANE, 3600)
        [seqs] = pipe.execute()
    assert [int(s) for s in seqs] == list(range(int(seqs[0]), int(seqs[0]) + chunks))  # one lane: numbered on
    r.zadd(keys.CHUNKS_OPEN, {f"{job_id}:{i}": at for i in range(chunks)})
    return int(seqs[0])


def test_open_gives_each_chunk_its_place_in_the_lane_and_opens_it(r) -> None:
    assert new_job(r, 3) == 1
    assert new_job(r, 2, job_id="job_2") == 4  # the lane's numbers go on across jobs
    ledger = r.hgetall(keys.job_ledger_key("job_2"))
    assert (ledger[b"0:seq"], ledger[b"1:seq"], ledger[b"1:sends"]) == (b"4", b"5", b"1")
    assert r.zcard(keys.CHUNKS_OPEN) == 5 and r.hget(keys.lane_key(LANE), "sent") == b"5"


def test_a_chunk_still_in_its_queue_is_waiting_not_lost(r) -> None:
    new_job(r, 2)
    r.hset(keys.lane_key(LANE), "taken", 0)
    r.rpush(LANE, "a message")  # the lane holds messages: chunks above the mark are in it
    found = Ledger(r).find_lost(GRACE, job_lane, now=NOW)
    assert (found.lost, found.waiting) == ([], 2)
    assert r.zscore(keys.CHUNKS_OPEN, "job_1:0") == NOW  # vouched for: looked at again a grace from now


def test_an_interactive_calls_chunks_in_several_lanes_are_numbered_and_found_in_each(r) -> None:
    """A call's chunks spread over its queue's steps (`interactive_steps`): each lane numbers its own, a chunk outside
    the job's own lane has its lane written down, and the look asks each chunk's own lane."""
    own = job_lane("interactive", 9, "m")
    steps = interactive_steps(5, 10, ahead=20, share=40)  # pairs ahead 20, 30, 40, 50, 60 -> steps 0 0 1 1 1
    assert steps == [0, 0, 1, 1, 1]
    lanes = [step_lane(own, step) for step in steps]
    create_job(
        r, "job_i", 5, pairs_per_chunk=10, tenant="acme", model="m", kind="interactive", priority=9, status="running"
    )
    r.hset(keys.lane_key(own), "sent", 7)  # other calls went before it in the first lane
    with r.pipeline(transaction=True) as pipe:
        Ledger(r).open_chunks(pipe, "job_i", lanes, own, 3600)
        [seqs] = pipe.execute()
    assert [int(s) for s in seqs] == [8, 9, 1, 2, 3]
    ledger = r.hgetall(keys.job_ledger_key("job_i"))
    assert b"0:lane" not in ledger and ledger[b"2:lane"] == f"{own}:1".encode()
    r.zadd(keys.CHUNKS_OPEN, {f"job_i:{i}": NOW - 100 for i in range(5)})
    r.hset(keys.lane_key(own), "taken", 9)  # both of the first lane's chunks were taken ...
    r.hset(keys.lane_key(f"{own}:1"), "taken", 1)  # ... and one of the second's, whose list still holds messages
    r.rpush(own, "a message of a later call")
    r.rpush(f"{own}:1", "chunk 3", "chunk 4")
    found = Ledger(r).find_lost(GRACE, job_lane, now=NOW)
    assert [(lost.index, lost.lane) for lost in found.lost] == [(0, own), (1, own), (2, f"{own}:1")]
    assert found.waiting == 2


def test_taken_and_not_renewed_or_never_in_the_list_is_lost(r) -> None:
    new_job(r, 3)
    r.hset(keys.lane_key(LANE), "taken", 2)  # chunks 0 and 1 left the list (taken); chunk 2 did not
    r.hset(keys.job_ledger_key("job_1"), "0:holder", "w1@h")
    found = Ledger(r).find_lost(GRACE, job_lane, now=NOW)
    assert [(lost.index, lost.holder, lost.lane) for lost in found.lost][:2] == [(0, "w1@h", LANE), (1, None, LANE)]
    assert [lost.index for lost in found.lost] == [0, 1, 2]  # the lane is empty: chunk 2 never reached it
    assert found.waiting == 0
    r.rpush(LANE, "a message")
    assert [lost.index for lost in Ledger(r).find_lost(GRACE, job_lane, now=NOW).lost] == [0, 1]


def test_a_chunk_vouched_for_within_the_grace_is_not_looked_at(r) -> None:
    new_job(r, 2, at=NOW - GRACE + 1)
    r.hset(keys.lane_key(LANE), "taken", 99)
    assert Ledger(r).find_lost(GRACE, job_lane, now=NOW).lost == []


def test_recorded_chunks_and_ended_jobs_leave_the_open_set(r) -> None:
    new_job(r, 2)
    new_job(r, 1, job_id="job_2")
    r.hset(keys.job_scores_key("job_1"), "0", "{}")
    r.hset(keys.job_key("job_2"), "status", "cancelled")
    r.hset(keys.lane_key(LANE), "taken", 99)
    found = Ledger(r).find_lost(GRACE, job_lane, now=NOW)
    assert [lost.member for lost in found.lost] == ["job_1:1"] and found.closed == 2
    assert r.zrange(keys.CHUNKS_OPEN, 0, -1) == [b"job_1:1"]


def test_resend_is_a_compare_and_set_on_the_send_count_and_stops_at_the_cap(r) -> None:
    new_job(r, 1)
    ledger = Ledger(r)
    r.hset(keys.job_ledger_key("job_1"), "0:holder", "w1@h")
    assert ledger.resend("job_1", 0, LANE, sends=1, max_sends=3) == ("sent", 2, 2)
    assert r.hget(keys.job_ledger_key("job_1"), "0:lane") == LANE.encode()  # where find_lost looks for it now
    assert r.hget(keys.job_ledger_key("job_1"), "0:holder") is None  # nobody holds the new message yet
    assert ledger.resend("job_1", 0, LANE, sends=1, max_sends=3)[0] == "raced"  # someone sent it meanwhile
    assert ledger.resend("job_1", 0, LANE, sends=2, max_sends=3) == ("sent", 3, 3)
    assert ledger.resend("job_1", 0, LANE, sends=3, max_sends=3) == ("exhausted", 0, 3)
    r.hset(keys.job_scores_key("job_1"), "0", "{}")
    assert ledger.resend("job_1", 0, LANE, sends=3, max_sends=3)[0] == "recorded"
    assert r.zscore(keys.CHUNKS_OPEN, "job_1:0") is None


def test_recovery_sends_lost_chunks_again_and_fails_a_job_whose_chunk_is_sent_too_often(r) -> None:
    new_job(r, 2)
    r.hset(keys.lane_key(LANE), "taken", 2)
    r.hset(keys.job_ledger_key("job_1"), "1:sends", 4)  # chunk 1 was sent 4 times: RERANK_CHUNK_MAX_RETRIES=3
    celery = RecordingCelery()
    recovery = Recovery(Settings(visibility_timeout_s=20), celery, r)  # type: ignore[arg-type]
    assert recovery.look_once(now=NOW) == 1
    [(message, queue, priority)] = celery.sent
    assert (message["job_id"], message["index"], message["send"], message["seq"]) == ("job_1", 0, 2, 1)
    # to the front: the bulk queue's first step, served before the backlog it already waited behind once
    assert (queue, priority, message["lane"], message["priority"]) == ("rerank.bulk.m", 0, "rerank.bulk.m", 5)
    record = JobRecord.from_hash(r.hgetall(keys.job_key("job_1")))
    assert record.status == "failed" and record.error_code == "chunk_lost" and "4 times" in record.error_message
    assert r.zcard(keys.CHUNKS_OPEN) == 0  # the failed job's chunks are no longer open


def test_two_workers_finding_the_same_lost_chunk_send_it_once(r) -> None:
    new_job(r, 1)
    r.hset(keys.lane_key(LANE), "taken", 1)
    first, second = RecordingCelery(), RecordingCelery()
    settings = Settings()
    recoveries = [Recovery(settings, app, r) for app in (first, second)]  # type: ignore[arg-type]
    lost = [recovery.ledger.find_lost(recovery.grace_s, job_lane, now=NOW).lost for recovery in recoveries]
    assert lost[0] == lost[1] and len(lost[0]) == 1  # both looked before either sent
    assert [recoveries[k]._recover(lost[k][0]) for k in (0, 1)] == [1, 0]  # the second is told 'raced'
    assert (len(first.sent), len(second.sent)) == (1, 0)


def test_a_starting_worker_looks_at_once_before_its_first_period(r) -> None:
    """A worker that dies a few seconds after it starts has still looked for lost chunks once."""
    new_job(r, 1)
    r.hset(keys.lane_key(LANE), "taken", 1)
    celery = RecordingCelery()
    recovery = Recovery(Settings(), celery, r)  # type: ignore[arg-type]
    recovery.period_s = 3600.0  # only the look at start can find it in this test's time
    recovery.start()
    try:
        deadline = time.monotonic() + 10
        while not celery.sent and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        recovery.stop()
    assert [m["job_id"] for m, _, _ in celery.sent] == ["job_1"]
