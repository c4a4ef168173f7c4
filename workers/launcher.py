"""`rerankfarm worker`: one worker process per GPU, each pinned with CUDA_VISIBLE_DEVICES; one CPU worker when there
is no GPU. Crashed workers are restarted with a backoff; a worker that cannot load its model stops everything."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

EXIT_CONFIG = 2  # a worker that exits with this cannot start (model not loadable): restarting would not help


def detect_gpus() -> list[str]:
    """GPU ids to pin: CUDA_VISIBLE_DEVICES when set (empty or -1 means none), else every device NVML sees."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        return [] if not ids or ids[0] == "-1" else ids
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML library, no driver: no GPU
        return []


def worker_name(prefix: str | None, gpu: str | None) -> str:
    base = "cpu" if gpu is None else "gpu" + re.sub(r"[^A-Za-z0-9-]", "", gpu)
    return f"{prefix}-{base}" if prefix else base


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send `sig` to this process when the thread that started it ends (Linux; a no-op
    elsewhere). Used by the launcher's children, so that a launcher killed with SIGKILL takes its workers along."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def guard_group() -> None:
    """Fork a reaper that ends this process's whole process group when this process dies, however it dies: the
    engine processes vLLM starts (each a grandchild of the launcher, in the worker's group) would otherwise be
    reparented to init and live on, holding the model's memory. Call it early, before any thread starts."""
    if not sys.platform.startswith("linux") or os.getpgrp() != os.getpid():
        return  # only a group leader (as the launcher starts workers) owns its group
    parent = os.getpid()
    if os.fork() != 0:
        return
    try:  # the reaper: no Python state of the worker is touched from here on
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGTERM, signal.SIGINT})
        die_with_parent(signal.SIGUSR1)
        if os.getppid() == parent:  # else the worker died before the signal was asked for
            signal.sigwait({signal.SIGUSR1})
        os.killpg(os.getpgrp(), signal.SIGKILL)
    finally:
        os._exit(0)


def end_group(pid: int) -> None:
    """SIGKILL what is left of a worker's process group once the worker has exited, so that no engine process it
    started lives on holding memory (a GPU's above all) that the restarted worker needs."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


@dataclass
class _Child:
    name: str
    env: dict[str, str]
    args: list[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started: float = field(default=0.0)

    def spawn(self) -> None:
        # Its own process group: whatever the worker starts (vLLM's engine processes when RERANK_VLLM_IN_PROCESS
        # is false) can be ended with it, even after the worker itself was killed (`end_group`, or the worker's
        # own reaper, `guard_group`). It dies with the launcher: a SIGKILLed launcher leaves nothing running.
        self.process = subprocess.Popen(self.args, env=self.env, start_new_session=True, preexec_fn=die_with_parent)
        self.started = time.monotonic()
        logger.info(
            "started worker %s (pid %d, CUDA_VISIBLE_DEVICES=%s)",
            self.name,
            self.process.pid,
            self.env.get("CUDA_VISIBLE_DEVICES", ""),
        )


def run(prefix: str | None = None, cpu: bool = False, concurrency: int | None = None, loglevel: str = "INFO") -> int:
    gpus = [] if cpu else detect_gpus()
    children = []
    targets: list[str | None] = list(gpus) or [None]
    from schemas.settings import get_settings

    metrics_port = get_settings().worker_metrics_port
    for position, gpu in enumerate(targets):
        name = worker_name(prefix, gpu)
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="" if gpu is None else gpu)
        args = [sys.executable, "-m", "workers.main", "--name", name, "--loglevel", loglevel]
        if concurrency:
            args += ["--concurrency", str(concurrency)]
        if metrics_port:
            args += ["--metrics-port", str(metrics_port + position)]
        children.append(_Child(name, env, args))
    logger.info("%d worker(s): %s", len(children), ", ".join(c.name for c in children))

    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for c in children:
            if c.process and c.process.poll() is None:
                c.process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for c in children:
        c.spawn()
    code = 0
    while not stopping:
        time.sleep(0.5)
        for c in children:
            rc = c.process.poll() if c.process else None
            if rc is None or stopping:
                continue
            end_group(c.process.pid)  # type: ignore[union-attr]  # rc is not None: the process exists
            if rc == EXIT_CONFIG:
                logger.error("worker %s cannot start; stopping all workers", c.name)
                code = EXIT_CONFIG
                stop(signal.SIGTERM, None)
                break
            delay = min(2**c.restarts, 60) if time.monotonic() - c.started < 60 else 1
            logger.warning("worker %s exited with %s; restarting in %ds", c.name, rc, delay)
            time.sleep(delay)
            c.restarts += 1
            c.spawn()
    deadline = time.monotonic() + 60
    for c in children:
        if c.process is None:
            continue
        try:
            c.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            c.process.kill()
            c.process.wait()
        end_group(c.process.pid)
    return code
