"""`rerankfarm`: run the farm (up, api, worker)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from schemas.settings import DEFAULT_MODEL, get_settings

logger = logging.getLogger("rerankfarm")

TINY_MODEL_DIR = Path.home() / ".cache" / "rerankfarm" / "tiny-qwen3-reranker"


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    settings = get_settings()
    uvicorn.run(
        "api.main:create_app",
        factory=True,
        host=args.host or settings.api_host,
        port=args.port or settings.api_port,
        log_level=args.loglevel.lower(),
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from workers import launcher

    return launcher.run(prefix=args.name, cpu=args.cpu, concurrency=args.concurrency, loglevel=args.loglevel)


def cmd_flower(args: argparse.Namespace) -> int:
    """Flower on the farm's broker, behind basic auth. The credentials travel in Flower's environment variable,
    never on a command line that `ps` shows."""
    settings = get_settings()
    env = dict(os.environ)
    if settings.flower_password is not None:
        env["FLOWER_BASIC_AUTH"] = f"{settings.flower_user}:{settings.flower_password.get_secret_value()}"
    elif settings.auth == "on" and not args.no_auth:
        raise SystemExit(
            "rerankfarm flower: set RERANK_FLOWER_PASSWORD (there is no default password), or pass "
            "--no-auth on a trusted machine"
        )
    else:
        print("rerankfarm flower: WARNING: no basic auth; anyone who reaches the port sees the farm", file=sys.stderr)
    port = args.port or settings.flower_port
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.celery_app",
        "flower",
        f"--port={port}",
        f"--address={args.address}",
        "--purge_offline_workers=60",
    ]
    return subprocess.call(cmd, env=env)


def cmd_submit(args: argparse.Namespace) -> int:
    from rerankfarm import submit

    return submit.run(args.input, args.output, args.url, args.api_key, args.priority, args.timeout)


def cmd_keys(args: argparse.Namespace) -> int:
    import redis

    from schemas import auth

    settings = get_settings()
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    if args.action == "create":
        try:
            key, info = auth.create_key(client, args.tenant)
        except ValueError as exc:
            raise SystemExit(f"rerankfarm keys create: {exc}") from None
        print(f"created {info['id']} for tenant {info['tenant']}. The key is shown once; store it now:\n{key}")
    elif args.action == "list":
        for info in auth.list_keys(client):
            print(f"{info['id']}  tenant={info['tenant']}  prefix={info['prefix']}...  created={info['created_at']}")
    elif not auth.revoke_key(client, args.key_id):
        raise SystemExit(f"rerankfarm keys revoke: no key {args.key_id!r}")
    else:
        print(f"revoked {args.key_id}")
    return 0


def cmd_webhooks(args: argparse.Namespace) -> int:
    from workers import webhooks

    return webhooks.main(["--concurrency", str(args.concurrency), "--loglevel", args.loglevel])


def _model_loadable(model: str) -> str | None:
    """None when the model's config can be read (local directory, cache or Hub), else the reason."""
    if Path(model).is_dir():
        return None if (Path(model) / "config.json").exists() else f"{model} has no config.json"
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(model, "config.json"), str):
            return None
        socket.getaddrinfo(endpoint.hostname or "huggingface.co", endpoint.port or 443)
    except socket.gaierror:
        return f"{endpoint.hostname} cannot be reached and the model is not in the local cache"
    except Exception as exc:
        return f"{exc.__class__.__name__}: {exc}"
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(model)
        return None
    except Exception as exc:  # offline, unknown id, no transformers: all mean "not loadable here"
        return f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _choose_model(args: argparse.Namespace) -> str:
    if args.tiny_model:
        from rerankfarm.tiny_model import build_tiny_model

        return str(build_tiny_model(TINY_MODEL_DIR))
    model = args.model or get_settings().model
    reason = _model_loadable(model)
    if reason is None:
        return model
    explicit = args.model is not None or "RERANK_MODEL" in os.environ
    if explicit or model != DEFAULT_MODEL:
        raise SystemExit(f"rerankfarm up: cannot load model {model!r}: {reason}")
    from rerankfarm.tiny_model import build_tiny_model

    print("=" * 78, file=sys.stderr)
    print(f"  {DEFAULT_MODEL} cannot be loaded here ({reason}).", file=sys.stderr)
    print("  Running the demo on a TINY RANDOM model instead: the farm works end to end,", file=sys.stderr)
    print("  but the scores mean nothing. Set RERANK_MODEL to a downloaded model directory", file=sys.stderr)
    print("  for real rankings.", file=sys.stderr)
    print("=" * 78, file=sys.stderr)
    return str(build_tiny_model(TINY_MODEL_DIR))


def _show_results(job: dict[str, Any], results: dict[str, Any], example: dict[str, Any]) -> None:
    print(
        f"\njob {job['id']} {job['status']}: {job['progress']['completed']}/{job['progress']['total']} pairs, "
        f"scored by {', '.join(job['workers'])}"
    )
    for request, entry in zip(example["requests"], results["data"], strict=True):
        print(f"\n[{entry['custom_id']}] {request['query']}")
        for rank_, r in enumerate(entry["results"], 1):
            text = r["document"]["text"] if r.get("document") else f"document {r['index']}"
            text = text if len(text) <= 70 else text[:67] + "..."
            print(f"  {rank_}. {r['relevance_score']:.4f}  #{r['index']}  {text}")


def run_example(client: httpx.Client) -> int:
    example = json.loads(resources.files("rerankfarm").joinpath("data/example_job.json").read_text("utf-8"))
    r = client.post("/v1/jobs", json=example)
    r.raise_for_status()
    job = r.json()
    print(f"submitted example job {job['id']}: {len(example['requests'])} queries, {job['progress']['total']} pairs")
    while True:
        job = client.get(f"/v1/jobs/{job['id']}").json()
        done, total = job["progress"]["completed"], job["progress"]["total"]
        bar = "#" * int(30 * done / max(total, 1))
        print(f"\r  [{bar:<30}] {done}/{total} pairs  {job['status']:<10}", end="", flush=True)
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.3)
    print()
    if job["status"] != "succeeded":
        print(f"job {job['status']}: {job.get('error')}", file=sys.stderr)
        return 1
    _show_results(job, client.get(f"/v1/jobs/{job['id']}/results").json(), example)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from rerankfarm.local_farm import LocalFarm

    model = _choose_model(args)
    port = args.port or get_settings().api_port
    if "RERANK_REDIS_URL" not in os.environ:
        print("starting an embedded redis-server (set RERANK_REDIS_URL to use your own)")
    print(f"starting the API on http://127.0.0.1:{port} and the workers (model {model})...")
    if "RERANK_AUTH" not in os.environ:
        print("authentication is off for this local farm (set RERANK_AUTH=on and create keys for real use)")
    code = 1
    try:
        with LocalFarm(model, port).start(args.ready_timeout) as farm:
            if farm.redis is not None:
                print(f"embedded redis-server at {farm.redis.url}")
            print(f"ready: {', '.join(farm.wait_ready(10))}")
            with httpx.Client(base_url=farm.url, timeout=30) as client:
                code = run_example(client)
            if args.serve and code == 0:
                print(f"\nserving on {farm.url} (docs at /docs); Ctrl-C stops")
                signal.sigwait({signal.SIGINT, signal.SIGTERM})
    except KeyboardInterrupt:
        code = 130
    return code


def cmd_bench(args: argparse.Namespace) -> int:
    from rerankfarm import bench
    from rerankfarm.embedded_redis import free_port

    if args.model == "tiny":
        from rerankfarm.tiny_model import build_tiny_model

        args.model = str(build_tiny_model(TINY_MODEL_DIR))
    bench.main(
        model=args.model or get_settings().model,
        engine=args.engine,
        pairs=args.pairs,
        jobs=args.jobs,
        json_path=args.json,
        port=args.port or free_port(),
        latency_calls=args.latency_calls,
        latency_docs=args.latency_docs,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rerankfarm", description="Queue-based reranking farm (Qwen3-Reranker).")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser(
        "up",
        help="start everything and run the example bulk job (first run)",
        description="Start an embedded Redis (unless RERANK_REDIS_URL is set), the API and one "
        "worker per GPU (one CPU worker without GPUs), submit the example bulk job, show its "
        "progress and print the ranked results.",
    )
    up.add_argument("--port", type=int, default=None, help="API port (default RERANK_API_PORT, 8000)")
    up.add_argument("--model", default=None, help="model id or directory (default RERANK_MODEL)")
    up.add_argument(
        "--tiny-model", action="store_true", help="use a tiny random model (no download; scores are meaningless)"
    )
    up.add_argument("--serve", action="store_true", help="keep the farm running after the example job")
    up.add_argument("--ready-timeout", type=float, default=900, help="seconds to wait for the model to load")
    up.set_defaults(func=cmd_up)

    api = sub.add_parser("api", help="run the HTTP API (uvicorn)")
    api.add_argument("--host", default=None, help="bind address (default RERANK_API_HOST, 127.0.0.1)")
    api.add_argument("--port", type=int, default=None, help="port (default RERANK_API_PORT, 8000)")
    api.add_argument("--loglevel", default="INFO")
    api.set_defaults(func=cmd_api)

    submit = sub.add_parser(
        "submit",
        help="run a JSONL file of requests as one bulk job and write the results",
        description="Each input line is a request ({custom_id, query, documents, ...}, or OpenAI "
        "Batch style with the request in `body`); each output line is {id, custom_id, response: "
        "{status_code, body: {results}}, error}. Shows progress while the job runs.",
    )
    submit.add_argument("input", help="JSONL file of requests")
    submit.add_argument("-o", "--output", required=True, help="JSONL file for the results")
    submit.add_argument("--url", default=None, help="the farm's API (default RERANK_API_URL, else the local API)")
    submit.add_argument("--api-key", default=None, help="API key (default RERANK_API_KEY)")
    submit.add_argument("--priority", type=int, default=None, help="0 (lowest) to 9 (highest)")
    submit.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds")
    submit.set_defaults(func=cmd_submit)

    flower = sub.add_parser(
        "flower",
        help="Flower (queues, per-GPU workers) behind basic auth",
        description="Starts Flower on RERANK_REDIS_URL with basic auth from RERANK_FLOWER_USER / "
        "RERANK_FLOWER_PASSWORD. Workers send task events, so Flower sees every chunk.",
    )
    flower.add_argument("--port", type=int, default=None, help="default RERANK_FLOWER_PORT (5555)")
    flower.add_argument("--address", default="127.0.0.1")
    flower.add_argument("--no-auth", action="store_true", help="allow running without a password (trusted machines)")
    flower.set_defaults(func=cmd_flower)

    keys_parser = sub.add_parser("keys", help="API keys: create, list, revoke (in RERANK_REDIS_URL)")
    keys_sub = keys_parser.add_subparsers(dest="action", required=True)
    create = keys_sub.add_parser("create", help="create a key for a tenant; it is printed once, only its hash is kept")
    create.add_argument("--tenant", required=True)
    keys_sub.add_parser("list", help="list keys (id, tenant, prefix; never the key)")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    keys_parser.set_defaults(func=cmd_keys)

    hooks = sub.add_parser(
        "webhooks",
        help="run the webhook delivery worker (no GPU, no model)",
        description="Delivers job webhooks from the rerank.webhooks queue: signed (Standard Webhooks), retried on "
        "RERANK_WEBHOOK_RETRY_DELAYS, SSRF-checked at each attempt.",
    )
    hooks.add_argument("--concurrency", type=int, default=8, help="deliveries in flight")
    hooks.add_argument("--loglevel", default="INFO")
    hooks.set_defaults(func=cmd_webhooks)

    worker = sub.add_parser(
        "worker",
        help="run one worker per GPU (one CPU worker without GPUs)",
        description="Detects GPUs (CUDA_VISIBLE_DEVICES, else NVML) and starts one Celery worker "
        "process per GPU, pinned with CUDA_VISIBLE_DEVICES and named gpuN@host.",
    )
    worker.add_argument("--name", default=None, help="prefix for worker names (PREFIX-gpu0@host, PREFIX@host)")
    worker.add_argument("--cpu", action="store_true", help="one CPU worker even if GPUs are present")
    worker.add_argument("--concurrency", type=int, default=None, help="chunks in flight per worker")
    worker.add_argument("--loglevel", default="INFO")
    worker.set_defaults(func=cmd_worker)
    bench = sub.add_parser(
        "bench",
        help="throughput of the raw engine vs the whole farm, and interactive latency",
        description="Runs the reference workload (queries x 100 documents of 128..512 tokens) "
        "straight through the engine, then through the farm (embedded Redis unless "
        "RERANK_REDIS_URL is set), then measures interactive latency idle and under bulk load.",
    )
    bench.add_argument("--engine", default="auto", choices=["auto", "transformers", "vllm"])
    bench.add_argument("--model", default=None, help="model id or directory; `tiny` builds the tiny random model")
    bench.add_argument("--pairs", type=int, default=20_000, help="pairs in the workload (20,000 = the reference)")
    bench.add_argument("--jobs", type=int, default=10, help="bulk jobs the workload is submitted as")
    bench.add_argument("--latency-calls", type=int, default=50, help="interactive calls per latency phase")
    bench.add_argument("--latency-docs", type=int, default=20, help="documents per interactive call")
    bench.add_argument("--json", default=None, help="write the results here")
    bench.add_argument("--port", type=int, default=None)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "loglevel", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
