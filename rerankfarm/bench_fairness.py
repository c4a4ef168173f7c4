"""`python -m rerankfarm.bench_fairness`: two tenants on one real farm (an embedded Redis, the API, one worker, the
tiny model), the way issue #28 measured the FIFO it replaced. Prints a table and writes JSON.

1. Idle: tenant B's 64-pair job alone (`--repeats` times; the median is its idle latency), and the farm's pace.
2. For each weight pair (1:1, then 3:1 for A): tenant A queues `--backlog-s` seconds of work (jobs of 2,000 pairs,
   at the idle pace); 3 s later B submits its 64-pair job (its latency, against max(5 s, 5 x idle)); then B queues a
   backlog as large as A's, and once B's first chunks are scored (what A had in the lanes then has drained), each
   tenant's pairs scored are sampled every second for `--window-s` seconds while both have work waiting (each
   backlog holds a window's worth more, and the run says whether both still waited at its end): A's share
   of the pairs served per second and over the window (target: within 10% of the weights; pairs count when their
   chunk is recorded, so one second holds a few chunks), and the engine's busy share over the window (engine seconds
   from the worker's heartbeat / wall seconds: the engine never idle while a backlog waits). Then every job is
   cancelled.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from schemas import keys

JOB_PAIRS = 2000
SMALL_PAIRS = 64


def body(rng: random.Random, pairs: int) -> dict[str, Any]:
    """One query per 100 documents of 40..120 words, as `rerankfarm bench`'s workload (shorter documents)."""
    requests = []
    while pairs > 0:
        n = min(100, pairs)
        docs = [" ".join(f"w{rng.randrange(500)}" for _ in range(rng.randint(40, 120))) for _ in range(n)]
        requests.append({"query": " ".join(f"w{rng.randrange(500)}" for _ in range(8)), "documents": docs})
        pairs -= n
    return {"requests": requests}


def submit(client: httpx.Client, job: dict[str, Any]) -> str:
    r = client.post("/v1/jobs", json=job)
    r.raise_for_status()
    return str(r.json()["id"])


def wait(client: httpx.Client, job_id: str, timeout: float = 600) -> float:
    """Seconds from now until the job succeeded (polled every 50 ms)."""
    started = time.perf_counter()
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "succeeded":
            return time.perf_counter() - started
        if job["status"] in ("failed", "cancelled") or time.perf_counter() - started > timeout:
            raise RuntimeError(f"bench job {job_id}: {job['status']} {job.get('error')}")
        time.sleep(0.05)


def served(r: redis.Redis, job_ids: list[str]) -> int:
    with r.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hget(keys.job_key(job_id), "completed")
        return sum(int(v or 0) for v in pipe.execute())


def engine_seconds(r: redis.Redis) -> float:
    """The engine's busy seconds, summed over the workers' heartbeats (`workers.engines.base.EngineStats`)."""
    return sum(json.loads(r.get(k) or "{}").get("engine_s", 0.0) for k in r.scan_iter(match=keys.WORKER_KEY_PATTERN))


def scenario(
    r: redis.Redis,
    clients: dict[str, httpx.Client],
    weights: tuple[float, float],
    backlog_jobs: int,
    window_s: float,
    idle_s: float,
    rng: random.Random,
    window_jobs: int,
) -> dict[str, Any]:
    """One weight pair. Each tenant's backlog holds `window_jobs` more jobs than `backlog_jobs`, enough for the whole
    window at the idle pace, so that both still have work waiting when the window ends (`both_waiting`; a share
    measured after one ran dry says nothing of the weights)."""
    from store import backlog, moves

    a, b = clients["a"], clients["b"]
    backlog.set_weight(r, "tenant-a", weights[0])
    backlog.set_weight(r, "tenant-b", weights[1])
    jobs_a = [submit(a, body(rng, JOB_PAIRS)) for _ in range(backlog_jobs + window_jobs)]
    time.sleep(3)
    small = submit(b, body(rng, SMALL_PAIRS))
    small_s = wait(b, small)
    print(f"  weights {weights[0]:g}:{weights[1]:g}: B's {SMALL_PAIRS}-pair job behind A's backlog: {small_s:.2f} s")
    jobs_b = [submit(b, body(rng, JOB_PAIRS)) for _ in range(backlog_jobs + window_jobs)]
    while served(r, jobs_b) < 2 * 256:  # two chunks (RERANK_CHUNK_SIZE): what A had in the lanes then has drained
        time.sleep(0.1)
    samples = []
    engine0, t0 = engine_seconds(r), time.perf_counter()
    for _ in range(int(window_s)):
        samples.append((time.perf_counter(), served(r, jobs_a), served(r, jobs_b)))
        time.sleep(1)
    samples.append((time.perf_counter(), served(r, jobs_a), served(r, jobs_b)))
    busy = (engine_seconds(r) - engine0) / (time.perf_counter() - t0)
    model = a.get(f"/v1/jobs/{jobs_a[0]}").json()["model"]
    waiting = {tenant: chunks for tenant, (chunks, _) in moves.Runner(r)(backlog.waiting(model)).tenants.items()}
    per_second = []
    for (_, a1, b1), (_, a2, b2) in itertools.pairwise(samples):
        total = (a2 - a1) + (b2 - b1)
        per_second.append(round((a2 - a1) / total, 3) if total else None)
    total_a, total_b = samples[-1][1] - samples[0][1], samples[-1][2] - samples[0][2]
    share_a = total_a / max(total_a + total_b, 1)
    target = weights[0] / sum(weights)
    for job_id in jobs_a:
        a.post(f"/v1/jobs/{job_id}/cancel")
    for job_id in jobs_b:
        b.post(f"/v1/jobs/{job_id}/cancel")
    time.sleep(3)  # the lane's cancelled chunks are skipped
    bound = max(5.0, 5 * idle_s)
    return {
        "weights": list(weights),
        "small_job_s": round(small_s, 3),
        "small_job_bound_s": round(bound, 3),
        "small_job_met": small_s <= bound,
        "window_s": round(samples[-1][0] - samples[0][0], 1),
        "pairs_served": {"a": total_a, "b": total_b},
        "share_a": round(share_a, 3),
        "share_a_target": round(target, 3),
        "share_met": abs(share_a - target) <= 0.1 * target,
        "share_a_per_second": per_second,
        "engine_busy": round(busy, 3),
        "backlog_waiting_at_end": waiting,
        "both_waiting": all(waiting.get(f"tenant-{name}", 0) > 0 for name in ("a", "b")),
    }


def main(engine: str, backlog_s: float, window_s: float, repeats: int, json_path: str | None, port: int) -> dict:
    from rerankfarm.cli import tiny_model
    from rerankfarm.local_farm import LocalFarm
    from store.api_keys import create_key

    model = tiny_model("tiny")
    assert model is not None
    rng = random.Random(0)
    env = {"RERANK_ENGINE": engine, "RERANK_AUTH": "on", "RERANK_WORKER_HEARTBEAT_S": "1"}
    with LocalFarm(model, port, extra_env=env) as farm:
        workers = farm.wait_ready(60)
        r = redis.Redis.from_url(farm.redis_url)
        clients = {}
        for name in ("a", "b"):
            key, _ = create_key(r, f"tenant-{name}")
            clients[name] = httpx.Client(base_url=farm.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
        try:
            wait(clients["b"], submit(clients["b"], body(rng, SMALL_PAIRS)))  # warm up
            small = [wait(clients["b"], submit(clients["b"], body(rng, SMALL_PAIRS))) for _ in range(repeats)]
            idle = statistics.median(small)
            pace_s = wait(clients["a"], submit(clients["a"], body(rng, JOB_PAIRS)))
            pace = JOB_PAIRS / pace_s
            backlog_jobs = max(2, round(backlog_s * pace / JOB_PAIRS))
            work_s = backlog_jobs * JOB_PAIRS / pace
            print(f"idle: B's {SMALL_PAIRS}-pair job {idle:.3f} s; {JOB_PAIRS} pairs alone {pace:.0f} pairs/s; A's "
                  f"backlog: {backlog_jobs} jobs of {JOB_PAIRS} pairs (~{work_s:.0f} s)")  # fmt: skip
            window_jobs = math.ceil(window_s * pace / JOB_PAIRS) + 1
            runs = [scenario(r, clients, w, backlog_jobs, window_s, idle, rng, window_jobs) for w in ((1, 1), (3, 1))]
        finally:
            for client in clients.values():
                client.close()
    result = {
        "machine": platform.node(),
        "engine": engine,
        "workers": workers,
        "idle_small_job_s": round(idle, 3),
        "idle_pairs_per_s": round(pace, 1),
        "backlog_jobs": backlog_jobs,
        "job_pairs": JOB_PAIRS,
        "small_job_pairs": SMALL_PAIRS,
        "runs": runs,
    }
    print(f"\nengine {engine}; idle: B's {SMALL_PAIRS}-pair job {idle:.3f} s, {pace:.0f} pairs/s; A's backlog "
          f"{backlog_jobs} x {JOB_PAIRS} pairs\n")  # fmt: skip
    print("| weights A:B | B's 64-pair job behind A's backlog (bound) | A's share of pairs served (target) | "
          "engine busy |\n| --- | --- | --- | --- |")  # fmt: skip
    for run in runs:
        print(
            f"| {run['weights'][0]}:{run['weights'][1]} | {run['small_job_s']} s ({run['small_job_bound_s']} s) | "
            f"{run['share_a']:.1%} ({run['share_a_target']:.1%}) over {run['window_s']} s | {run['engine_busy']:.1%} |"
        )
    for run in runs:
        print(f"A's share per second, {run['weights'][0]}:{run['weights'][1]}: {run['share_a_per_second']}")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
        print(f"wrote {json_path}")
    return result


if __name__ == "__main__":
    from rerankfarm.embedded_redis import free_port

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", default="transformers", choices=["transformers", "vllm"])
    parser.add_argument("--backlog-s", type=float, default=60, help="seconds of work in tenant A's backlog")
    parser.add_argument("--window-s", type=float, default=30, help="seconds the shares are sampled for")
    parser.add_argument("--repeats", type=int, default=3, help="idle runs of B's small job")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args()
    main(args.engine, args.backlog_s, args.window_s, args.repeats, args.json, args.port or free_port())
