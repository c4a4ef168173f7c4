"""Faults as they happen, with real processes: a message lost between kombu's pop and its unacked record, a worker
frozen past two leases, a worker cut off from Redis by the network, a launcher SIGKILLed. Every job completes with
every pair counted once."""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from fastapi.testclient import TestClient

from api.main import create_app
from rerankfarm import chaos
from rerankfarm.embedded_redis import EmbeddedRedis, free_port
from store.queueing import job_lane
from tests.conftest import TINY, random_text
from tests.integration.conftest import WorkerProcess, farm_settings, wait_for
from tests.integration.test_crash_recovery import _assert_every_pair_scored_once, chunk_events, stall_holding

pytestmark = pytest.mark.integration


def _body(seed: int, requests: int, documents: int, low: int = 100, high: int = 250) -> dict[str, Any]:
    rng = random.Random(seed)
    return {
        "requests": [
            {"query": random_text(rng, 2, 5), "documents": [random_text(rng, low, high) for _ in range(documents)]}
            for _ in range(requests)
        ]
    }


def _message_chunk(raw: bytes) -> tuple[str, int]:
    """The (job id, chunk index) a kombu message in a queue list carries (Celery protocol 2, base64 body)."""
    args, _kwargs, _embed = json.loads(base64.b64decode(json.loads(raw)["body"]))
    return args[0]["job_id"], args[0]["index"]


def _outlast_three_leases(
    url: str,
    model_dir: Path,
    stalled: WorkerProcess,
    other: WorkerProcess,
    stall: Callable[[], object],
    resume: Callable[[], object],
    seed: int,
) -> None:
    """A job; once `stalled` holds chunks, `stall()` for three 5 s leases, during which `other` must take them, then
    `resume()`; the job completes with every pair counted once."""
    body = _body(seed, 4, 150)
    with TestClient(create_app(farm_settings(url, model_dir, chunk_size=10))) as client:
        job = client.post("/v1/jobs", json=body).json()
        held = stall_holding(stalled, job["id"], stall, resume)
        try:
            time.sleep(15)
            taken_by_other, _ = chunk_events(other.log_path, job["id"])
        finally:
            resume()
        assert held & set(taken_by_other), (held, taken_by_other)  # scored by the other meanwhile
        done = wait_for(client, job["id"], timeout=180)
        assert done["status"] == "succeeded", done
        _assert_every_pair_scored_once(client, job, body, url)


def test_a_chunk_message_lost_from_its_queue_is_scored_again_within_60s(fresh_url, tiny_model_dir, log_dir) -> None:
    """What a worker killed between kombu's BRPOP and its unacked record leaves: the message is nowhere in Redis's
    queues. With default settings the farm's ledger finds the chunk and sends it again; the job completes."""
    url = fresh_url
    r = redis.Redis.from_url(url)
    r.flushdb()
    body = _body(51, 2, 30, 5, 30)
    with TestClient(create_app(farm_settings(url, tiny_model_dir, chunk_size=10))) as client:
        job = client.post("/v1/jobs", json=body).json()  # no worker yet: its 6 chunks wait in their lane
        lane = job_lane("bulk", 5, TINY)
        [lost] = [raw for raw in r.lrange(lane, 0, -1) if _message_chunk(raw) == (job["id"], 2)]
        assert r.lrem(lane, 1, lost) == 1
        removed_at = time.monotonic()
        worker = WorkerProcess(url, tiny_model_dir, log_dir).start()
        try:
            done = wait_for(client, job["id"], timeout=120)
            recovered_after = time.monotonic() - removed_at
            assert done["status"] == "succeeded", done
            _assert_every_pair_scored_once(client, job, body, url)
        finally:
            worker.stop()
    sent_again = [e for e in chaos.chunk_events(worker.log_path) if e["event"] == "chunk.sent_again"]
    assert [(e["job"], e["chunk"], e["cause"], e["send"]) for e in sent_again] == [(job["id"], 2, "lost", 2)]
    print(f"the lost chunk was scored {recovered_after:.1f} s after its message was removed")
    assert recovered_after < 60


def test_a_worker_frozen_past_two_leases_loses_nothing(fresh_url, tiny_model_dir, log_dir) -> None:
    """SIGSTOP of a worker holding chunks, for three 5 s leases: another worker scores them meanwhile. Resumed, the
    frozen worker finishes its copies late and acks them with the same delivery tags as the copies the other
    worker took (kombu reuses tags on redelivery); the job still completes, every pair counted once."""
    url = fresh_url
    lease = {"RERANK_VISIBILITY_TIMEOUT_S": "5"}
    frozen = WorkerProcess(url, tiny_model_dir, log_dir, **lease).start()
    other = WorkerProcess(url, tiny_model_dir, log_dir, **lease).start()
    pid = frozen.pid()
    try:
        stop, cont = (lambda: os.kill(pid, signal.SIGSTOP)), (lambda: os.kill(pid, signal.SIGCONT))
        _outlast_three_leases(url, tiny_model_dir, frozen, other, stop, cont, seed=52)
    finally:
        frozen.stop()
        other.stop()


def test_a_sigkilled_launcher_leaves_no_worker_or_engine_process(fresh_url, tiny_model_dir, log_dir) -> None:
    """`rerankfarm worker` SIGKILLed, with vLLM's engine core in processes of its own: the worker dies with its
    launcher (PR_SET_PDEATHSIG), and the worker's reaper ends its process group, engine processes included."""
    url = fresh_url
    worker = WorkerProcess(url, tiny_model_dir, log_dir, RERANK_VLLM_IN_PROCESS="false").start()
    try:
        assert worker.process is not None
        tree = psutil.Process(worker.process.pid).children(recursive=True)
        assert any("VLLM" in " ".join(p.cmdline()) or "spawn_main" in " ".join(p.cmdline()) for p in tree), [
            p.cmdline() for p in tree
        ]
        worker.process.kill()  # the launcher alone
        worker.process.wait()
        _, alive = psutil.wait_procs(tree, timeout=20)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        worker.stop()


# --- a network partition ------------------------------------------------------------------------------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def namespace() -> Iterator[tuple[str, str, str]]:
    """A network namespace joined to this one by a veth pair: (namespace, host-side link, host-side address)."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        if os.environ.get("CI"):
            raise RuntimeError("CI runs as root with iproute2: the partition test must run")
        pytest.skip("network namespaces need root and iproute2")
    tag = uuid.uuid4().hex[:6]
    ns, host, inner = f"rf{tag}", f"rfh{tag}", f"rfn{tag}"
    octet = random.Random(tag).randrange(1, 250)
    host_addr, inner_addr = f"10.213.{octet}.1", f"10.213.{octet}.2"
    try:
        _ip("netns", "add", ns)
    except subprocess.CalledProcessError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"this machine refuses network namespaces: {exc.stderr.decode().strip()}")
    try:
        _ip("link", "add", host, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", ns)
        _ip("addr", "add", f"{host_addr}/30", "dev", host)
        _ip("link", "set", host, "up")
        _ip("netns", "exec", ns, "ip", "addr", "add", f"{inner_addr}/30", "dev", inner)
        _ip("netns", "exec", ns, "ip", "link", "set", inner, "up")
        _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns, host, host_addr
    finally:
        subprocess.run(["ip", "link", "del", host], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_a_worker_cut_off_from_redis_longer_than_two_leases_loses_nothing(namespace, tiny_model_dir, log_dir) -> None:
    """One worker in a network namespace reaches Redis over a veth pair; the link goes down for three 5 s leases
    while it holds chunks, then comes back. The worker on this side scores them meanwhile; the cut-off worker's
    late writes and acks change nothing: the job completes with every pair counted once."""
    ns, link, address = namespace
    port = free_port()
    with EmbeddedRedis(port=port, bind=("127.0.0.1", address)) as server:
        url = f"redis://{address}:{server.port}/0"
        lease = {"RERANK_VISIBILITY_TIMEOUT_S": "5"}
        cut = WorkerProcess(url, tiny_model_dir, log_dir, **lease)
        cut.args = ["ip", "netns", "exec", ns, *cut.args]
        cut.start()
        near = WorkerProcess(url, tiny_model_dir, log_dir, **lease).start()
        try:
            down, up = (lambda: _ip("link", "set", link, "down")), (lambda: _ip("link", "set", link, "up"))
            _outlast_three_leases(url, tiny_model_dir, cut, near, down, up, seed=53)
        finally:
            cut.stop()
            near.stop()
