"""The commands a user types: `rerankfarm up` on a machine with no Redis configured, and a worker that cannot load
its model."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from rerankfarm.embedded_redis import free_port
from tests.conftest import VLLM_TEST_ENV

pytestmark = pytest.mark.integration


def test_worker_with_a_missing_model_stops_with_advice(tmp_path, redis_url) -> None:
    env = dict(
        os.environ, RERANK_REDIS_URL=redis_url, RERANK_MODEL=str(tmp_path / "no-such-model"), CUDA_VISIBLE_DEVICES=""
    )
    run = subprocess.run(
        [sys.executable, "-m", "rerankfarm.cli", "worker", "--name", "broken"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert "cannot start" in run.stderr and "RERANK_MODEL" in run.stderr
    assert "Traceback" not in run.stderr


def test_up_runs_the_example_job_on_an_embedded_redis(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
    env.update(HOME=str(tmp_path), CUDA_VISIBLE_DEVICES="", RERANK_WORKER_HEARTBEAT_S="1")
    run = subprocess.run(
        [sys.executable, "-m", "rerankfarm.cli", "up", "--tiny-model", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=420,  # the default vLLM engine compiles its model first: about a minute on 2 cores
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "embedded redis-server" in run.stdout
    assert "(vllm on cpu)" in run.stdout  # RERANK_ENGINE unset: the worker runs vLLM
    assert "succeeded: 14/14 pairs" in run.stdout
    for custom_id in ("capital-of-china", "gravity", "python-lists"):
        assert f"[{custom_id}]" in run.stdout
    assert run.stdout.count("  1. ") == 3
    assert "Celery" not in run.stdout and "celery@" not in run.stdout  # process logs go to files, not the screen
    logs = run.stdout.split("logs: ")[1].split("/{")[0]
    worker_log = (Path(logs) / "worker.log").read_text()
    assert "vllm engine ready" in worker_log  # RERANK_ENGINE unset: vLLM, since the cpu extra installs it
    webhooks_log = (Path(logs) / "webhooks.log").read_text()
    assert "webhooks@" in webhooks_log and " delivery slots" in webhooks_log  # the webhook worker ran too


def test_stopping_up_stops_everything_it_started(tmp_path) -> None:
    """SIGTERM to `rerankfarm up --serve` (as a service manager sends it) leaves no API, worker, engine, webhook
    worker or Redis behind."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
    env.update(HOME=str(tmp_path), CUDA_VISIBLE_DEVICES="", RERANK_WORKER_HEARTBEAT_S="1", **VLLM_TEST_ENV)
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "rerankfarm.cli", "up", "--tiny-model", "--serve", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while "serving on" not in log.read_text(errors="replace"):
            assert up.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 200
        tree = psutil.Process(up.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in tree)
        # redis-server, the API, the worker launcher and its worker, the webhook worker (Celery renames its own).
        assert "redis-server" in names and "cpu@" in names and "webhooks" in names and len(tree) >= 5, names
        up.send_signal(signal.SIGTERM)
        up.wait(90)
        _, alive = psutil.wait_procs(tree, timeout=60)
        assert not alive, [p.cmdline() for p in alive]
    finally:  # whatever happened above, leave nothing running for the tests after this one
        for p in [psutil.Process(up.pid), *tree] if up.poll() is None else tree:
            with contextlib.suppress(psutil.Error):
                p.kill()
        up.wait()
