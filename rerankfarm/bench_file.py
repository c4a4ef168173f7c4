"""`python -m rerankfarm.bench_file --pairs 500000`: a bulk file through `rerankfarm submit` on a local farm, with
the wall time, the cost per pair and the peak memory of each part (client, API, worker, Redis). `--via batch` sends
the same pairs as an OpenAI-style batch instead: upload to /v1/files, one batch (one job), output file downloaded.

The file has 100 short documents per query (about 140 bytes per pair: 500,000 pairs is about 70 MB). The farm is
`rerankfarm up`'s (embedded Redis unless RERANK_REDIS_URL is set, one worker, the tiny model by default). Peak
memory is the kernel's high-water mark of each process (`VmHWM`), so a short spike counts (the client's is read
every 0.1 s while it runs). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from rerankfarm.local_farm import LocalFarm, port_free

DOCS_PER_QUERY = 100


def write_file(path: Path, pairs: int, seed: int = 0, batch: bool = False) -> int:
    """`pairs` (query, document) pairs as JSONL requests of DOCS_PER_QUERY documents (`batch`: as OpenAI batch
    lines); returns the file's bytes."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(400)]
    with path.open("w", encoding="utf-8") as out:
        for q in range(-(-pairs // DOCS_PER_QUERY)):
            n = min(DOCS_PER_QUERY, pairs - q * DOCS_PER_QUERY)
            documents = [" ".join(rng.choices(words, k=rng.randint(12, 24))) for _ in range(n)]
            query = " ".join(rng.choices(words, k=6))
            request = {"query": query, "documents": documents}
            line = (
                {"custom_id": f"q{q}", "url": "/v1/rerank", "body": request}
                if batch
                else {"custom_id": f"q{q}", **request}
            )
            out.write(json.dumps(line) + "\n")
    return path.stat().st_size


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def peak_rss_mib(pid: int) -> float:
    """The largest high-water mark of RSS among the process and its descendants, in MiB."""
    peak, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            continue
        todo.extend(_children(current))
    return round(peak / 1024, 1)


def run_submit(url: str, source: Path, output: Path) -> dict[str, Any]:
    """`rerankfarm submit` in a child process; its peak RSS polled from /proc (its `ru_maxrss` would count the
    memory of this process, which it was forked from, before its exec)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-m", "rerankfarm.cli", "submit", str(source), "-o", str(output), "--url", url],
            stderr=stderr,
        )
        peak = 0.0
        while child.poll() is None:
            peak = max(peak, peak_rss_mib(child.pid))
            time.sleep(0.1)
        if child.returncode != 0:
            stderr.seek(0)
            raise SystemExit(f"rerankfarm submit failed ({child.returncode}):\n{stderr.read()[-3000:]}")
    return {"seconds": time.perf_counter() - started, "client_peak_rss_mib": peak}


def run_batch(url: str, source: Path, output: Path) -> dict[str, Any]:
    """The file as one batch: upload (streamed from disk), create, poll, download the output (streamed to disk)."""
    import httpx

    started = time.perf_counter()
    with httpx.Client(base_url=url, timeout=600) as http, source.open("rb") as f:
        upload = http.post("/v1/files", files={"file": (source.name, f)}, data={"purpose": "batch"})
        upload.raise_for_status()
        uploaded = time.perf_counter()
        batch = http.post(
            "/v1/batches",
            json={"input_file_id": upload.json()["id"], "endpoint": "/v1/rerank", "completion_window": "24h"},
        ).json()
        created = time.perf_counter()
        while batch["status"] not in ("completed", "failed", "cancelled", "expired"):
            time.sleep(0.5)
            batch = http.get(f"/v1/batches/{batch['id']}").json()
        if batch["status"] != "completed":
            raise SystemExit(f"batch {batch['id']} {batch['status']}: {batch.get('errors')}")
        with http.stream("GET", f"/v1/files/{batch['output_file_id']}/content") as r, output.open("wb") as out:
            for block in r.iter_bytes():
                out.write(block)
    return {
        "seconds": time.perf_counter() - started,
        "upload_s": round(uploaded - started, 2),
        "create_s": round(created - uploaded, 2),
        "client_peak_rss_mib": None,  # the client is this process, which also runs the farm's launcher
    }


def check_output(output: Path, pairs: int) -> int:
    """Every request in order, every document ranked once; returns the lines."""
    seen = 0
    with output.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines):
            entry = json.loads(line)
            assert entry["custom_id"] == f"q{number}", (number, entry["custom_id"])
            ranked = entry["response"]["body"]["results"]
            assert sorted(r["index"] for r in ranked) == list(range(len(ranked)))
            seen += len(ranked)
    assert seen == pairs, (seen, pairs)
    return number + 1


def main(model: str, sizes: list[int], json_path: str | None, port: int, via: str = "submit") -> list[dict[str, Any]]:
    if model == "tiny":
        from rerankfarm.cli import TINY_MODEL_DIR
        from rerankfarm.tiny_model import build_tiny_model

        model = str(build_tiny_model(TINY_MODEL_DIR))
    rows = []
    work = Path(tempfile.mkdtemp(prefix="rerankfarm-file-bench-"))
    for pairs in sizes:  # a fresh farm per size: each process's peak is that run's own
        source, output = work / f"in-{pairs}.jsonl", work / f"out-{pairs}.jsonl"
        size = write_file(source, pairs, batch=via == "batch")
        with LocalFarm(model, port) as farm:
            api, worker = farm.children[0].pid, farm.children[1].pid
            run = (run_batch if via == "batch" else run_submit)(farm.url, source, output)
            lines = check_output(output, pairs)
            memory = redis.Redis.from_url(farm.redis_url).info("memory")
            row = {
                "via": via,
                "pairs": pairs,
                "requests": lines,
                "file_mb": round(size / 1e6, 1),
                "seconds": round(run["seconds"], 1),
                "pairs_per_s": round(pairs / run["seconds"], 1),
                "ms_per_1000_pairs": round(1000 * 1000 * run["seconds"] / pairs, 1),
                **{k: v for k, v in run.items() if k != "seconds"},
                "api_peak_rss_mib": peak_rss_mib(api),
                "worker_peak_rss_mib": peak_rss_mib(worker),
                "redis_peak_mib": round(int(memory["used_memory_peak"]) / 2**20, 1),
            }
        rows.append(row)
        print(json.dumps(row), flush=True)
        source.unlink()
        output.unlink()
    columns = list(rows[0])
    print("\n| " + " | ".join(columns) + " |\n|" + " --- |" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    if json_path:
        Path(json_path).write_text(json.dumps({"model": model, "runs": rows}, indent=2) + "\n")
        print(f"wrote {json_path}")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m rerankfarm.bench_file", description=__doc__)
    parser.add_argument("--model", default="tiny", help="model id or directory; `tiny` builds the tiny random model")
    parser.add_argument("--pairs", type=int, nargs="+", default=[50_000, 500_000], help="file sizes, in pairs")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--port", type=int, default=8017)
    parser.add_argument("--via", choices=["submit", "batch"], default="submit", help="rerankfarm submit, or a batch")
    args = parser.parse_args()
    if not port_free(args.port):
        raise SystemExit(f"port {args.port} is in use: pass --port")
    main(args.model, args.pairs, args.json, args.port, args.via)
