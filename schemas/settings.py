"""One settings class for the whole farm. Every field is also an environment variable with the `RERANK_` prefix."""

from __future__ import annotations

import re
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "Qwen/Qwen3-Reranker-0.6B"
# A served model's name: it is part of its queues' names, so no ':' (kombu's priority separator) and no spaces.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


def public_name(model: str) -> str:
    """The name a model is served under by default: the last part of its id or directory, lowercased."""
    return Path(model.rstrip("/")).name.lower() or "model"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RERANK_", env_file=".env", extra="ignore")

    redis_url: str = Field(
        "redis://localhost:6379/0",
        description="Redis used as Celery broker, job store and result store: `redis://...`, or Redis Sentinel as "
        "`sentinel://HOST:PORT;sentinel://HOST:PORT/DB?master_name=NAME` (`store/connect.py`). `rerankfarm up` "
        "starts an embedded redis-server instead when this variable is not set.",
    )
    redis_replica_wait_ms: int = Field(
        2000,
        ge=0,
        description="Where the Redis primary has replicas, the API answers 202 only once one has the job "
        "(Redis `WAIT`, up to this many ms; 503 otherwise), so a failover cannot forget an accepted job. 0: no wait.",
    )
    redis_allow_eviction: bool = Field(
        False,
        description="Run on a Redis that may evict keys (a `maxmemory` with a `maxmemory-policy` other than "
        "`noeviction`). Off: the API, workers and webhook worker refuse to start on such a Redis and `/readyz` "
        "answers 503, since an evicting Redis deletes job records, chunks and results silently. On: they run, "
        "and say so as an error at start.",
    )
    redis_memory_headroom: float = Field(
        0.8,
        gt=0,
        le=1,
        description="API: the fraction of Redis's `maxmemory` that new jobs may fill. A job whose estimated size "
        "(inputs, results, bookkeeping) would push `used_memory` past it answers 503 `store_full` with "
        "`Retry-After`; the rest is left for the results of jobs already accepted. No effect without a maxmemory.",
    )
    store_full_wait_s: float = Field(
        30.0,
        ge=0,
        description="Workers: how long a chunk's take or scores wait for room when Redis refuses them (full, "
        "`noeviction`) before its job fails with `store_full`. A job always ends: the writes that end it are "
        "taken by a full Redis.",
    )
    idempotency_ttl_s: int = Field(
        86_400,
        ge=60,
        description="How long an `Idempotency-Key` is remembered (per tenant): a retry within it answers the "
        "first request's job, batch or file instead of creating another.",
    )
    idempotency_lock_s: int = Field(
        300,
        ge=1,
        description="How long a key's first request may take before a retry with the same key may run again "
        "(the first request's API process died). Meanwhile retries answer 409 `idempotency_in_progress`.",
    )
    model: str = Field(
        DEFAULT_MODEL,
        description="The worker's model: a Hugging Face model id or local directory. One engine, one model per "
        "worker; a farm serves the models of its live workers.",
    )
    model_family: Literal["auto", "qwen3-reranker", "cross-encoder"] = Field(
        "auto",
        description="How the worker's model scores a pair: `qwen3-reranker` (P(yes) after the Qwen3-Reranker "
        "prompt) or `cross-encoder` (a sequence classifier's one logit, through a sigmoid); `auto` reads the "
        "checkpoint's config (a Qwen3 causal LM, or another architecture's sequence classifier).",
    )
    model_name: str | None = Field(
        None,
        pattern=MODEL_NAME_PATTERN,
        description="The public name of the worker's model, the `model` clients ask for; by default the last part "
        "of `RERANK_MODEL`, lowercased (`qwen3-reranker-0.6b`). Letters, digits, `.`, `_`, `-`.",
    )
    default_model: str | None = Field(
        None,
        pattern=MODEL_NAME_PATTERN,
        description="API: the model of requests that name none. By default the public name of the API's "
        "`RERANK_MODEL` (`RERANK_MODEL_NAME` when set). Always accepted, even before any of its workers is up (its "
        "jobs wait in its queues).",
    )
    model_aliases: dict[str, str] = Field(
        default_factory=dict,
        description='API: other names clients may ask for, as JSON `{"alias": "served name"}` (e.g. '
        '`{"rerank-v3.5": "qwen3-reranker-0.6b"}`). Any other unknown name is refused, never mapped by accident.',
    )
    model_grace_s: float = Field(
        300,
        ge=0,
        description="API: how long a model stays accepted after its last worker was seen (workers restarting).",
    )
    engine: Literal["auto", "vllm", "transformers"] = Field(
        "auto",
        description="Scoring engine. `auto` is vLLM whenever it is installed (the `cpu` and `gpu` extras bring "
        "it: the CPU build on CPU hosts, the CUDA build on GPU hosts), transformers otherwise. Both score the same "
        "prompts with the same rule.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Device for the transformers engine; `auto` uses CUDA when available (vLLM: its build)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Model weights dtype, both engines; `auto` is bfloat16 on CUDA and float32 on CPU."
    )
    vllm_in_process: bool = Field(
        True,
        description="Run vLLM's engine core inside the worker process (VLLM_ENABLE_V1_MULTIPROCESSING=0): no child "
        "processes, so a killed worker frees everything it held, and it starts faster. False: vLLM's own engine "
        "process, which overlaps scheduling with GPU work; the launcher ends it when its worker dies.",
    )
    gpu_memory_utilization: float = Field(
        0.90,
        gt=0,
        le=1,
        description="vLLM: fraction of the GPU's memory the engine may take (weights, activations, KV cache). Lower "
        "it to share a GPU; it bounds the largest batch. Not used on the CPU (see RERANK_KV_CACHE_GIB).",
    )
    kv_cache_gib: float | None = Field(
        None,
        gt=0,
        description="vLLM: KV cache size in GiB. Unset: on a GPU the engine sizes it from "
        "RERANK_GPU_MEMORY_UTILIZATION; on the CPU it takes 2 GiB of RAM. Pooling keeps a prompt's KV only while "
        "it is scored (and for prefix caching), so a few GiB hold many batches.",
    )
    vllm_max_num_batched_tokens: int | None = Field(
        None,
        ge=256,
        description="vLLM: tokens its scheduler puts into one forward pass (at least RERANK_MAX_LENGTH). Unset: "
        "16384 on a GPU, 4096 on the CPU. Larger passes use a GPU better and take more activation memory; an "
        "interactive call waits for at most the pass in progress, so smaller passes answer it sooner.",
    )
    vllm_max_num_seqs: int = Field(256, ge=1, description="vLLM: prompts in one forward pass at most.")
    prefix_caching: bool = Field(
        True,
        description="vLLM: reuse the KV of a prompt prefix already computed (the shared system prompt, "
        "instruction and query of a request's documents).",
    )
    vllm_enforce_eager: bool = Field(
        False,
        description="vLLM: skip torch.compile (and CUDA graphs). The engine starts in seconds instead of about a "
        "minute on 2 CPU cores, and scores about 10% slower there; for tests and short-lived workers.",
    )
    max_length: int = Field(
        8192,
        ge=64,
        description="Max tokens of one (instruction, query, document) prompt, as in the model card. Longer prompts "
        "are cut from the end of the document (the query is only cut when it alone exceeds the limit). "
        "The model supports 32K; longer prompts cost quadratic attention time.",
    )
    max_batch_tokens: int = Field(
        16_384,
        ge=256,
        description="transformers: padded tokens (longest prompt x prompts) of one forward pass. Raise until the "
        "GPU is compute-bound; lower if the worker runs out of memory or interactive calls wait too long behind a "
        "bulk pass. vLLM packs its passes itself: RERANK_VLLM_MAX_NUM_BATCHED_TOKENS.",
    )
    batch_window: int = Field(
        8,
        ge=1,
        description="transformers: how many pass budgets of the oldest pending pairs its batcher sorts by length "
        "to form one padded pass. Wider: less padding; narrower: chunks finish closer to arrival order.",
    )
    chunk_size: int = Field(
        256,
        ge=1,
        description="Pairs per queued chunk. Smaller chunks spread one job over more workers and lose less work on a "
        "crash; larger ones cost fewer queue round trips.",
    )
    worker_concurrency: int = Field(
        4,
        ge=1,
        description="Chunks a worker holds in flight at once (Celery threads). Their pairs are gathered into shared "
        "engine calls, so more chunks in flight means fuller batches and more work to redo after a crash.",
    )
    lane_depth: int = Field(
        4,
        ge=1,
        description="Bulk chunks kept waiting in each model's broker lists, fed from the farm's backlog in fair "
        "order (between tenants by weight, between a tenant's jobs, priorities strictly) as workers take them. Deep "
        "enough that a worker never waits for its next chunk; every chunk in it is served before a newly arrived "
        "job of another tenant, so deeper costs fairness.",
    )
    result_ttl_s: int = Field(
        86_400, ge=60, description="Seconds a job, its progress and its results stay in Redis after its last update."
    )
    visibility_timeout_s: int = Field(
        20,
        ge=5,
        description="The lease on a chunk a worker holds: live workers renew it every quarter of this, so a chunk "
        "of a worker that died goes back to the queue within this plus 5 s (the sweep), and a live worker's chunk "
        "is never handed out twice however long it runs. The farm's recovery sends again a chunk nobody vouched "
        "for in twice this (a message the broker lost). Raise it if workers and Redis can be cut off from each "
        "other for longer.",
    )
    chunk_timeout_s: int = Field(
        600,
        ge=5,
        description="Seconds a worker waits for a chunk's scores before it gives up on the engine call and retries "
        "the chunk (a stuck engine).",
    )
    chunk_max_retries: int = Field(
        3,
        ge=0,
        description="A chunk is sent at most this + 1 times (engine failures, and chunks the farm found lost and "
        "sent again) before its job is marked failed.",
    )
    max_requests_per_job: int = Field(10_000, ge=1, description="Max queries (requests) in one bulk job.")
    max_documents_per_request: int = Field(10_000, ge=1, description="Max documents for one query.")
    max_pairs_per_job: int = Field(500_000, ge=1, description="Max (query, document) pairs in one bulk job.")
    max_document_chars: int = Field(
        200_000, ge=1, description="Max characters of one document; longer documents are refused (413-style 422)."
    )
    max_query_chars: int = Field(20_000, ge=1, description="Max characters of one query or instruction.")
    interactive_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Seconds /v1/rerank waits before answering 504 with the job id; the job is then cancelled "
        "(nobody will read its answer), its pairs dropped. A request's `timeout` overrides it.",
    )
    interactive_slots: int = Field(
        4,
        ge=1,
        description="Interactive chunks a worker takes at once, on a consumer of their own beside its bulk slots "
        "(RERANK_WORKER_CONCURRENCY), so an interactive call never waits for a bulk chunk to end.",
    )
    interactive_chunk_size: int = Field(
        32,
        ge=1,
        description="Pairs per chunk of an interactive request: small, so one request spreads over all workers.",
    )
    max_documents_per_rerank: int = Field(1000, ge=1, description="Max documents in one interactive /v1/rerank call.")
    interactive_max_pairs_per_tenant: int = Field(
        4_000,
        ge=1,
        description="Interactive pairs one tenant may have in flight (sent, not yet answered) per model; a call "
        "that would pass it answers 429 with `Retry-After` at once instead of queueing to time out. A call alone is "
        "always let in, whatever its size. Size it to what the model's workers score in a fraction of "
        "`RERANK_INTERACTIVE_TIMEOUT_S`.",
    )
    interactive_max_pairs: int = Field(
        16_000,
        ge=1,
        description="Interactive pairs in flight per model, all tenants together; past it, 429 with `Retry-After`. "
        "Size it to what the model's workers score within `RERANK_INTERACTIVE_TIMEOUT_S` (pairs/s x timeout, from "
        "`rerankfarm bench`).",
    )
    webhook_secret: SecretStr | None = Field(
        None,
        description="The farm-wide Standard Webhooks signing secret (`whsec_` + base64), used only when "
        "RERANK_AUTH=off (one tenant): jobs that name a webhook are then refused while it is unset. With auth on, "
        "each tenant's webhooks are signed with that tenant's own secret (`rerankfarm keys create`, "
        "`POST /v1/webhooks/secret/rotate`) and this one is not used.",
    )
    webhook_retry_delays: str = Field(
        "5,300,1800,7200,18000,36000,50400,72000,86400",
        description="Seconds between delivery attempts after the first (comma-separated; +-10% jitter). The "
        "default follows Standard Webhooks: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h.",
    )
    webhook_timeout_s: float = Field(
        15.0, gt=0, description="Seconds one delivery attempt may take in all: connect, send, and the answer."
    )
    webhook_connect_timeout_s: float = Field(
        3.0, gt=0, description="Seconds to connect to a receiver (within RERANK_WEBHOOK_TIMEOUT_S)."
    )
    webhook_concurrency: int = Field(32, ge=1, description="Deliveries in flight per webhook worker process.")
    webhook_max_in_flight_per_tenant: int = Field(
        8, ge=1, description="Deliveries in flight for one tenant, all webhook workers together."
    )
    webhook_max_in_flight_per_destination: int = Field(
        4, ge=1, description="Deliveries in flight to one destination (host:port), all tenants and workers together."
    )
    webhook_breaker_failures: int = Field(
        5,
        ge=1,
        description="Consecutive failed attempts (any job of one tenant) after which that tenant's destination is "
        "paused: its due attempts are recorded as not sent until the pause ends, then one probe goes.",
    )
    webhook_breaker_pause_s: float = Field(
        30.0, gt=0, description="The first pause of a failing destination; doubled by each failed probe."
    )
    webhook_breaker_max_pause_s: float = Field(3600.0, gt=0, description="The longest pause of a failing destination.")
    webhook_secret_overlap_s: int = Field(
        86400,
        ge=0,
        description="After a tenant's signing secret is rotated, the old one still signs (beside the new) for this "
        "long, unless the rotation names its own window.",
    )
    webhook_allowlist: str = Field(
        "",
        description="Hosts or CIDRs (comma-separated) that webhooks may reach although they are not public "
        "(in-cluster receivers, tests). Everything non-public is refused otherwise.",
    )
    webhook_inline_results_max_pairs: int = Field(
        1000, ge=0, description="Results are inlined in the `job.succeeded` event for jobs up to this many pairs."
    )
    webhook_dispatch_interval_s: float = Field(
        1.0, gt=0, description="How often the webhook worker looks for deliveries that are due."
    )
    webhook_lease_s: int = Field(
        120, ge=5, description="A delivery taken by a webhook worker that died is taken again after this long."
    )
    public_url: str = Field(
        "", description="Base URL of the API as callers reach it, for links in webhooks; RERANK_API_URL if empty."
    )
    auth: Literal["on", "off"] = Field(
        "on",
        description="`on`: every job and rerank call needs `Authorization: Bearer <key>` (keys from `rerankfarm keys "
        "create`), and a tenant sees only its own jobs. `off`: no keys, one shared tenant (local use; logged loudly).",
    )
    docs_public: bool = Field(True, description="Serve /docs and /openapi.json without a key even when auth is on.")
    metrics_public: bool = Field(True, description="Serve /metrics without a key even when auth is on.")
    max_body_bytes: int = Field(
        32 * 2**20, ge=1024, description="Largest request body accepted (413 above), file uploads aside."
    )
    max_file_bytes: int = Field(
        2 * 2**30, ge=1024, description="Largest file accepted by POST /v1/files (413 above); streamed to disk."
    )
    files_dir: Path = Field(
        Path(tempfile.gettempdir()) / "rerankfarm-files",
        description="Where uploaded files (batch input) are kept. Every API replica must see the same directory: "
        "a shared volume in production (docker-compose and the Kubernetes manifests mount one).",
    )
    file_ttl_s: int = Field(
        30 * 86_400, ge=60, description="Seconds an uploaded file is kept (OpenAI's default for batch files: 30 days)."
    )
    max_jobs_in_flight_per_tenant: int = Field(
        100, ge=1, description="Queued or running jobs a tenant may have; more answer 429 with Retry-After."
    )
    max_queue_depth: int = Field(
        50_000,
        ge=1,
        description="Bulk chunks waiting for a model (in its backlog and its broker lists), all tenants together, "
        "above which new jobs answer 429 with Retry-After (nothing is enqueued).",
    )
    rate_limit_per_minute: int = Field(
        600, ge=0, description="Job submissions and rerank calls per tenant per minute (0: no limit); 429 above."
    )
    worker_metrics_port: int = Field(
        9400,
        description="Workers serve /metrics on this port + their position (0 for the first GPU or the CPU); 0 "
        "turns it off.",
    )
    webhook_metrics_port: int = Field(9390, description="The webhook worker serves /metrics here; 0 turns it off.")
    flower_user: str = Field("admin", description="Basic-auth user of `rerankfarm flower`.")
    flower_password: SecretStr | None = Field(
        None,
        description="Basic-auth password of `rerankfarm flower`; required when RERANK_AUTH=on (no default password).",
    )
    flower_port: int = Field(5555, description="Port of `rerankfarm flower`.")
    api_host: str = Field("127.0.0.1", description="Address `rerankfarm api` binds to.")
    api_port: int = Field(8000, description="Port `rerankfarm api` listens on.")
    api_url: str = Field("http://127.0.0.1:8000", description="Where the CLI and the client reach the API.")
    worker_heartbeat_s: int = Field(5, ge=1, description="Seconds between a worker's liveness heartbeats in Redis.")
    log_format: Literal["text", "json"] = Field(
        "text",
        description="How a scoring worker writes its log. `json`: one JSON object per line (time `created` in unix "
        "seconds, `levelname`, `name`, `message`), with the fields of its chunk events (`event`: `chunk.taken` or "
        "`chunk.done`; `job`, `chunk`, and a done chunk's `outcome`: `workers.tasks._event`), for log shippers and "
        "`rerankfarm.chaos`.",
    )

    def retry_delays(self) -> list[float]:
        return [float(x) for x in self.webhook_retry_delays.split(",") if x.strip()]

    @model_validator(mode="after")
    def _served_names_fit_queue_names(self) -> Settings:
        if not re.match(MODEL_NAME_PATTERN, self.served_name):  # only a derived name can fail: fields are checked
            raise ValueError(
                f"RERANK_MODEL={self.model!r} gives the public name {self.served_name!r}, which cannot name queues "
                f"(letters, digits, '.', '_', '-', at most 64); set RERANK_MODEL_NAME"
            )
        return self

    @model_validator(mode="after")
    def _webhook_lease_outlasts_an_attempt(self) -> Settings:
        if self.webhook_lease_s <= self.webhook_timeout_s:  # else a live attempt would be taken again, and sent twice
            raise ValueError(
                f"RERANK_WEBHOOK_LEASE_S ({self.webhook_lease_s}) must be longer than RERANK_WEBHOOK_TIMEOUT_S "
                f"({self.webhook_timeout_s:g})"
            )
        return self

    @property
    def served_name(self) -> str:
        """The public name of this worker's model."""
        return self.model_name or public_name(self.model)

    @property
    def default_served(self) -> str:
        """The API's model for requests that name none."""
        return self.default_model or self.served_name

    def redacted_redis_url(self) -> str:
        return redact_url(self.redis_url)


def redact_url(url: str) -> str:
    """The URL without its password, for logs (each part of a `sentinel://...;sentinel://...` URL)."""
    if ";" in url:
        return ";".join(redact_url(part) for part in url.split(";"))
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@lru_cache
def get_settings() -> Settings:
    return Settings()
