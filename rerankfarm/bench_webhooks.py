"""`python -m rerankfarm.bench_webhooks`: one tenant's broken receiver against another tenant's webhook, on a real
webhook worker (`rerankfarm webhooks`, an embedded Redis, real HTTP receivers on localhost), with the production
timeout. Prints a table and writes JSON.

Tenant A's `--jobs` (40) jobs end, each with a webhook to a receiver that accepts the connection and never answers
(every attempt runs into RERANK_WEBHOOK_TIMEOUT_S, 15 s). A second later tenant B's job ends, its webhook to a fast
receiver. Measured: how long after B's job ended B's event arrived, and how many of A's attempts were under way at
once. Two runs of the same worker (`--concurrency`, 8 slots): with the farm's caps (8 per tenant, 4 per destination:
the defaults), and with the caps opened to the worker's slots, where A's attempts take every slot as one FIFO of
deliveries did (issue #32: B's event 71 s late). Target: B's event within 5 s of its job's end while A's deliveries
hang. A new due delivery is seen at the worker's next look (RERANK_WEBHOOK_DISPATCH_INTERVAL_S, 1 s) or when a slot
frees.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import redis

from rerankfarm.embedded_redis import EmbeddedRedis
from schemas.webhooks import destination
from store import job_state, moves, webhook_secrets
from store.codec import now_iso
from store.job_state import JobHandle, JobRecord, NewJob


class Receiver:
    """An HTTP receiver on localhost: records when each POST arrived; `hang` keeps every request open."""

    def __init__(self, hang: bool) -> None:
        self.arrivals: list[float] = []
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["content-length"]))
                receiver.arrivals.append(time.time())
                if hang:
                    receiver.release.wait(600)
                try:
                    self.send_response(204)
                    self.end_headers()
                except OSError:
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def at_once(arrivals: list[float], timeout: float) -> int:
    """The most attempts under way together: each hangs until it times out, so attempts that arrived within one
    timeout of each other were open at once."""
    return max((sum(1 for b in arrivals if a <= b < a + 0.95 * timeout) for a in arrivals), default=0)


def ended_job(client: redis.Redis, run: moves.Runner, tenant: str, url: str) -> float:
    """A job of `tenant` that ends now (cancelled), its webhook due: as the farm leaves a job that ended. Returns when
    it ended (unix)."""
    job_id = f"job_{os.urandom(16).hex()}"
    record = JobRecord(id=job_id, tenant=tenant, priority=5, created_at=now_iso(), total=1, chunks_total=1,
                       request_count=1, webhook_url=url, webhook_dest=destination(url),
                       webhook_events='["job.cancelled"]')  # fmt: skip
    with client.pipeline(transaction=True) as pipe:
        job_state.create(pipe, NewJob(record, '{"requests": []}', {}), 3600)
        pipe.execute()
    at = time.time()
    run(JobHandle(job_id, tenant).cancel())
    return at


def scenario(
    url: str, name: str, jobs: int, concurrency: int, timeout: float, caps: dict[str, str], logs: Path
) -> dict[str, Any]:
    client = redis.Redis.from_url(url)
    client.flushdb()
    run = moves.Runner(client)
    for tenant in ("a", "b"):
        run(webhook_secrets.rotate(tenant, 0)[1])
    stuck, fast = Receiver(hang=True), Receiver(hang=False)
    env = dict(
        os.environ,
        RERANK_REDIS_URL=url,
        RERANK_AUTH="on",
        RERANK_WEBHOOK_ALLOWLIST="127.0.0.1",
        RERANK_WEBHOOK_METRICS_PORT="0",
        RERANK_WEBHOOK_CONCURRENCY=str(concurrency),
        RERANK_WEBHOOK_TIMEOUT_S=str(timeout),
        **caps,
    )
    log = (logs / f"webhooks-{name}.log").open("wb")
    worker = subprocess.Popen([sys.executable, "-m", "rerankfarm.cli", "webhooks"], env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while " ready: " not in (logs / f"webhooks-{name}.log").read_text(errors="replace"):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the webhook worker did not start: see {logs}")
            time.sleep(0.1)
        for _ in range(jobs):
            ended_job(client, run, "a", stuck.url("/a"))
        time.sleep(min(1.0, timeout / 3))  # A's attempts are under way, hanging
        b_ended = ended_job(client, run, "b", fast.url("/b"))
        limit = time.monotonic() + 120
        while not fast.arrivals and time.monotonic() < limit:
            time.sleep(0.01)
        late = fast.arrivals[0] - b_ended if fast.arrivals else None
        return {
            "scenario": name,
            "b_event_after_job_end_s": None if late is None else round(late, 3),
            "a_attempts_at_once": at_once(stuck.arrivals, timeout),
            "a_attempts_started": len(stuck.arrivals),
            "target_met": late is not None and late <= 5.0,
        }
    finally:
        worker.terminate()
        stuck.close()
        fast.close()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rerankfarm.bench_webhooks", description=__doc__)
    parser.add_argument("--jobs", type=int, default=40, help="tenant A's jobs, each with a hanging receiver")
    parser.add_argument("--concurrency", type=int, default=8, help="the webhook worker's delivery slots")
    parser.add_argument("--timeout", type=float, default=15.0, help="RERANK_WEBHOOK_TIMEOUT_S (the default: 15)")
    parser.add_argument("--json", default="benchmarks-cpu-webhooks.json")
    args = parser.parse_args(argv)
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / "rerankfarm-bench-webhooks"
    logs.mkdir(parents=True, exist_ok=True)
    fifo_like = {
        "RERANK_WEBHOOK_MAX_IN_FLIGHT_PER_TENANT": str(args.concurrency),
        "RERANK_WEBHOOK_MAX_IN_FLIGHT_PER_DESTINATION": str(args.concurrency),
    }
    rows = []
    with EmbeddedRedis() as server:
        for name, caps in (("farm caps (defaults)", {}), ("caps = all slots (FIFO-like)", fifo_like)):
            rows.append(scenario(server.url, name, args.jobs, args.concurrency, args.timeout, caps, logs))
    print(f"tenant A: {args.jobs} webhooks to a receiver that never answers ({args.timeout:g} s timeout), "
          f"{args.concurrency} delivery slots; tenant B: one webhook, to a fast receiver")  # fmt: skip
    print(f"{'scenario':32} {'B event after job end (s)':>26} {'A at once':>10} {'target <= 5 s':>14}")
    for row in rows:
        late = row["b_event_after_job_end_s"]
        shown = "not within 120" if late is None else f"{late:.2f}"
        print(f"{row['scenario']:32} {shown:>26} {row['a_attempts_at_once']:>10} {row['target_met']!s:>14}")
    result = {"machine": platform.platform(), "python": platform.python_version(), "jobs": args.jobs,
              "concurrency": args.concurrency, "timeout_s": args.timeout, "rows": rows}  # fmt: skip
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
