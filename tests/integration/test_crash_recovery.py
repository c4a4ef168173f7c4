"""Nothing lost: a worker killed with SIGKILL mid-job, and Redis restarted under a running farm."""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import redis
from fastapi.testclient import TestClient

from api.main import create_app
from rerankfarm import chaos
from rerankfarm.embedded_redis import EmbeddedRedis
from schemas import keys
from tests.conftest import TINY, Reference, random_text
from tests.integration.conftest import WorkerProcess, farm_settings, wait_for

pytestmark = pytest.mark.integration


def chunk_events(log: Path, job_id: str) -> tuple[Counter[int], Counter[tuple[int, str]]]:
    """From a worker's chunk events (`rerankfarm.chaos.chunk_events`): how often each chunk of the job was taken, and
    each (chunk, outcome) of its scoring."""
    taken: Counter[int] = Counter()
    outcomes: Counter[tuple[int, str]] = Counter()
    for event in chaos.chunk_events(log):
        if event["job"] == job_id:
            if event["event"] == "chunk.taken":
                taken[event["chunk"]] += 1
            elif event["event"] == "chunk.done":
                outcomes[(event["chunk"], event["outcome"])] += 1
    return taken, outcomes


def stall_holding(
    worker: WorkerProcess, job_id: str, stall: Callable[[], object], resume: Callable[[], object], timeout: float = 60
) -> set[int]:
    """Stall the worker (`stall()`: freeze it, cut its network) while it holds a chunk of the job that is not
    recorded, and return those chunks. Whenever its log shows a chunk taken and not finished, the worker is stalled
    and Redis asked: with such a chunk held, it stays stalled (it can record nothing more); else it is resumed and
    the look repeated (its chunk was recorded just before the stall)."""
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, "the worker never held an unrecorded chunk of the job"
        taken, outcomes = chunk_events(worker.log_path, job_id)
        if any(not any(o[0] == i for o in outcomes) for i in taken):
            stall()
            held, _ = _held_and_unlogged(worker, job_id)
            if held:
                return held
            resume()
        time.sleep(0.01)


def kill_with_chunks_in_hand(worker: WorkerProcess, job_id: str) -> tuple[set[int], set[int]]:
    """SIGKILL the worker while it holds a chunk of the job that is not recorded (frozen first: `stall_holding`).
    Returns, once the worker is gone, the chunks it held (taken, not recorded) and those it recorded without logging
    it."""
    pid = worker.pid()
    stall_holding(worker, job_id, lambda: os.kill(pid, signal.SIGSTOP), lambda: os.kill(pid, signal.SIGCONT))
    worker.kill()  # the launcher; its frozen worker dies with it
    assert not worker.left_running(), worker.left_running()
    return _held_and_unlogged(worker, job_id)


def _held_and_unlogged(worker: WorkerProcess, job_id: str) -> tuple[set[int], set[int]]:
    """Chunks of the job the worker's log shows taken and not finished: those not recorded (Redis says), and those
    recorded (it was stopped between the record and its log line)."""
    taken, outcomes = chunk_events(worker.log_path, job_id)
    unfinished = {i for i in taken if not any(o[0] == i for o in outcomes)}
    recorded = {int(i) for i in worker.redis.hkeys(keys.job_scores_key(job_id))}
    return unfinished - recorded, unfinished & recorded


def _assert_scores_match_the_reference(client: TestClient, job: dict, body: dict, reference: Reference) -> None:
    data = client.get(f"/v1/jobs/{job['id']}/results").json()["data"]
    for request, entry in zip(body["requests"], data, strict=True):
        for r in entry["results"][:25]:  # recovered chunks score exactly what an undisturbed worker would
            expected = reference.score(request["query"], request["documents"][r["index"]])
            assert r["relevance_score"] == pytest.approx(expected, abs=1e-3)


def _assert_every_pair_scored_once(client: TestClient, job: dict, body: dict, redis_url: str) -> None:
    done = client.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "succeeded"
    assert (
        done["progress"]["completed"] == done["progress"]["total"] == sum(len(r["documents"]) for r in body["requests"])
    )
    assert sum(done["workers"].values()) == done["progress"]["total"]  # no chunk counted twice
    data = client.get(f"/v1/jobs/{job['id']}/results").json()["data"]
    for request, entry in zip(body["requests"], data, strict=True):
        assert sorted(r["index"] for r in entry["results"]) == list(range(len(request["documents"])))
    r = redis.Redis.from_url(redis_url)
    assert r.hlen(keys.job_scores_key(job["id"])) == -(-done["progress"]["total"] // 10)


def test_worker_killed_mid_job_twice_loses_nothing(fresh_url, redis_url, tiny_model_dir, log_dir, reference) -> None:
    """Each kill leaves chunks taken and not recorded; they are delivered again, scored by a live worker, counted
    once, and score what the reference says."""
    rng = random.Random(41)
    body = {
        "requests": [
            {"query": random_text(rng, 2, 5), "documents": [random_text(rng, 100, 250) for _ in range(120)]}
            for _ in range(5)
        ]
    }
    redis_url = fresh_url  # only this test's workers consume there: their logs tell the whole story
    settings = farm_settings(redis_url, tiny_model_dir, chunk_size=10)
    with TestClient(create_app(settings)) as client:
        first = WorkerProcess(redis_url, tiny_model_dir, log_dir).start()
        job = client.post("/v1/jobs", json=body).json()
        wait_for(client, job["id"], until=("running",), timeout=60)
        held_first, unlogged_first = kill_with_chunks_in_hand(first, job["id"])
        progress_at_kill = client.get(f"/v1/jobs/{job['id']}").json()["progress"]["completed"]
        assert progress_at_kill < 600

        second = WorkerProcess(redis_url, tiny_model_dir, log_dir).start()
        deadline = time.monotonic() + 60
        while client.get(f"/v1/jobs/{job['id']}").json()["progress"]["completed"] <= progress_at_kill + 20:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        held_second, unlogged_second = kill_with_chunks_in_hand(second, job["id"])

        third = WorkerProcess(redis_url, tiny_model_dir, log_dir).start()
        try:
            done = wait_for(client, job["id"], timeout=120)
            assert done["status"] == "succeeded", done
            _assert_every_pair_scored_once(client, job, body, redis_url)
            _assert_scores_match_the_reference(client, job, body, reference)
        finally:
            third.stop()
    logs = [chunk_events(w.log_path, job["id"]) for w in (first, second, third)]
    recorded: Counter[int] = Counter()
    for _, outcomes in logs:
        recorded.update(
            i for (i, outcome), n in outcomes.items() if outcome in ("recorded", "finished") for _ in range(n)
        )
    recorded.update(unlogged_first | unlogged_second)  # recorded by a killed worker, which died before its log line
    assert sorted(recorded) == list(range(60)) and set(recorded.values()) == {1}  # each chunk counted once
    for k, held in ((0, held_first), (1, held_second)):
        assert held, "the worker was killed with no chunk in hand: the test proved nothing"
        for i in held:  # delivered again: taken by a worker started after the kill
            assert any(i in later_taken for later_taken, _ in logs[k + 1 :]), i


def test_a_dead_workers_chunks_are_scored_by_another_within_30s_with_default_settings(
    fresh_url, redis_url, tiny_model_dir, log_dir
) -> None:
    """Two workers with default settings (20 s lease): one is killed with its chunks in hand; the other takes each of
    them within 30 s of the kill, and no chunk is taken twice by the live worker."""
    rng = random.Random(45)
    body = {
        "requests": [
            {"query": random_text(rng, 2, 5), "documents": [random_text(rng, 100, 250) for _ in range(200)]}
            for _ in range(4)
        ]
    }
    redis_url = fresh_url
    doomed = WorkerProcess(redis_url, tiny_model_dir, log_dir).start()
    survivor = WorkerProcess(redis_url, tiny_model_dir, log_dir).start()
    try:
        with TestClient(create_app(farm_settings(redis_url, tiny_model_dir, chunk_size=10))) as client:
            job = client.post("/v1/jobs", json=body).json()
            wait_for(client, job["id"], until=("running",), timeout=60)
            in_flight, recorded_unlogged = kill_with_chunks_in_hand(doomed, job["id"])
            killed_at = time.monotonic()
            assert in_flight, "the worker was killed with no chunk in hand: the test proved nothing"
            retaken_after: dict[int, float] = {}
            while set(retaken_after) != in_flight:
                assert time.monotonic() - killed_at < 30, (in_flight, retaken_after)
                survivor_taken, _ = chunk_events(survivor.log_path, job["id"])
                for i in in_flight & set(survivor_taken):
                    retaken_after.setdefault(i, time.monotonic() - killed_at)
                time.sleep(0.2)
            print(f"chunks {sorted(in_flight)} of the killed worker taken again after {retaken_after} s")
            done = wait_for(client, job["id"], timeout=180)
            assert done["status"] == "succeeded", done
            _assert_every_pair_scored_once(client, job, body, redis_url)
    finally:
        survivor.stop()
    survivor_taken, survivor_outcomes = chunk_events(survivor.log_path, job["id"])
    assert set(survivor_taken.values()) == {1}, survivor_taken  # the live worker never got a chunk twice
    # It recorded every chunk it took, but for those the killed worker had recorded before it died and not acked
    # (recorded, logged or not, and killed before the ack): those come back, and it skips them as duplicates.
    _, doomed_outcomes = chunk_events(doomed.log_path, job["id"])
    recorded_by_doomed = {i for (i, outcome) in doomed_outcomes if outcome in ("recorded", "finished")}
    skipped = {i for (i, outcome) in survivor_outcomes if outcome not in ("recorded", "finished")}
    assert skipped <= recorded_by_doomed | recorded_unlogged, (survivor_outcomes, doomed_outcomes)
    assert all(survivor_outcomes[(i, "duplicate")] == 1 for i in skipped), survivor_outcomes


def test_a_chunk_scored_for_longer_than_the_lease_is_never_handed_out_twice(
    fresh_url, redis_url, tiny_model_dir, log_dir
) -> None:
    """A 5 s lease, one chunk that takes several leases to score, and a second idle worker sweeping every 5 s (and
    looking for lost chunks: the recovery's grace is two leases): the holder keeps renewing, so the chunk is taken
    once and scored once, never sent again."""
    rng = random.Random(46)
    body = {"requests": [{"query": "slow", "documents": [random_text(rng, 200, 300) for _ in range(6000)]}]}
    redis_url = fresh_url
    lease = {"RERANK_VISIBILITY_TIMEOUT_S": "5", "RERANK_VLLM_MAX_NUM_BATCHED_TOKENS": "2048"}
    holder = WorkerProcess(redis_url, tiny_model_dir, log_dir, concurrency=1, **lease).start()
    try:
        with TestClient(create_app(farm_settings(redis_url, tiny_model_dir, chunk_size=6000))) as client:
            job = client.post("/v1/jobs", json=body).json()
            wait_for(client, job["id"], until=("running",), timeout=60)
            idle = WorkerProcess(redis_url, tiny_model_dir, log_dir, concurrency=1, **lease).start()
            try:
                done = wait_for(client, job["id"], timeout=300)
            finally:
                idle.stop()
            assert done["status"] == "succeeded", done
    finally:
        holder.stop()
    taken, outcomes = chunk_events(holder.log_path, job["id"])
    assert taken == Counter({0: 1}) and outcomes == Counter({(0, "finished"): 1}), (taken, outcomes)
    [seconds] = [e["seconds"] for e in chaos.chunk_events(holder.log_path) if e["event"] == "chunk.done"]
    assert seconds > 2 * 5, f"the chunk took {seconds} s: not long enough to outlast the lease"
    assert chunk_events(idle.log_path, job["id"]) == (Counter(), Counter())
    events = chaos.chunk_events(holder.log_path) + chaos.chunk_events(idle.log_path)
    assert [e for e in events if e["event"] == "chunk.sent_again"] == []


def test_redis_killed_and_restarted_under_a_running_farm(tiny_model_dir, log_dir, tmp_path) -> None:
    """SIGKILL of Redis (AOF, fsync always): no shutdown save, the farm finds on restart what the AOF held."""
    server = EmbeddedRedis(data_dir=str(tmp_path), appendonly=True, fsync_always=True).start()
    url = server.url
    rng = random.Random(42)
    body = {
        "requests": [
            {"query": random_text(rng, 2, 5), "documents": [random_text(rng, 100, 250) for _ in range(100)]}
            for _ in range(4)
        ]
    }
    worker = WorkerProcess(url, tiny_model_dir, log_dir).start()
    try:
        with TestClient(create_app(farm_settings(url, tiny_model_dir, chunk_size=10))) as client:
            jobs = [client.post("/v1/jobs", json=body).json() for _ in range(2)]
            wait_for(client, jobs[0]["id"], until=("running",), timeout=60)
            server.kill()
            down = client.get(f"/v1/jobs/{jobs[0]['id']}")
            assert down.status_code == 503 and down.headers["retry-after"]
            assert client.post("/v1/jobs", json=body).status_code == 503
            assert client.get("/readyz").status_code == 503
            time.sleep(3)
            restarted = EmbeddedRedis(
                port=server.port, data_dir=str(tmp_path), appendonly=True, fsync_always=True
            ).start()
            try:
                for job in jobs:
                    done = wait_for(client, job["id"], timeout=120)
                    assert done["status"] == "succeeded", done
                    _assert_every_pair_scored_once(client, job, body, url)
                deadline = time.monotonic() + 30
                while client.get("/readyz").status_code != 200:  # the same worker is back, by itself
                    assert time.monotonic() < deadline
                    time.sleep(0.5)
            finally:
                restarted.stop()
    finally:
        worker.stop()
        server.stop()


@pytest.mark.parametrize("in_process", ["true", "false"])
def test_killed_vllm_worker_loses_nothing_and_leaves_no_engine_process(
    fresh_url, in_process, redis_url, tiny_model_dir, log_dir
) -> None:
    """SIGKILL of the worker process alone (its launcher lives on and starts a new one), mid-job: the job completes
    with every pair scored once, and nothing the killed worker started outlives it (vLLM's engine core, when it
    runs in a process of its own, would hold the model's memory)."""
    redis_url = fresh_url  # only this test's worker consumes there
    rng = random.Random(43)
    body = {
        "requests": [
            {"query": random_text(rng, 2, 5), "documents": [random_text(rng, 100, 250) for _ in range(80)]}
            for _ in range(3)
        ]
    }
    worker = WorkerProcess(redis_url, tiny_model_dir, log_dir, RERANK_VLLM_IN_PROCESS=in_process).start()
    try:
        with TestClient(create_app(farm_settings(redis_url, tiny_model_dir, chunk_size=10))) as client:
            pid = worker.pid()
            tree = psutil.Process(pid).children(recursive=True)
            engine_processes = [
                p for p in tree if "VLLM" in " ".join(p.cmdline()) or "spawn_main" in " ".join(p.cmdline())
            ]
            if in_process == "false":
                assert engine_processes, "expected vLLM's engine core in a process of its own"
            else:
                assert not engine_processes, [p.cmdline() for p in engine_processes]
            job = client.post("/v1/jobs", json=body).json()
            wait_for(client, job["id"], until=("running",), timeout=60)
            os.kill(pid, signal.SIGKILL)
            _, alive = psutil.wait_procs(tree, timeout=20)
            assert not alive, [p.cmdline() for p in alive]
            done = wait_for(client, job["id"], timeout=180)
            assert done["status"] == "succeeded", done
            _assert_every_pair_scored_once(client, job, body, redis_url)
            assert worker.pid() != pid  # the launcher started a fresh worker, which finished the job
    finally:
        worker.stop()


def test_a_chunk_delivered_twice_is_scored_once_and_the_copy_dropped(fresh_url, tiny_model_dir, log_dir) -> None:
    """Two extra messages for one chunk (what a redelivery, or a re-send beside a restored message, looks like)
    reach a real worker ahead of the rest: one copy is recorded, the others are dropped (at the take, or by the
    record's first-write-wins), and the job's counts are exact."""
    from celery import Celery

    from schemas.chunks import ChunkRef
    from store.queueing import celery_config, publish

    url = fresh_url
    rng = random.Random(44)
    body = {"requests": [{"query": random_text(rng, 2, 4), "documents": [random_text(rng, 5, 30) for _ in range(60)]}]}
    settings = farm_settings(url, tiny_model_dir, chunk_size=10)
    with TestClient(create_app(settings)) as client:
        job = client.post("/v1/jobs", json=body).json()  # no worker yet: every chunk waits in the queue
        copy = ChunkRef(job_id=job["id"], index=3, priority=5, lane=keys.interactive_queue(TINY), seq=0)
        sender = Celery("test-sender")
        sender.conf.update(celery_config(settings))
        publish(sender, [copy, copy])  # the interactive queue is consumed first: the copies arrive while the job runs
        worker = WorkerProcess(url, tiny_model_dir, log_dir, concurrency=1).start()
        try:
            done = wait_for(client, job["id"], timeout=120)
        finally:
            worker.stop()
            sender.close()
        assert done["status"] == "succeeded"
        assert done["progress"]["completed"] == 60 and sum(done["workers"].values()) == 60
    taken, outcomes = chunk_events(worker.log_path, job["id"])
    assert taken[3] == 3  # delivered three times
    assert outcomes[(3, "duplicate")] == 2, outcomes  # at the take, or by the record's first write
    assert outcomes[(3, "recorded")] + outcomes[(3, "finished")] == 1
