"""A whole farm on this machine: Redis (embedded unless RERANK_REDIS_URL is set), the API and the workers, as
subprocesses. Used by `rerankfarm up` and `rerankfarm bench`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import httpx

from rerankfarm.embedded_redis import EmbeddedRedis


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


class LocalFarm:
    def __init__(
        self,
        model: str,
        port: int,
        worker_args: list[str] | None = None,
        loglevel: str = "WARNING",
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.model = model
        self.port = port
        self.worker_args = worker_args or []
        self.loglevel = loglevel
        self.env = dict(os.environ, RERANK_MODEL=model, **(extra_env or {}))
        # A farm on this machine, for a first run or a benchmark: no API keys unless RERANK_AUTH says otherwise.
        self.env.setdefault("RERANK_AUTH", "off")
        self.redis: EmbeddedRedis | None = None
        self.children: list[subprocess.Popen[bytes]] = []
        self.log_dir = Path(tempfile.mkdtemp(prefix="rerankfarm-logs-"))
        self.logs: list[Path] = []
        self.url = f"http://127.0.0.1:{port}"

    @property
    def redis_url(self) -> str:
        return self.env["RERANK_REDIS_URL"]

    def start(self, ready_timeout: float = 900) -> LocalFarm:
        if "RERANK_REDIS_URL" not in os.environ:
            self.redis = EmbeddedRedis(appendonly=True).start()
            self.env["RERANK_REDIS_URL"] = self.redis.url
        if not port_free(self.port):
            raise SystemExit(f"port {self.port} is in use; pass --port or set RERANK_API_PORT")
        exe = [sys.executable, "-m", "rerankfarm.cli"]
        commands = {
            "api": [*exe, "api", "--host", "127.0.0.1", "--port", str(self.port), "--loglevel", self.loglevel],
            # The worker's and the webhook worker's logs say what each chunk and delivery did: INFO, in their own files.
            "worker": [*exe, "worker", "--loglevel", "INFO", *self.worker_args],
            "webhooks": [*exe, "webhooks", "--loglevel", "INFO"],
        }
        for name, command in commands.items():
            log = self.log_dir / f"{name}.log"
            with log.open("ab") as out:  # the child keeps its own handle on the file
                self.children.append(subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT))
            self.logs.append(log)
        try:
            self.wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        reason = ""
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while time.monotonic() < deadline:
                for child, log in zip(self.children, self.logs, strict=True):
                    if child.poll() is not None:
                        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
                        raise SystemExit(f"{log.stem} exited early (code {child.returncode}); end of {log}:\n{tail}")
                try:
                    r = client.get("/readyz")
                    if r.status_code == 200:
                        workers: list[str] = r.json()["workers"]
                        return workers
                    reason = r.json().get("error", {}).get("message", "")
                except httpx.HTTPError as exc:
                    reason = exc.__class__.__name__
                time.sleep(0.3)
        raise SystemExit(f"the farm was not ready after {timeout:.0f}s ({reason})")

    def stop(self) -> None:
        for child in reversed(self.children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in reversed(self.children):
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self.children = []
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> LocalFarm:
        return self if self.children else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
