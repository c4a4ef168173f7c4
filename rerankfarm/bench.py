"""`rerankfarm bench`: the same workload (a) straight through the engine and (b) through the whole farm (jobs over
HTTP, queued in Redis, scored by a worker, results fetched back), in one run on one machine; then the latency of
interactive calls, idle and while bulk work runs. Prints a table and writes JSON.

The workload follows ../shared/gpu/anchor_bench.py: Q queries x 100 documents, documents of 128..512 tokens, one
query (so one shared prompt prefix) per 100 documents. Words are w0..w499, one token each with the tiny model's
word-level tokenizer (a real tokenizer splits them differently: the token counts printed are measured, not assumed).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import random
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from schemas.jobs import JobStatus
from schemas.settings import Settings, get_settings

if TYPE_CHECKING:
    from workers.models import Family

DOCS_PER_QUERY = 100


def workload(pairs: int, seed: int = 0) -> list[dict[str, Any]]:
    """Requests of 100 documents each (the last one shorter), about `pairs` pairs in all."""
    rng = random.Random(seed)
    requests: list[dict[str, Any]] = []
    left = pairs
    while left > 0:
        n = min(DOCS_PER_QUERY, left)
        query = " ".join(f"w{rng.randrange(500)}" for _ in range(10))
        docs = [" ".join(f"w{rng.randrange(500)}" for _ in range(rng.randint(128, 512))) for _ in range(n)]
        requests.append({"custom_id": f"q{len(requests)}", "query": query, "documents": docs})
        left -= n
    return requests


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run_raw(settings: Settings, requests: list[dict[str, Any]]) -> dict[str, Any]:
    """The engine alone, the best a single process does with it, in a child process (so that its memory, a GPU's
    above all, is free again before the farm's worker loads): vLLM gets the whole workload in one `LLM.classify`
    call, which keeps its scheduler full; transformers gets length-sorted batches under the farm's token budget."""
    from workers.engines.factory import choose_engine
    from workers.prompts import Pair, load_prompts

    builder = load_prompts(settings)
    pairs = [Pair(r["query"], d) for r in requests for d in r["documents"]]
    started = time.perf_counter()
    prompts = builder.encode(pairs)
    tokenize_s = time.perf_counter() - started
    kind = choose_engine(settings)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        starts = [builder.document_start(p) for p in prompts]
        job = pool.submit(_raw_scores, settings, kind, builder.family, builder.max_length, prompts, starts)
        seconds, scores, gpu_mem = job.result()
    return {
        "seconds": seconds + tokenize_s,
        "scores": scores,
        "tokens": sum(map(len, prompts)),
        "gpu_memory_gib": gpu_mem,
    }


def _raw_scores(
    settings: Settings, kind: str, family: Family, max_length: int, prompts: list[list[int]], starts: list[int | None]
) -> tuple[float, list[float], float | None]:
    """In the child process: load the engine, warm it up, then time the whole workload (`starts`: where each
    prompt's token type 1 starts, for two-segment cross-encoders)."""
    if kind == "vllm":
        from vllm import LLM
        from vllm.inputs import TokensPrompt
        from vllm.pooling_params import PoolingParams

        from workers.engines.vllm_engine import engine_kwargs, on_cpu_platform, prepare_environment
        from workers.models.cross_encoder import VLLM_TOKEN_TYPES_KEY

        on_cpu = on_cpu_platform()
        prepare_environment(settings, on_cpu)
        llm = LLM(**engine_kwargs(settings, max_length, on_cpu, family))
        requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        params = [
            PoolingParams(task="classify", extra_kwargs=None if start is None else {VLLM_TOKEN_TYPES_KEY: start})
            for start in starts
        ]
        llm.classify(requests[:64], pooling_params=params[:64], use_tqdm=False)
        started = time.perf_counter()
        outputs = llm.classify(requests, pooling_params=params, use_tqdm=False)
        seconds = time.perf_counter() - started
        scores = [float(o.outputs.probs[-1]) for o in outputs]
    else:
        from workers.engines.batcher import plan_batches
        from workers.engines.transformers_engine import TransformersEngine
        from workers.prompts import load_prompts

        engine = TransformersEngine.load(settings, load_prompts(settings))
        engine.score(prompts[:64])
        started = time.perf_counter()
        scores = [0.0] * len(prompts)
        for batch in plan_batches([len(p) for p in prompts], settings.max_batch_tokens):
            for i, s in zip(batch, engine.score([prompts[i] for i in batch]), strict=True):
                scores[i] = s
        seconds = time.perf_counter() - started
    return seconds, scores, _gpu_memory_gib()


def run_farm(url: str, requests: list[dict[str, Any]], jobs: int) -> dict[str, Any]:
    """Submit the workload as `jobs` bulk jobs at once, wait for all, fetch every result."""
    per_job = -(-len(requests) // jobs)
    bodies = [{"requests": requests[i : i + per_job]} for i in range(0, len(requests), per_job)]
    with httpx.Client(base_url=url, timeout=120) as client:
        started = time.perf_counter()
        submitted = []
        for body in bodies:
            r = client.post("/v1/jobs", json=body)
            r.raise_for_status()
            submitted.append((r.json()["id"], time.perf_counter()))
        latencies: dict[str, float] = {}
        tokens = 0
        while len(latencies) < len(submitted):
            for job_id, t0 in submitted:
                if job_id in latencies:
                    continue
                job = client.get(f"/v1/jobs/{job_id}").json()
                if job["status"] == "succeeded":
                    latencies[job_id] = time.perf_counter() - t0
                    tokens += job["tokens"]
                elif job["status"] in ("failed", "cancelled"):
                    raise RuntimeError(f"bench job {job_id} {job['status']}: {job.get('error')}")
            time.sleep(0.25)  # polling faster steals CPU from the worker on small machines
        scores: list[float] = []
        for job_id, _ in submitted:
            for entry in client.get(f"/v1/jobs/{job_id}/results").json()["data"]:
                by_index = {x["index"]: x["relevance_score"] for x in entry["results"]}
                scores.extend(by_index[i] for i in range(len(by_index)))
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "scores": scores, "tokens": tokens, "job_latencies": list(latencies.values())}


def interactive_body(rng: random.Random, docs: int) -> dict[str, Any]:
    """One query and `docs` documents of 32-128 words from a 500-word vocabulary (the tiny model's)."""
    return {
        "query": " ".join(f"w{rng.randrange(500)}" for _ in range(8)),
        "documents": [" ".join(f"w{rng.randrange(500)}" for _ in range(rng.randint(32, 128))) for _ in range(docs)],
    }


INTERACTIVE_PACE_S = 0.5  # under bulk load, an interactive call starts every this many seconds (or when one ends)


def run_latency(url: str, bulk_requests: list[dict[str, Any]], calls: int, docs: int) -> dict[str, Any]:
    """Interactive latency idle (`calls` calls in a row), then under bulk load: the bulk workload submitted as one job
    and an interactive call every INTERACTIVE_PACE_S until the job ends. A call counts as under bulk load only if
    the bulk job was still running when it returned. The bulk job's time, set against the farm run's, says what the
    interactive calls cost the bulk work."""
    rng = random.Random(1)
    with httpx.Client(base_url=url, timeout=120) as client:
        idle = []
        for _ in range(calls):
            t0 = time.perf_counter()
            client.post("/v1/rerank", json=interactive_body(rng, docs)).raise_for_status()
            idle.append(time.perf_counter() - t0)
        submitted = time.perf_counter()
        job = client.post("/v1/jobs", json={"requests": bulk_requests}).json()
        loaded: list[float] = []
        interactive_pairs = 0
        while True:
            t0 = time.perf_counter()
            client.post("/v1/rerank", json=interactive_body(rng, docs)).raise_for_status()
            latency = time.perf_counter() - t0
            status = client.get(f"/v1/jobs/{job['id']}").json()
            if JobStatus(status["status"]).final:
                break
            if status["status"] == "running":
                loaded.append(latency)
                interactive_pairs += docs
            time.sleep(max(0.0, INTERACTIVE_PACE_S - latency))
        bulk_seconds = time.perf_counter() - submitted
    return {
        "idle": idle,
        "under_bulk": loaded,
        "bulk_seconds": bulk_seconds,
        "interactive_pairs": interactive_pairs,
        "bulk_status_after": status["status"],
    }


def _worker_stats(redis_url: str) -> dict[str, float]:
    """The engine counters of every worker (`workers.engines.base.EngineStats`), from their heartbeats."""
    from schemas import keys
    from store.connect import redis_client

    client = redis_client(redis_url)
    totals = {"batches": 0.0, "padded_tokens": 0.0, "real_tokens": 0.0, "engine_s": 0.0}
    for key in client.scan_iter(match=keys.WORKER_KEY_PATTERN):
        info = json.loads(client.get(key) or "{}")
        for name in totals:
            totals[name] += info.get(name, 0)
    client.close()
    return totals


def _cpu_seconds(stat: Path) -> float:
    """utime + stime of a /proc/PID/stat or /proc/PID/task/TID/stat, in seconds."""
    fields = stat.read_text().rsplit(")", 1)[1].split()  # fields after the command name: state is [0]
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def farm_cpu(api_pid: int, redis_pid: int | None, worker_pids: list[int]) -> dict[str, float]:
    """CPU seconds so far of the API, Redis, and the workers: all their threads, and the engine's (the thread that
    runs forward passes and the compute threads it started, named `ENGINE_THREAD`). Linux's /proc; the processes'
    and threads' own counters."""
    from workers.engines.base import ENGINE_THREAD

    totals = {"api": _cpu_seconds(Path(f"/proc/{api_pid}/stat")), "redis": 0.0, "worker": 0.0, "engine": 0.0}
    if redis_pid is not None:
        totals["redis"] = _cpu_seconds(Path(f"/proc/{redis_pid}/stat"))
    for pid in worker_pids:
        totals["worker"] += _cpu_seconds(Path(f"/proc/{pid}/stat"))
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                if (task / "comm").read_text().strip() == ENGINE_THREAD:
                    totals["engine"] += _cpu_seconds(task / "stat")
            except OSError:  # the thread ended meanwhile
                continue
    return totals


def _worker_pids(redis_url: str) -> list[int]:
    from schemas import keys
    from store.connect import redis_client

    client = redis_client(redis_url)
    pids = [int(json.loads(client.get(k) or "{}")["pid"]) for k in client.scan_iter(match=keys.WORKER_KEY_PATTERN)]
    client.close()
    return pids


def _gpu_memory_gib() -> float | None:
    try:
        import torch

        if torch.cuda.is_available():
            return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    except ImportError:
        pass
    return None


def main(
    model: str,
    engine: str,
    pairs: int,
    jobs: int,
    json_path: str | None,
    port: int,
    latency_calls: int,
    latency_docs: int,
) -> dict[str, Any]:
    from rerankfarm.local_farm import LocalFarm
    from workers.engines.factory import choose_engine

    settings = get_settings().model_copy(update={"model": model, "engine": engine})
    engine = choose_engine(settings)  # `auto` resolved, so the table and the JSON name the engine that ran
    requests = workload(pairs)
    n = sum(len(r["documents"]) for r in requests)
    print(f"workload: {len(requests)} queries x <=100 documents = {n} pairs; engine={engine} model={model}")

    raw = run_raw(settings, requests)
    print(f"raw engine: {n / raw['seconds']:.1f} pairs/s")
    with LocalFarm(model, port, extra_env={"RERANK_ENGINE": engine}) as farm:
        workers = farm.wait_ready(60)
        processes = (farm.children[0].pid, farm.redis.process.pid if farm.redis and farm.redis.process else None)
        worker_pids = _worker_pids(farm.redis_url)
        cpu_before = farm_cpu(*processes, worker_pids)
        farm_run = run_farm(farm.url, requests, jobs)
        cpu = {k: v - cpu_before[k] for k, v in farm_cpu(*processes, worker_pids).items()}
        print(f"farm: {n / farm_run['seconds']:.1f} pairs/s")
        time.sleep(1.5 * get_settings().worker_heartbeat_s)  # let the heartbeat carry the engine's final counts
        batching = _worker_stats(farm.redis_url)
        fresh = workload(pairs, seed=7)  # the same size as the farm run, other prompts: no prefix-cache hits
        latency = run_latency(farm.url, fresh, latency_calls, latency_docs)

    diff = max(abs(a - b) for a, b in zip(raw["scores"], farm_run["scores"], strict=True))
    result = {
        "machine": platform.node(),
        "platform": platform.platform(),
        "engine": engine,
        "model": model,
        "workers": workers,
        "pairs": n,
        "jobs": jobs,
        "max_batch_tokens": settings.max_batch_tokens,
        "chunk_size": settings.chunk_size,
        "worker_concurrency": settings.worker_concurrency,
        "vllm_in_process": settings.vllm_in_process if engine == "vllm" else None,
        "vllm_enforce_eager": settings.vllm_enforce_eager if engine == "vllm" else None,
        "raw_seconds": round(raw["seconds"], 2),
        "farm_seconds": round(farm_run["seconds"], 2),
        "raw_pairs_per_s": round(n / raw["seconds"], 1),
        "farm_pairs_per_s": round(n / farm_run["seconds"], 1),
        "ratio": round(raw["seconds"] / farm_run["seconds"], 3),
        "raw_tokens_per_s": round(raw["tokens"] / raw["seconds"]),
        "farm_tokens_per_s": round(farm_run["tokens"] / farm_run["seconds"]),
        "max_abs_score_diff": diff,
        "job_latency_p50_s": round(percentile(farm_run["job_latencies"], 50), 3),
        "job_latency_p99_s": round(percentile(farm_run["job_latencies"], 99), 3),
        "interactive_docs": latency_docs,
        "interactive_calls": latency_calls,
        "interactive_idle_p50_s": round(percentile(latency["idle"], 50), 3),
        "interactive_idle_p99_s": round(percentile(latency["idle"], 99), 3),
        "interactive_under_bulk_p50_s": round(percentile(latency["under_bulk"], 50), 3),
        "interactive_under_bulk_p99_s": round(percentile(latency["under_bulk"], 99), 3),
        "interactive_under_bulk_calls": len(latency["under_bulk"]),
        "bulk_pairs_per_s_under_interactive": round(n / latency["bulk_seconds"], 1),
        # the bulk job's pace with interactive calls beside it / the farm run's pace without them
        "bulk_under_interactive_ratio": round(farm_run["seconds"] / latency["bulk_seconds"], 3),
        "interactive_pairs_during_bulk": latency["interactive_pairs"],
        "gpu_memory_gib": raw["gpu_memory_gib"],
        "farm_batches": batching["batches"],
        "farm_padding_overhead": round(batching["padded_tokens"] / max(batching["real_tokens"], 1) - 1, 3),
        "farm_engine_busy": round(batching["engine_s"] / farm_run["seconds"], 3),
        # CPU seconds during the farm run, from the processes' and threads' own counters (the bench client's own
        # polling and result fetching are not counted).
        "farm_cpu_s": {k: round(v, 2) for k, v in cpu.items()},
        # The farm's CPU time per pair outside the engine's forward passes: the API, Redis, and every worker thread
        # but the engine's. On a GPU host this is what bounds a worker's pace.
        "farm_cpu_outside_engine_ms_per_pair": round(
            (cpu["api"] + cpu["redis"] + cpu["worker"] - cpu["engine"]) / n * 1000, 3
        ),
    }
    rows = [
        ("pairs", f"{n}"),
        ("raw engine pairs/s", f"{result['raw_pairs_per_s']}"),
        ("farm pairs/s", f"{result['farm_pairs_per_s']}"),
        ("farm / raw", f"{result['ratio']}"),
        ("raw tokens/s", f"{result['raw_tokens_per_s']}"),
        ("farm tokens/s", f"{result['farm_tokens_per_s']}"),
        ("max |farm - raw| score", f"{diff:.2e}"),
        ("job latency p50 / p99 (s)", f"{result['job_latency_p50_s']} / {result['job_latency_p99_s']}"),
        (
            f"interactive ({latency_docs} docs) idle p50 / p99 (s)",
            f"{result['interactive_idle_p50_s']} / {result['interactive_idle_p99_s']}",
        ),
        (
            f"interactive ({latency_docs} docs) under bulk p50 / p99 (s), {len(latency['under_bulk'])} calls",
            f"{result['interactive_under_bulk_p50_s']} / {result['interactive_under_bulk_p99_s']}",
        ),
        (
            "bulk pairs/s with interactive calls beside it (/ farm run)",
            f"{result['bulk_pairs_per_s_under_interactive']} ({result['bulk_under_interactive_ratio']}, "
            f"{latency['bulk_status_after']})",
        ),
        ("GPU memory (raw engine, GiB)", f"{raw['gpu_memory_gib']}"),
        ("farm: engine calls / padding overhead", f"{batching['batches']} / {result['farm_padding_overhead']:.1%}"),
        ("farm: engine busy during the farm run", f"{result['farm_engine_busy']:.1%}"),
        (
            "farm: CPU s api / redis / worker (engine threads)",
            f"{cpu['api']:.1f} / {cpu['redis']:.1f} / {cpu['worker']:.1f} ({cpu['engine']:.1f})",
        ),
        ("farm: CPU ms per pair outside the engine", f"{result['farm_cpu_outside_engine_ms_per_pair']}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n| " + "metric".ljust(width) + " | value |\n| " + "-" * width + " | --- |")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))
        print(f"\nwrote {json_path}")
    return result
