"""`rerankfarm submit input.jsonl -o results.jsonl`: a bulk file through the farm, in the spirit of the OpenAI Batch
API. Each input line is one request, either bare (`{"custom_id", "query", "documents", ...}`) or Batch-shaped
(`{"custom_id", "method": "POST", "url": "/v1/rerank", "body": {"query", "documents", ...}}`). Each output line is
`{"id", "custom_id", "response": {"status_code": 200, "body": {"results": [...]}}, "error": null}`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from rerankfarm.client import RerankFarm, RerankFarmError

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


def read_requests(path: Path) -> list[dict[str, Any]]:
    requests = []
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
            request = {k: v for k, v in body.items() if k in REQUEST_FIELDS}
            request["custom_id"] = item.get("custom_id", body.get("custom_id", f"line-{number}"))
            requests.append(request)
    if not requests:
        raise SystemExit(f"{path}: no requests")
    return requests


def _bar(job: dict[str, Any], started: float) -> None:
    done, total = job["progress"]["completed"], job["progress"]["total"]
    filled = int(30 * done / max(total, 1))
    elapsed = time.monotonic() - started
    rate = done / elapsed if elapsed > 0 else 0.0
    print(
        f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} pairs  {rate:6.1f} pairs/s  {elapsed:5.0f}s  "
        f"{job['status']:<10}",
        end="",
        file=sys.stderr,
        flush=True,
    )


def run(
    input_path: str, output: str, url: str | None, api_key: str | None, priority: int | None, timeout: float | None
) -> int:
    requests = read_requests(Path(input_path))
    started = time.monotonic()
    with RerankFarm(url, api_key) as farm:
        try:
            job = farm.submit(requests, priority=priority)
        except RerankFarmError as exc:
            raise SystemExit(f"rerankfarm submit: the farm refused the job: {exc}") from None
        print(f"job {job['id']}: {len(requests)} requests, {job['progress']['total']} pairs", file=sys.stderr)
        try:
            job = farm.wait(job["id"], timeout=timeout, on_progress=lambda j: _bar(j, started))
        except TimeoutError:
            print(f"\nrerankfarm submit: not finished after {timeout}s; the job goes on: {job['id']}", file=sys.stderr)
            return 3
        print(file=sys.stderr)
        if job["status"] != "succeeded":
            print(f"job {job['id']} {job['status']}: {job.get('error')}", file=sys.stderr)
            return 1
        written = 0
        with Path(output).open("w", encoding="utf-8") as out:
            for entry in farm.iter_results(job["id"]):
                line = {
                    "id": f"{job['id']}:{entry['custom_id']}",
                    "custom_id": entry["custom_id"],
                    "response": {"status_code": 200, "body": {"results": entry["results"]}},
                    "error": None,
                }
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
                written += 1
    elapsed = time.monotonic() - started
    pairs = job["progress"]["total"]
    print(
        f"done: {written} requests, {pairs} pairs, {job['tokens']} tokens in {elapsed:.1f}s "
        f"({pairs / max(elapsed, 1e-9):.1f} pairs/s) -> {output}",
        file=sys.stderr,
    )
    return 0
