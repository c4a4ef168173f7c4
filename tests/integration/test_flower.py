"""Flower started by the CLI answers with auth and lists the queues and workers of a running farm."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from rerankfarm.embedded_redis import free_port
from tests.conftest import TINY

pytestmark = pytest.mark.integration


def test_flower_needs_a_password_in_production(redis_url) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
    env.update(RERANK_REDIS_URL=redis_url, RERANK_AUTH="on")
    run = subprocess.run(
        [sys.executable, "-m", "rerankfarm.cli", "flower"], env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode != 0 and "RERANK_FLOWER_PASSWORD" in run.stderr


def test_flower_shows_workers_and_queues_behind_basic_auth(redis_url, worker, client, log_dir) -> None:
    port = free_port()
    env = dict(
        os.environ, RERANK_REDIS_URL=redis_url, RERANK_FLOWER_PASSWORD="s3cret-test", RERANK_FLOWER_PORT=str(port)
    )
    with (log_dir / "flower.log").open("ab") as log:
        flower = subprocess.Popen(
            [sys.executable, "-m", "rerankfarm.cli", "flower"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthcheck", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert flower.poll() is None and time.monotonic() < deadline, (log_dir / "flower.log").read_text()[-2000:]
            time.sleep(0.3)
        assert httpx.get(f"{base}/api/workers", timeout=10).status_code == 401
        auth = ("admin", "s3cret-test")
        client.post("/v1/jobs", json={"requests": [{"query": "w1", "documents": ["w2"] * 30}]})
        deadline = time.monotonic() + 60
        while True:
            workers = httpx.get(f"{base}/api/workers", params={"refresh": "true"}, auth=auth, timeout=30).json()
            if any(name.startswith(f"{worker.node}@") for name in workers):
                break
            assert time.monotonic() < deadline, workers
            time.sleep(1)
        queues = httpx.get(f"{base}/api/queues/length", auth=auth, timeout=30).json()
        names = {q["name"] for q in queues["active_queues"]}
        assert {f"rerank.bulk.{TINY}", f"rerank.interactive.{TINY}"} <= names, queues
        # Stopping `rerankfarm flower` stops Flower: it is the same process (no child to orphan), and nothing of it
        # is left listening.
        tree = [psutil.Process(flower.pid), *psutil.Process(flower.pid).children(recursive=True)]
        assert "flower" in " ".join(tree[0].cmdline())
        flower.send_signal(signal.SIGTERM)
        flower.wait(30)
        _, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        if flower.poll() is None:
            flower.kill()
            flower.wait(30)
