"""`python -m rerankfarm.bench_memory`: Redis bytes a job holds per pair, measured, for planning `maxmemory`.

Jobs of the tiny model are submitted to an embedded Redis while no worker runs, and every key they wrote is weighed
(`MEMORY USAGE ... SAMPLES 0`): that is what a job holds while it waits (inputs, ledger). A worker then scores them,
and their keys are weighed again: what a finished job holds until it expires (record, scores, and the inputs when
its results echo documents). Each figure is set against the API's estimate (`store.redis_memory.job_bytes`), which
must not be lower. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from schemas import keys

KINDS = [(300, False), (300, True), (1500, False), (1500, True)]  # document characters, return_documents


def job_keys(client: redis.Redis, job_id: str) -> list[bytes]:
    return list(client.scan_iter(match=f"{keys.job_key(job_id)}*", count=1000))


def weigh(client: redis.Redis, job_id: str) -> int:
    """Bytes of every key of the job, and its entries in the open-chunks index (estimated per member)."""
    total = sum(int(client.memory_usage(k, samples=0) or 0) for k in job_keys(client, job_id))
    open_members = client.zcount(keys.CHUNKS_OPEN, "-inf", "+inf")
    if open_members:
        per_member = int(client.memory_usage(keys.CHUNKS_OPEN, samples=0) or 0) / open_members
        mine = sum(1 for m, _ in client.zscan_iter(keys.CHUNKS_OPEN, match=f"{job_id}:*"))
        total += round(per_member * mine)
    return total


def body(doc_chars: int, echo: bool, queries: int, docs: int) -> dict[str, Any]:
    text = ("lorem ipsum dolor sit amet " * (doc_chars // 27 + 1))[:doc_chars]
    return {
        "requests": [
            {
                "query": f"query {q} about something",
                "documents": [f"{d} {text}" for d in range(docs)],
                "return_documents": echo,
            }
            for q in range(queries)
        ]
    }


def run(queries: int = 20, docs: int = 100) -> list[dict[str, Any]]:
    from fastapi.testclient import TestClient

    from api.main import create_app
    from rerankfarm.chaos import FarmWorker
    from rerankfarm.embedded_redis import EmbeddedRedis
    from rerankfarm.tiny_model import build_tiny_model
    from schemas.chunks import chunk_count
    from schemas.settings import Settings

    work = Path(tempfile.mkdtemp(prefix="rerankfarm-bench-memory-"))
    model = build_tiny_model(work / "tiny-qwen3-reranker")
    rows: list[dict[str, Any]] = []
    with EmbeddedRedis() as server, redis.Redis.from_url(server.url) as client:
        settings = Settings(redis_url=server.url, model=str(model), auth="off", rate_limit_per_minute=0)
        with TestClient(create_app(settings)) as api:
            submitted = []
            for doc_chars, echo in KINDS:
                answer = api.post("/v1/jobs", json=body(doc_chars, echo, queries, docs))
                answer.raise_for_status()
                job_id = answer.json()["id"]
                submitted.append((doc_chars, echo, job_id, weigh(client, job_id)))
            worker = FarmWorker(server.url, model, work, env={"RERANK_ENGINE": "transformers"}).start()
            try:
                for doc_chars, echo, job_id, waiting in submitted:
                    while api.get(f"/v1/jobs/{job_id}").json()["status"] != "succeeded":
                        time.sleep(0.2)
                    finished = weigh(client, job_id)
                    pairs = queries * docs
                    text_bytes = pairs * (doc_chars + len(str(docs)) + 1)
                    estimate = estimated(body(doc_chars, echo, queries, docs), pairs, settings.chunk_size)
                    rows.append(
                        {
                            "doc_chars": doc_chars,
                            "return_documents": echo,
                            "pairs": pairs,
                            "chunks": chunk_count(pairs, settings.chunk_size),
                            "document_bytes_per_pair": round(text_bytes / pairs),
                            "waiting_bytes_per_pair": round(waiting / pairs),
                            "finished_bytes_per_pair": round(finished / pairs),
                            "estimate_bytes_per_pair": round(estimate / pairs),
                        }
                    )
            finally:
                worker.stop()
    return rows


def estimated(request: dict[str, Any], pairs: int, chunk_size: int) -> int:
    """The API's estimate for this body, from the same serialization it stores (`store.job_state.NewJob`)."""
    from schemas.chunks import chunk_count, split_into_chunks
    from schemas.jobs import JobCreate
    from store.job_state import JobInput, JobRecord, NewJob
    from store.redis_memory import job_bytes

    create = JobCreate.model_validate(request)
    chunks = list(split_into_chunks("job_" + "0" * 32, create.requests, chunk_size, 5))
    record = JobRecord(id="job_" + "0" * 32, priority=5, created_at="", total=pairs, chunks_total=len(chunks),
                       request_count=len(create.requests))  # fmt: skip
    new = NewJob.of(record, JobInput.of(create.requests), chunks)
    return job_bytes(new.input_bytes, pairs, chunk_count(pairs, chunk_size))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rerankfarm.bench_memory", description=__doc__)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--docs", type=int, default=100, help="documents per query")
    parser.add_argument("--json", type=Path, default=Path("benchmarks-cpu-memory.json"))
    args = parser.parse_args(argv)
    rows = run(args.queries, args.docs)
    print("| document chars | return_documents | bytes/pair waiting | bytes/pair finished | API estimate |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['doc_chars']} | {str(r['return_documents']).lower()} | {r['waiting_bytes_per_pair']} | "
            f"{r['finished_bytes_per_pair']} | {r['estimate_bytes_per_pair']} |"
        )
    command = " ".join(["python -m rerankfarm.bench_memory", *(argv if argv is not None else sys.argv[1:])])
    args.json.write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
