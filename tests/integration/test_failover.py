"""Redis high availability with real processes: a primary, a replica and three sentinels on localhost, the farm on a
`sentinel://` URL, the primary SIGKILLed under load. Every job answered 202, before and after the failover,
completes; the time the API answered 503 is measured."""

from __future__ import annotations

import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from rerankfarm.embedded_redis import EmbeddedRedis, free_port, redis_server_binary
from tests.conftest import random_text
from tests.integration.conftest import WorkerProcess, farm_settings, serve

pytestmark = pytest.mark.integration

MASTER = "rfmaster"


class Sentinels:
    """Three `redis-server --sentinel` processes watching one primary (quorum 2, down after 1 s)."""

    def __init__(self, primary_port: int) -> None:
        self.ports = [free_port() for _ in range(3)]
        self.primary_port = primary_port
        self.dir = Path(tempfile.mkdtemp(prefix="rerankfarm-sentinel-"))
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> Sentinels:
        for port in self.ports:
            conf = self.dir / f"sentinel-{port}.conf"  # a sentinel rewrites its own config file
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.primary_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} 1000\n"
                f"sentinel failover-timeout {MASTER} 10000\n"
                f"sentinel parallel-syncs {MASTER} 1\n"
            )
            self.processes.append(
                subprocess.Popen([redis_server_binary(), str(conf), "--sentinel"], stdout=subprocess.DEVNULL)
            )
        deadline = time.monotonic() + 20
        for port in self.ports:
            while True:
                try:
                    client = redis.Redis(port=port)
                    if int(client.sentinel_master(MASTER)["num-other-sentinels"]) == 2:
                        break
                except (redis.ConnectionError, redis.ResponseError, KeyError):
                    pass
                assert time.monotonic() < deadline, "the sentinels did not find each other"
                time.sleep(0.2)
        return self

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{port}" for port in self.ports) + f"/0?master_name={MASTER}"

    def master_port(self) -> int:
        return int(redis.Redis(port=self.ports[0]).sentinel_get_master_addr_by_name(MASTER)[1])

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
            process.wait(10)


@pytest.fixture
def replicated() -> Iterator[tuple[EmbeddedRedis, EmbeddedRedis, Sentinels]]:
    primary = EmbeddedRedis().start()
    replica = EmbeddedRedis(extra_args=("--replicaof", "127.0.0.1", str(primary.port))).start()
    deadline = time.monotonic() + 20
    while redis.Redis(port=primary.port).info("replication")["connected_slaves"] < 1:
        assert time.monotonic() < deadline, "the replica did not connect"
        time.sleep(0.1)
    sentinels = Sentinels(primary.port).start()
    try:
        yield primary, replica, sentinels
    finally:
        sentinels.stop()
        replica.stop()
        primary.stop()


def test_primary_killed_under_load_every_accepted_job_completes(replicated, tiny_model_dir, log_dir) -> None:
    primary, replica, sentinels = replicated
    url = sentinels.url
    worker = WorkerProcess(url, tiny_model_dir, log_dir, RERANK_VISIBILITY_TIMEOUT_S="5").start()
    accepted: list[tuple[str, int]] = []
    answers: list[tuple[float, int]] = []  # (time, status) of every submission
    stop = threading.Event()
    settings = farm_settings(url, tiny_model_dir, max_jobs_in_flight_per_tenant=10_000, rate_limit_per_minute=0)
    try:
        with serve(settings) as api:

            def submit() -> None:
                import random

                rng = random.Random(61)
                with httpx.Client(base_url=api, timeout=30) as http:
                    while not stop.is_set():
                        docs = [random_text(rng, 5, 40) for _ in range(rng.randint(5, 30))]
                        body = {"requests": [{"query": random_text(rng, 1, 4), "documents": docs}]}
                        try:
                            r = http.post("/v1/jobs", json=body)
                            status = r.status_code
                        except httpx.HTTPError:
                            status = 0
                        answers.append((time.monotonic(), status))
                        if status == 202:
                            accepted.append((r.json()["id"], len(docs)))
                        time.sleep(0.05)

            thread = threading.Thread(target=submit)
            thread.start()
            while len(accepted) < 20:
                time.sleep(0.1)
            before = len(accepted)
            primary.kill()
            killed_at = time.monotonic()
            deadline = killed_at + 60
            while sentinels.master_port() != replica.port or not [
                a for a in answers if a[0] > killed_at and a[1] == 202
            ]:
                assert time.monotonic() < deadline, "no failover, or no job accepted after it, within 60 s"
                time.sleep(0.2)
            time.sleep(5)  # more jobs on the new primary
            stop.set()
            thread.join(60)
            refused = [t for t, status in answers if t > killed_at and status != 202]
            first_after = min(t for t, status in answers if t > killed_at and status == 202)
            print(
                f"failover: {before} jobs accepted before the kill, {len(accepted) - before} after; "
                f"503 (or no answer) for {first_after - killed_at:.1f} s after the kill "
                f"({len(refused)} submissions refused)"
            )
            assert {status for _, status in answers} <= {202, 503, 0}
            assert len(accepted) > before
            with httpx.Client(base_url=api, timeout=30) as http:
                pending = dict(accepted)
                deadline = time.monotonic() + 180
                while pending and time.monotonic() < deadline:
                    for job_id in list(pending):
                        job = http.get(f"/v1/jobs/{job_id}").json()
                        if job["status"] in ("succeeded", "failed", "cancelled"):
                            n = pending.pop(job_id)
                            assert job["status"] == "succeeded", job
                            assert job["progress"]["completed"] == n == sum(job["workers"].values()), job
                    time.sleep(0.2)
                assert not pending, f"{len(pending)} accepted jobs never finished"
    finally:
        stop.set()
        worker.stop()
