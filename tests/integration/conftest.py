"""Real parts: a redis-server (the machine's when RERANK_TEST_REDIS_URL names it, else an embedded one) and real
`rerankfarm worker` processes running the tiny model on the CPU."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from api.main import create_app
from rerankfarm.embedded_redis import EmbeddedRedis
from schemas import keys
from schemas.settings import Settings
from tests.conftest import VLLM_TEST_ENV

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


def other_db(url: str, db: int) -> str:
    """The same server, another database: a farm with no worker in it."""
    base = url.rsplit("/", 1)[0] if url.count("/") > 2 else url
    return f"{base}/{db}"


class WorkerProcess:
    """`rerankfarm worker` as a user starts it, logging to a file."""

    def __init__(
        self, redis_url: str, model_dir: Path, log_dir: Path, name: str | None = None, concurrency: int = 2, **env: str
    ) -> None:
        self.name = name or f"t{uuid.uuid4().hex[:6]}"
        self.concurrency = concurrency
        self.node = f"{self.name}-cpu"  # the launcher's name for a CPU worker; its hostname is NODE@host
        self.redis = redis.Redis.from_url(redis_url)
        self.log_path = log_dir / f"worker-{self.name}.log"
        self.env = dict(
            os.environ,
            RERANK_REDIS_URL=redis_url,
            RERANK_MODEL=str(model_dir),
            CUDA_VISIBLE_DEVICES="",
            RERANK_WORKER_HEARTBEAT_S="1",
            **{"RERANK_WORKER_METRICS_PORT": "0", **VLLM_TEST_ENV, **env},
        )
        self.args = [
            sys.executable,
            "-m",
            "rerankfarm.cli",
            "worker",
            "--name",
            self.name,
            "--concurrency",
            str(concurrency),
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90) -> WorkerProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.alive_hostnames():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"worker {self.name} did not start:\n{self.log()}")
            time.sleep(0.2)
        return self

    def alive_hostnames(self) -> list[str]:
        found = [k.decode().split(":", 2)[2] for k in self.redis.scan_iter(match=keys.WORKER_KEY_PATTERN)]
        return [h for h in found if h.startswith(f"{self.node}@")]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def pid(self) -> int:
        """The Celery worker process (the launcher's child), from its heartbeat."""
        [hostname] = self.alive_hostnames()
        info = self.redis.get(keys.worker_key(hostname))
        assert info is not None
        return int(json.loads(info)["pid"])

    def kill(self) -> None:
        """SIGKILL the worker process and its launcher: a node lost, no warm shutdown."""
        hostnames = self.alive_hostnames()
        os.kill(self.pid(), signal.SIGKILL)
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        for hostname in hostnames:
            self.redis.delete(keys.worker_key(hostname))  # its heartbeat would linger until its TTL

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def worker(redis_url: str, tiny_model_dir: Path, log_dir: Path) -> Iterator[WorkerProcess]:
    w = WorkerProcess(redis_url, tiny_model_dir, log_dir).start()
    yield w
    w.stop()


def farm_settings(redis_url: str, model_dir: Path, **overrides: Any) -> Settings:
    return Settings(redis_url=redis_url, model=str(model_dir), **{"chunk_size": 5, "auth": "off", **overrides})


@pytest.fixture
def client(redis_url: str, tiny_model_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(farm_settings(redis_url, tiny_model_dir))) as c:
        yield c


def wait_for(
    client: TestClient, job_id: str, timeout: float = 120, until: tuple[str, ...] = ("succeeded", "failed", "cancelled")
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in until:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s: {job}")
        time.sleep(0.1)


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
