"""`rerankfarm submit input.jsonl -o results.jsonl`: a bulk file of any size through the farm, in the spirit of the
OpenAI Batch API. Each input line is one request, either bare (`{"custom_id", "query", "documents", ...}`) or
Batch-shaped (`{"custom_id", "method": "POST", "url": "/v1/rerank", "body": {"query", "documents", ...}}`). Each
output line is `{"id", "custom_id", "response": {"status_code": 200, "body": {"results": [...]}}, "error": null}`,
in input order.

The file is read as a stream and cut into parts of at most PART_PAIRS pairs (and the farm's per-job limits), each
submitted as a job as soon as it is read, with at most PARTS_IN_FLIGHT parts unfinished; the parts' results are
streamed into the output file in order as they finish. One run, one progress bar, one output file: memory stays
flat however large the file (the client holds one part's requests, Redis PARTS_IN_FLIGHT parts), and a part the
farm refuses for load (429, or 503 `store_full`) is sent again once the farm has room. Each part carries its own
Idempotency-Key, so a part sent again after a timeout or a 5xx is queued once.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from rerankfarm.client import RerankFarm, RerankFarmError
from schemas.jobs import JobStatus

PART_PAIRS = 20_000  # pairs per job: small enough to hold one part's requests, large enough to keep workers busy
PART_REQUESTS = 5_000  # requests per job (the farm's default limit is 10,000)
PART_BYTES = 8 * 2**20  # characters of one part's requests (the farm's default body limit is 32 MiB)
PARTS_IN_FLIGHT = 8  # parts sent and not finished at most: Redis holds these, not the whole file
BUSY_RETRY_S = 2.0  # wait before sending again a part refused with 429
POLL_S = 0.5
REQUEST_FIELDS = {
    "custom_id",
    "query",
    "documents",
    "instruction",
    "top_n",
    "return_documents",
    "long_documents",
    "window_tokens",
    "window_overlap",
    "max_tokens_per_doc",
    "truncate",
}


def read_requests(path: Path) -> Iterator[dict[str, Any]]:
    """The file's requests one by one, as the farm takes them (a line's `custom_id` kept, or `line-N`)."""
    found = False
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SystemExit(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(item, dict):
                raise SystemExit(f"{path}:{number}: each line must be a JSON object")
            body = item.get("body", item)
            if not isinstance(body, dict) or not isinstance(body.get("documents"), list):
                raise SystemExit(f"{path}:{number}: a request needs `query` and a list of `documents`")
            request = {k: v for k, v in body.items() if k in REQUEST_FIELDS}
            request["custom_id"] = item.get("custom_id", body.get("custom_id", f"line-{number}"))
            found = True
            yield request
    if not found:
        raise SystemExit(f"{path}: no requests")


def read_parts(path: Path, part_pairs: int = PART_PAIRS) -> Iterator[list[dict[str, Any]]]:
    """The file's requests in parts of at most PART_PAIRS pairs, PART_REQUESTS requests and PART_BYTES characters
    (a request larger than a part alone is a part of its own)."""
    part: list[dict[str, Any]] = []
    pairs = size = 0
    for request in read_requests(path):
        n, chars = len(request["documents"]), len(json.dumps(request, ensure_ascii=False))
        if part and (pairs + n > part_pairs or len(part) >= PART_REQUESTS or size + chars > PART_BYTES):
            yield part
            part, pairs, size = [], 0, 0
        part.append(request)
        pairs, size = pairs + n, size + chars
    if part:
        yield part


class Run:
    """One `submit` run: parts sent as they are read, progress over all of them, results written in order."""

    def __init__(self, farm: RerankFarm, path: Path, out: TextIO, priority: int | None, part_pairs: int) -> None:
        self.farm, self.out, self.priority = farm, out, priority
        self.parts_to_send = read_parts(path, part_pairs)
        self.waiting: list[dict[str, Any]] | None = None  # read, not yet accepted by the farm
        self.waiting_key = ""  # its Idempotency-Key: a part sent again after a timeout is not queued twice
        self.sent: list[dict[str, Any]] = []  # the parts' jobs, as last polled
        self.written_parts = 0
        self.written = 0
        self.started = time.monotonic()

    def send(self) -> str:
        """Send the next part: "sent", "busy" (the farm answered 429: the part waits here for its room) or "done"
        (every part has been accepted)."""
        if self.waiting is None:
            self.waiting = next(self.parts_to_send, None)
            if self.waiting is None:
                return "done"
            self.waiting_key = str(uuid.uuid4())  # one per part, however often it is sent
        try:
            job = self.farm.submit(self.waiting, priority=self.priority, idempotency_key=self.waiting_key)
        except RerankFarmError as exc:
            if exc.status == 429 or exc.code == "store_full":
                return "busy"
            raise SystemExit(f"\nrerankfarm submit: the farm refused part {len(self.sent) + 1}: {exc}") from None
        self.sent.append(job)
        self.waiting = None
        return "sent"

    def in_flight(self) -> int:
        return sum(not JobStatus(job["status"]).final for job in self.sent)

    def refresh(self) -> None:
        for n in range(self.written_parts, len(self.sent)):
            if not JobStatus(self.sent[n]["status"]).final:
                self.sent[n] = self.farm.job(self.sent[n]["id"])

    def write_finished(self) -> None:
        """Write the results of the finished parts that are next in input order."""
        while self.written_parts < len(self.sent):
            job = self.sent[self.written_parts]
            if job["status"] in ("failed", "cancelled"):
                raise SystemExit(f"\nrerankfarm submit: job {job['id']} {job['status']}: {job.get('error')}")
            if job["status"] != "succeeded":
                return
            for entry in self.farm.iter_results(job["id"]):
                line = {
                    "id": f"{job['id']}:{entry.get('custom_id')}",
                    "custom_id": entry.get("custom_id"),
                    "response": {"status_code": 200, "body": {"results": entry["results"]}},
                    "error": None,
                }
                self.out.write(json.dumps(line, ensure_ascii=False) + "\n")
                self.written += 1
            self.written_parts += 1

    def bar(self, reading: bool) -> None:
        done = sum(job["progress"]["completed"] for job in self.sent)
        total = self.pairs
        elapsed = time.monotonic() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        filled = int(30 * done / max(total, 1))
        more = "+" if reading else " "
        print(
            f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total}{more} pairs  {rate:7.1f} pairs/s  "
            f"{elapsed:5.0f}s  {len(self.sent)} jobs",
            end="",
            file=sys.stderr,
            flush=True,
        )

    @property
    def pairs(self) -> int:
        return sum(job["progress"]["total"] for job in self.sent)

    @property
    def tokens(self) -> int:
        return sum(job.get("tokens") or 0 for job in self.sent)


def run(
    input_path: str,
    output: str,
    url: str | None,
    api_key: str | None,
    priority: int | None,
    timeout: float | None,
    part_pairs: int | None = None,
) -> int:
    deadline = None if timeout is None else time.monotonic() + timeout
    with RerankFarm(url, api_key) as farm, Path(output).open("w", encoding="utf-8") as out:
        task = Run(farm, Path(input_path), out, priority, part_pairs or PART_PAIRS)
        reading, next_send = True, 0.0
        while reading or task.written_parts < len(task.sent):
            if reading and time.monotonic() >= next_send and task.in_flight() < PARTS_IN_FLIGHT:
                sent = task.send()
                reading = sent != "done"
                if sent == "sent":
                    continue  # read and send the next part at once while the farm takes them
                if sent == "busy":
                    next_send = time.monotonic() + BUSY_RETRY_S
            task.refresh()
            task.write_finished()
            task.bar(reading)
            if deadline is not None and time.monotonic() > deadline:
                ids = " ".join(job["id"] for job in task.sent[task.written_parts :])
                print(f"\nrerankfarm submit: not finished after {timeout}s; the jobs go on: {ids}", file=sys.stderr)
                return 3
            if reading or task.written_parts < len(task.sent):
                time.sleep(POLL_S)
    elapsed = time.monotonic() - task.started
    print(
        f"\ndone: {task.written} requests, {task.pairs} pairs, {task.tokens} tokens in {len(task.sent)} jobs, "
        f"{elapsed:.1f}s ({task.pairs / max(elapsed, 1e-9):.1f} pairs/s) -> {output}",
        file=sys.stderr,
    )
    return 0
