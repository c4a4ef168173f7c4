"""Per-process worker state: the prompt builder, the engine (which schedules its own work), the runner of the jobs'
moves and the dispatcher, created once before consuming, plus the heartbeat that tells the API this worker is alive
(and ends a worker whose engine died)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from schemas import keys, metrics
from schemas.settings import Settings
from store import moves
from store.codec import now_iso
from store.connect import redis_client
from store.dispatch import Dispatcher
from store.redis_memory import waiting_for_room
from workers.engines.base import Engine
from workers.engines.factory import load_engine
from workers.prompts import Prompts, load_prompts

logger = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    prompts: Prompts
    engine: Engine
    redis: redis.Redis
    run: moves.Runner  # the jobs' moves (`store.job_state.JobHandle`)
    with_room: Callable[..., Any]  # with_room(run, move): a take or a record waits for room in a full Redis
    dispatcher: Dispatcher

    def close(self) -> None:
        """Free the engine (vLLM: its engine core and memory)."""
        self.engine.close()


EXIT_ENGINE_DEAD = 3  # the launcher restarts a worker that exits with this (EXIT_CONFIG=2 stops everything)
_runtime: Runtime | None = None
_lock = threading.Lock()


def start(settings: Settings) -> Runtime:
    """Load the engine (raises EngineLoadError with advice) and build the runtime, once per process."""
    global _runtime
    with _lock:
        if _runtime is None:
            prompts = load_prompts(settings)
            engine = load_engine(settings, prompts)
            client = redis_client(
                settings.redis_url, health_check_interval=30, socket_timeout=10, **outage_retry(settings)
            )
            from workers.celery_app import app  # (the app's module imports no runtime)

            with_room = waiting_for_room(settings.store_full_wait_s)
            dispatcher = Dispatcher(client, app, settings)
            _runtime = Runtime(settings, prompts, engine, client, moves.Runner(client), with_room, dispatcher)
        return _runtime


def outage_retry(settings: Settings) -> dict[str, Any]:
    """redis-py retries for the worker's job-store writes: a chunk scored while Redis restarts is written once it is
    back (the writes are idempotent), for up to half the chunk timeout; after that the task fails and its unacked
    message is redelivered."""
    budget = settings.chunk_timeout_s * 0.5
    backoff = ExponentialBackoff(cap=2.0, base=0.05)  # 0.05, 0.1, 0.2 ... then 2 s per retry
    retries, waited = 0, 0.0
    while waited < budget:
        retries += 1
        waited += backoff.compute(retries)
    return {"retry": Retry(backoff, retries=retries), "retry_on_error": [redis.ConnectionError, redis.TimeoutError]}


def close() -> None:
    """Free the runtime's engine, if it was started."""
    if _runtime is not None:
        _runtime.close()


def get() -> Runtime:
    if _runtime is None:
        raise RuntimeError("worker runtime not started: run workers through `rerankfarm worker`")
    return _runtime


class Heartbeat:
    """Keeps `rerank:worker:{hostname}` alive while the worker consumes; /readyz counts these keys."""

    def __init__(self, runtime: Runtime, hostname: str) -> None:
        self.runtime = runtime
        self.hostname = hostname
        self.client = redis_client(runtime.settings.redis_url)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self.info = {
            "hostname": hostname,
            "engine": runtime.engine.name,
            "device": runtime.engine.device,
            "model": runtime.settings.served_name,
            "model_id": runtime.settings.model,
            "family": runtime.prompts.family,
            "instruction": runtime.prompts.card.default_instruction,  # /v1/info shows it; None: the model takes none
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": now_iso(),
        }

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        with contextlib.suppress(redis.RedisError):
            self.client.delete(keys.worker_key(self.hostname))

    def _gpu_metrics(self) -> None:
        """GPU memory and utilisation of this worker's GPU (NVML), when it has one."""
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        if not visible or not visible.split(",")[0].isdigit():
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(visible.split(",")[0]))
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            busy = pynvml.nvmlDeviceGetUtilizationRates(handle)
            metrics.GPU_MEMORY_USED.labels(self.hostname, visible).set(memory.used)
            metrics.GPU_UTILIZATION.labels(self.hostname, visible).set(busy.gpu / 100)
        except Exception as exc:  # no NVML library or driver: no GPU gauges
            logger.debug("no GPU metrics: %r", exc)

    def _run(self) -> None:
        period = self.runtime.settings.worker_heartbeat_s
        while not self._stop.is_set():
            problem = self.runtime.engine.health()
            if problem is not None:
                # A worker whose engine died cannot score: stop announcing it and exit, so that the launcher starts
                # a fresh one and the chunks it held (unacked) go to live workers.
                logger.error("engine unhealthy (%s): worker %s exits", problem, self.hostname)
                with contextlib.suppress(redis.RedisError):
                    self.client.delete(keys.worker_key(self.hostname))
                os._exit(EXIT_ENGINE_DEAD)
            stats = self.runtime.engine.stats
            info = {
                **self.info,
                "pairs_scored": stats.pairs,
                "batches": stats.batches,
                "padded_tokens": stats.padded_tokens,
                "real_tokens": stats.real_tokens,
                "engine_s": round(stats.engine_s, 3),
                "at": time.time(),
            }
            self._gpu_metrics()
            try:
                with self.client.pipeline(transaction=False) as pipe:
                    pipe.set(keys.worker_key(self.hostname), json.dumps(info), ex=period * keys.WORKER_TTL_FACTOR)
                    pipe.zadd(keys.MODELS_SEEN, {self.runtime.settings.served_name: time.time()})
                    pipe.zremrangebyscore(keys.MODELS_SEEN, "-inf", time.time() - keys.MODELS_SEEN_KEPT_S)
                    pipe.execute()
            except redis.RedisError as exc:
                logger.warning("heartbeat failed: %r", exc)
            self._stop.wait(period)
