"""A test-sized soak: many small jobs from several concurrent clients, a worker restarted in the middle; every job
must succeed with every pair scored."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import httpx
import pytest

from tests.conftest import random_text
from tests.integration.conftest import WorkerProcess, farm_settings, serve

pytestmark = pytest.mark.integration

CLIENTS, JOBS_PER_CLIENT = 4, 250


def test_soak_with_a_worker_restart(redis_url, tiny_model_dir, log_dir) -> None:
    first = WorkerProcess(redis_url, tiny_model_dir, log_dir).start()
    submitted: list[tuple[str, int]] = []
    errors: list[str] = []
    lock = threading.Lock()
    settings = farm_settings(redis_url, tiny_model_dir, max_jobs_in_flight_per_tenant=10_000, rate_limit_per_minute=0)
    with serve(settings) as url:

        def client(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(base_url=url, timeout=30) as http:
                for _ in range(JOBS_PER_CLIENT):
                    docs = [random_text(rng, 2, 20) for _ in range(rng.randint(1, 4))]
                    r = http.post("/v1/jobs", json={"requests": [{"query": random_text(rng, 1, 4), "documents": docs}]})
                    with lock:
                        if r.status_code == 202:
                            submitted.append((r.json()["id"], len(docs)))
                        else:
                            errors.append(f"{r.status_code} {r.text[:200]}")

        threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
        for t in threads:
            t.start()
        while len(submitted) < CLIENTS * JOBS_PER_CLIENT // 2:
            time.sleep(0.1)
        # Warm shutdown mid-soak; a new worker takes over. (A SIGKILL here lost 1 job of 1,000 in one of two runs:
        # kombu's Redis transport pops a message before it records it as unacked. Crash recovery is tested in
        # test_crash_recovery.py; closing that window belongs to the crash-recovery issue.)
        first.stop()
        second = WorkerProcess(redis_url, tiny_model_dir, log_dir).start()
        for t in threads:
            t.join(120)
        try:
            statuses: Counter[str] = Counter()
            deadline = time.monotonic() + 180
            with httpx.Client(base_url=url, timeout=30) as http:
                pending = dict(submitted)
                while pending and time.monotonic() < deadline:
                    for job_id in list(pending):
                        job = http.get(f"/v1/jobs/{job_id}").json()
                        if job["status"] in ("succeeded", "failed", "cancelled"):
                            assert job["progress"]["completed"] == pending.pop(job_id) or job["status"] != "succeeded"
                            statuses[job["status"]] += 1
                    time.sleep(0.2)
            print(
                f"soak: {len(submitted)} jobs submitted by {CLIENTS} clients, {len(errors)} refused, "
                f"outcomes {dict(statuses)}, {len(pending)} unfinished"
            )
        finally:
            second.stop()
    assert errors == []
    assert statuses == Counter({"succeeded": CLIENTS * JOBS_PER_CLIENT})
