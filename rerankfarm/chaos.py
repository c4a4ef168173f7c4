"""Chaos: many small jobs while scoring workers are SIGKILLed and restarted; every job is counted.

`python -m rerankfarm.chaos --jobs 5000 --kill-every 4` runs it on this machine (an embedded Redis, the API, the
tiny random model unless `--model` names one) and prints a table and JSON: jobs, kills, jobs lost (not succeeded),
jobs counted twice (a pair counted more than once), and the longest recovery (from a kill to the moment the last
chunk the killed worker held was recorded by another). The soak test (`tests/integration/test_soak.py`) runs the
same `run` at test size and also checks every score against an independent reference.

A kill is `SIGKILL` of `rerankfarm worker` (the launcher): its worker dies with it (`PR_SET_PDEATHSIG`), with no
warm shutdown, so chunks in hand, prefetched, or popped by kombu and not yet recorded as unacked are all lost
together, and the farm's ledger and kombu's lease must bring each back.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx


def chunk_events(log: Path) -> list[dict[str, Any]]:
    """A worker's chunk events (`workers.tasks`: `chunk.taken`, `chunk.done` with its outcome), read from its log's
    JSON lines (the chaos run starts workers with RERANK_LOG_FORMAT=json); other lines are left alone."""
    events = []
    text = log.read_text(errors="replace") if log.exists() else ""
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if str(entry.get("event", "")).startswith("chunk."):
                    events.append(entry)
    return events


def _processes() -> list[tuple[int, str, int, int]]:
    """(pid, state, parent pid, process group) of every process, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # ended meanwhile
        found.append((int(stat.parent.name), state, int(ppid), int(group)))
    return found


class FarmWorker:
    """`rerankfarm worker` as a user starts it, logging to a file."""

    def __init__(
        self,
        redis_url: str,
        model: str | Path,
        log_dir: Path,
        name: str | None = None,
        concurrency: int = 2,
        env: dict[str, str] | None = None,
    ) -> None:
        from store.connect import redis_client

        self.name = name or f"t{uuid.uuid4().hex[:6]}"
        self.node = f"{self.name}-cpu"  # the launcher's name for a CPU worker; its hostname is NODE@host
        self.redis = redis_client(redis_url)
        self.log_path = log_dir / f"worker-{self.name}.log"
        self.env = dict(os.environ, RERANK_REDIS_URL=redis_url, RERANK_MODEL=str(model), CUDA_VISIBLE_DEVICES="",
                        RERANK_LOG_FORMAT="json")  # fmt: skip  # `chunk_events` reads its log
        self.env.update(env or {})
        self.args = [sys.executable, "-m", "rerankfarm.cli", "worker", "--name", self.name]
        self.args += ["--concurrency", str(concurrency)]
        self.process: subprocess.Popen[bytes] | None = None
        self.killed_at: float | None = None
        self.group: int | None = None  # the killed worker's process group (it leads it; vLLM's engine is in it)
        self.consuming_since: float | None = None  # monotonic; set once its heartbeat says it consumes

    def start(self, timeout: float = 120) -> FarmWorker:
        """Start it and wait until its heartbeat says it consumes."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.alive_hostnames():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"worker {self.name} did not start:\n{self.log()}")
            time.sleep(0.2)
        self.consuming_since = time.monotonic()
        return self

    def consumed_for(self) -> float:
        """Seconds since it started consuming (0 while it starts)."""
        return 0.0 if self.consuming_since is None else time.monotonic() - self.consuming_since

    def alive_hostnames(self) -> list[str]:
        from schemas import keys

        found = [k.decode().split(":", 2)[2] for k in self.redis.scan_iter(match=keys.WORKER_KEY_PATTERN)]
        return [h for h in found if h.startswith(f"{self.node}@")]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def pid(self) -> int:
        """The Celery worker process: the launcher's one child (read from /proc, not from the heartbeat, whose key
        may expire between two reads)."""
        assert self.process is not None
        [pid] = [pid for pid, state, ppid, _ in _processes() if ppid == self.process.pid and state != "Z"]
        return pid

    def kill(self, settle_s: float = 10.0) -> None:
        """SIGKILL the launcher: its worker dies with it (no warm shutdown), and so does the engine it started.
        Returns once the worker's process group is gone (at most `settle_s`): the worker dies a moment after its
        launcher (`PR_SET_PDEATHSIG`) and may record a chunk in that moment, so its log is final only then."""
        from schemas import keys

        hostnames = self.alive_hostnames()
        if hostnames:
            self.group = self.pid()
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.killed_at = time.time()
        deadline = time.monotonic() + settle_s
        while self.left_running() and time.monotonic() < deadline:
            time.sleep(0.02)
        for hostname in hostnames:
            self.redis.delete(keys.worker_key(hostname))  # its heartbeat would linger until its TTL

    def left_running(self) -> list[int]:
        """Processes of the killed worker's group still alive (its worker, its engine processes)."""
        if self.group is None:
            return []
        return [pid for pid, state, _, group in _processes() if group == self.group and state != "Z"]

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Report:
    jobs: int = 0
    kills: int = 0
    succeeded: int = 0
    lost: int = 0  # accepted and not succeeded (failed, or never finished)
    counted_twice: int = 0  # succeeded with more pair counts than pairs
    wrong_scores: int = 0  # pairs whose score differs from the reference (when one is given)
    chunks_recovered: int = 0  # chunks a killed worker held, recorded by another
    longest_recovery_s: float = 0.0
    left_running: int = 0  # processes of killed workers (workers, engines) still alive at the end
    seconds: float = 0.0
    refused: list[str] = field(default_factory=list)

    def table(self) -> str:
        rows = [(k, v) for k, v in asdict(self).items() if k != "refused"] + [("refused", len(self.refused))]
        return "\n".join(f"{k:<20} {v}" for k, v in rows)


def _small_job(rng: random.Random, documents: tuple[int, int], words: tuple[int, int]) -> dict[str, Any]:
    query = " ".join(f"w{rng.randrange(500)}" for _ in range(rng.randint(1, 4)))
    docs = [
        " ".join(f"w{rng.randrange(500)}" for _ in range(rng.randint(*words))) for _ in range(rng.randint(*documents))
    ]
    return {"requests": [{"query": query, "documents": docs}]}


def recoveries(workers: list[FarmWorker]) -> list[float]:
    """For each chunk a killed worker held (taken, not finished in its log), the seconds from the kill to the moment
    another worker recorded it."""
    recorded: dict[tuple[str, int], float] = {}
    held: list[tuple[tuple[str, int], float]] = []
    for w in workers:
        events = chunk_events(w.log_path)
        done = [e for e in events if e["event"] == "chunk.done"]
        finished = {(e["job"], e["chunk"]) for e in done}
        for e in done:
            if e["outcome"] in ("recorded", "finished"):
                recorded[(e["job"], e["chunk"])] = float(e["created"])
        if w.killed_at is not None:
            for e in events:
                chunk = (e["job"], e["chunk"])
                if e["event"] == "chunk.taken" and chunk not in finished:
                    held.append((chunk, w.killed_at))
    return [recorded[chunk] - killed for chunk, killed in held if chunk in recorded and recorded[chunk] > killed]


def run(
    api_url: str,
    redis_url: str,
    model: str | Path,
    log_dir: Path,
    jobs: int,
    kill_every: float,
    clients: int = 4,
    workers: int = 2,
    worker_env: dict[str, str] | None = None,
    score_of: Callable[[str, str], float] | None = None,
    seed: int = 0,
    timeout: float = 600,
    documents: tuple[int, int] = (1, 4),
    words: tuple[int, int] = (2, 20),
    min_kills: int = 0,
    window: int = 16,
) -> Report:
    """Submit at least `jobs` small jobs from `clients` threads while one of `workers` workers after the other is
    SIGKILLed and replaced, every `kill_every` seconds at most and each once it has consumed for `kill_every`
    seconds; then count every job. A job is one query with `documents` (a range) of
    `words` (a range) each. `score_of(query, document)` checks every score.

    The load is a closed loop: each client keeps at most `window` jobs unfinished and submits the next one when one
    ends, so the backlog never outgrows the workers however slow the machine. The clients go on past `jobs` until
    `min_kills` kills have happened (kills are paced by how fast a replacement starts, which a loaded machine
    slows), for at most half of `timeout`; `Report.jobs` counts every job submitted. The run ends when every job
    has ended or `timeout` seconds after it began."""
    report = Report()
    started = time.monotonic()
    stop_submitting, deadline = started + timeout / 2, started + timeout
    slots = [FarmWorker(redis_url, model, log_dir, env=worker_env).start() for _ in range(workers)]
    every = list(slots)
    finished: list[tuple[str, dict[str, Any]]] = []
    lock = threading.Lock()
    done = threading.Event()
    starters: list[threading.Thread] = []  # replacements being started: joined before the end stops every worker

    def more_jobs() -> bool:
        with lock:
            if report.jobs >= jobs and (report.kills >= min_kills or time.monotonic() > stop_submitting):
                return False
            report.jobs += 1
            return True

    def settle(http: httpx.Client, unfinished: dict[str, dict[str, Any]]) -> None:
        """Poll the unfinished jobs once; count each that has ended."""
        for job_id in list(unfinished):
            job = http.get(f"/v1/jobs/{job_id}").json()
            if job["status"] not in ("succeeded", "failed", "cancelled"):
                continue
            body = unfinished.pop(job_id)
            with lock:
                if job["status"] != "succeeded":
                    report.lost += 1
                    continue
                report.succeeded += 1
                pairs = sum(len(r["documents"]) for r in body["requests"])
                if job["progress"]["completed"] != pairs or sum(job["workers"].values()) != pairs:
                    report.counted_twice += 1
                finished.append((job_id, body))

    def client(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        unfinished: dict[str, dict[str, Any]] = {}
        with httpx.Client(base_url=api_url, timeout=60) as http:
            while more_jobs():
                while len(unfinished) >= window and time.monotonic() < deadline:
                    settle(http, unfinished)
                    time.sleep(0.1)
                body = _small_job(rng, documents, words)
                r = http.post("/v1/jobs", json=body)
                if r.status_code == 202:
                    unfinished[r.json()["id"]] = body
                else:
                    with lock:
                        report.refused.append(f"{r.status_code} {r.text[:200]}")
            while unfinished and time.monotonic() < deadline:
                settle(http, unfinished)
                time.sleep(0.2)
            with lock:
                report.lost += len(unfinished)  # never ended

    def killer() -> None:
        slot = 0
        while not done.wait(kill_every):
            victim = slots[slot]
            # Only a worker that has consumed for `kill_every` too: one killed while it loads its engine would take
            # nothing with it, and replacements killed as soon as they consume would leave the farm no time to work
            # (nor their recovery to look).
            while not done.is_set() and victim.consumed_for() < kill_every:
                time.sleep(0.2)
            if done.is_set() or victim.process is None or victim.process.poll() is not None:
                continue
            victim.kill()
            with lock:
                report.kills += 1
            fresh = FarmWorker(redis_url, model, log_dir, env=worker_env)
            slots[slot] = fresh
            starter = threading.Thread(target=_start_quietly, args=(fresh,), daemon=True)
            with lock:
                every.append(fresh)
                starters.append(starter)
            starter.start()
            slot = (slot + 1) % len(slots)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    chaos = threading.Thread(target=killer, daemon=True)
    for t in threads:
        t.start()
    chaos.start()
    try:
        for t in threads:
            t.join()
    finally:
        done.set()
        chaos.join(kill_every + 130)
        # A replacement may still be starting: stopped before its process exists, it would start after the end and
        # outlive the run. Wait for every start, then stop every worker ever started (the killed ones are gone).
        for starter in starters:
            starter.join(150)
        for w in every:
            w.stop()
    if score_of is not None:  # once the workers are gone: the reference wants the CPU
        with httpx.Client(base_url=api_url, timeout=60) as http:
            report.wrong_scores = sum(_wrong_scores(http, job_id, body, score_of) for job_id, body in finished)
    time.sleep(2)  # a killed worker's reaper ends its group at once; give the kernel a moment
    report.left_running = sum(len(w.left_running()) for w in every)
    times = recoveries(every)
    report.chunks_recovered = len(times)
    report.longest_recovery_s = round(max(times, default=0.0), 1)
    report.seconds = round(time.monotonic() - started, 1)
    return report


def _start_quietly(worker: FarmWorker) -> None:
    try:
        worker.start()
    except RuntimeError as exc:  # killed while starting: the next kill replaces it
        print(f"chaos: {exc}", file=sys.stderr)


def _wrong_scores(http: httpx.Client, job_id: str, body: dict[str, Any], score_of: Callable[[str, str], float]) -> int:
    wrong = 0
    data = http.get(f"/v1/jobs/{job_id}/results").json()["data"]
    for request, entry in zip(body["requests"], data, strict=True):
        for r in entry["results"]:
            if abs(r["relevance_score"] - score_of(request["query"], request["documents"][r["index"]])) > 1e-3:
                wrong += 1
    return wrong


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rerankfarm.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--kill-every", type=float, default=4.0, help="seconds between two SIGKILLs")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--model", default=None, help="default: the tiny random model, built now")
    parser.add_argument("--port", type=int, default=8790)
    parser.add_argument("--json", type=Path, default=Path("bench-results/chaos.json"))
    args = parser.parse_args(argv)
    from rerankfarm.embedded_redis import EmbeddedRedis
    from rerankfarm.tiny_model import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="rerankfarm-chaos-"))
    model = args.model or str(build_tiny_model(work / "tiny-model"))
    env = {"RERANK_VLLM_ENFORCE_EAGER": "true", "RERANK_KV_CACHE_GIB": "0.5", "RERANK_WORKER_HEARTBEAT_S": "1"}
    with EmbeddedRedis(appendonly=True) as server:
        api_env = dict(os.environ, RERANK_REDIS_URL=server.url, RERANK_MODEL=model, RERANK_AUTH="off")
        api_env.update(RERANK_MAX_JOBS_IN_FLIGHT_PER_TENANT="100000", RERANK_RATE_LIMIT_PER_MINUTE="0")
        api_cmd = [sys.executable, "-m", "rerankfarm.cli", "api", "--port", str(args.port), "--loglevel", "WARNING"]
        with (work / "api.log").open("ab") as log:
            api = subprocess.Popen(api_cmd, env=api_env, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{args.port}"
            for _ in range(100):
                try:
                    httpx.get(f"{url}/healthz", timeout=2)
                    break
                except httpx.HTTPError:
                    time.sleep(0.2)
            report = run(url, server.url, model, work, args.jobs, args.kill_every, args.clients, args.workers, env)
        finally:
            api.terminate()
            api.wait(30)
    print(report.table())
    print(f"logs: {work}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(asdict(report), indent=2))
    return 0 if report.lost == report.counted_twice == report.left_running == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
