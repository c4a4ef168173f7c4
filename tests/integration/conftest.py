"""Real parts: a redis-server (the machine's when RERANK_TEST_REDIS_URL names it, else an embedded one) and real
`rerankfarm worker` processes running the tiny model on the CPU."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from api.main import create_app
from rerankfarm.chaos import FarmWorker
from rerankfarm.embedded_redis import EmbeddedRedis
from schemas.settings import Settings
from tests.conftest import TINY, VLLM_TEST_ENV

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("RERANK_TEST_REDIS_URL")
    if url:
        redis.Redis.from_url(url).flushdb()
        yield url
        return
    with EmbeddedRedis() as server:
        yield server.url


class Databases:
    """The test server's databases but the session's (`redis_url`, where the session's `worker` consumes): a test or
    module that needs a farm of its own (its own workers, or none at all) takes one, flushed, and gives it back, so
    no two of them share one by accident."""

    def __init__(self, url: str) -> None:
        self.base, _, main = url.rpartition("/") if url.count("/") > 2 else (url, "", "0")
        count = int(redis.Redis.from_url(url).config_get("databases").get("databases", 16))
        self.free = [db for db in range(count) if db != int(main or 0)]

    @contextlib.contextmanager
    def take(self) -> Iterator[str]:
        db = self.free.pop(0)
        url = f"{self.base}/{db}"
        redis.Redis.from_url(url).flushdb()
        try:
            yield url
        finally:
            self.free.append(db)  # last in line: the next test gets another


@pytest.fixture(scope="session")
def databases(redis_url: str) -> Databases:
    return Databases(redis_url)


@pytest.fixture
def fresh_url(databases: Databases) -> Iterator[str]:
    """A database of the test server of this test's own, empty: no worker consumes there unless the test starts one."""
    with databases.take() as url:
        yield url


class WorkerProcess(FarmWorker):
    """`rerankfarm worker` as a user starts it (`rerankfarm.chaos.FarmWorker`), with the tests' engine settings and
    a 1 s heartbeat. `kill()` SIGKILLs its launcher, and the worker with it: a node lost, no warm shutdown."""

    def __init__(
        self, redis_url: str, model_dir: Path, log_dir: Path, name: str | None = None, concurrency: int = 2, **env: str
    ) -> None:
        test_env = {"RERANK_WORKER_HEARTBEAT_S": "1", "RERANK_WORKER_METRICS_PORT": "0", **VLLM_TEST_ENV, **env}
        super().__init__(redis_url, model_dir, log_dir, name, concurrency, test_env)
        self.concurrency = concurrency

    def start(self, timeout: float = 90) -> WorkerProcess:
        try:
            super().start(timeout)
        except RuntimeError as exc:
            raise AssertionError(str(exc)) from None
        return self


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def worker(redis_url: str, tiny_model_dir: Path, log_dir: Path) -> Iterator[WorkerProcess]:
    w = WorkerProcess(redis_url, tiny_model_dir, log_dir).start()
    yield w
    w.stop()


# The model names the client tests send, mapped on purpose to the tiny model (as a farm maps a client's default).
CLIENT_ALIASES = {
    name: TINY for name in ("rerank-v3.5", "rerank-english-v3.0", "rerank-2", "jina-reranker-v2-base-multilingual")
}


def farm_settings(redis_url: str, model_dir: Path, **overrides: Any) -> Settings:
    defaults = {"chunk_size": 5, "auth": "off", "model_aliases": CLIENT_ALIASES}
    return Settings(redis_url=redis_url, model=str(model_dir), **{**defaults, **overrides})


@pytest.fixture
def client(redis_url: str, tiny_model_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(farm_settings(redis_url, tiny_model_dir))) as c:
        yield c


def wait_for(
    client: TestClient,
    job_id: str,
    timeout: float = 120,
    until: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] in until:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s: {job}")
        time.sleep(0.1)


def wait_for_all(client: TestClient, job_ids: list[str], stall_s: float = 120) -> list[dict[str, Any]]:
    """Every job, once each has ended. The jobs share the engine fairly (`store.backlog`), so they end together near
    the end, however long that takes on a loaded machine: what fails is `stall_s` seconds without a pair scored in
    any of them (a job that hangs), not a slow run."""
    jobs: dict[str, dict[str, Any]] = {}
    done, moved_at = -1, time.monotonic()
    while True:
        for job_id in job_ids:
            if jobs.get(job_id, {}).get("status") not in ("succeeded", "failed", "cancelled"):
                jobs[job_id] = client.get(f"/v1/jobs/{job_id}").json()
        if all(job["status"] in ("succeeded", "failed", "cancelled") for job in jobs.values()):
            return [jobs[job_id] for job_id in job_ids]
        scored = sum(job["progress"]["completed"] for job in jobs.values())
        if scored > done:
            done, moved_at = scored, time.monotonic()
        elif time.monotonic() - moved_at > stall_s:
            waiting = [job for job in jobs.values() if job["status"] not in ("succeeded", "failed", "cancelled")]
            raise AssertionError(f"{len(waiting)} job(s) scored nothing in {stall_s}s: {waiting[0]}")
        time.sleep(1.0)


@contextlib.contextmanager
def serve(settings: Settings) -> Iterator[str]:
    """The API served by uvicorn on a free port, for clients that speak real HTTP (SDKs, browsers, fuzzers)."""
    import threading

    import uvicorn

    from rerankfarm.embedded_redis import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def live_api(redis_url: str, tiny_model_dir: Path) -> Iterator[str]:
    with serve(farm_settings(redis_url, tiny_model_dir)) as url:
        yield url
