"""Every Prometheus metric of the farm, in one place (prometheus-client). Each process exports its own: the API at
/metrics, each worker on RERANK_WORKER_METRICS_PORT + its GPU's position (cpu: + 0), the webhook worker on
RERANK_WEBHOOK_METRICS_PORT (each process starts its own server). Prometheus adds them up."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

JOBS_SUBMITTED = Counter("rerank_jobs_submitted_total", "Jobs accepted by the API.", ["kind", "model"])
JOBS_FINISHED = Counter("rerank_jobs_finished_total", "Jobs that reached a final state.", ["status", "model"])
JOBS_FAILED = Counter(
    "rerank_jobs_failed_total",
    "Jobs that failed, by cause (the job's error code: invalid_input, engine_error, chunk_lost, internal_error, "
    "enqueue_failed, store_full).",
    ["cause"],
)
REQUESTS_REFUSED = Counter(
    "rerank_requests_refused_total",
    "Requests refused by a limit, by reason (rate_limit, jobs_in_flight, queue_depth, not_replicated, store_full, "
    "interactive_tenant, interactive_model).",
    ["reason"],
)
REQUEST_FAILURES = Counter(
    "rerank_request_failures_total",
    "API requests answered with an error, by cause (the error code of the answer: invalid_request, overloaded, "
    "timeout, client_closed_request, unavailable, ...).",
    ["cause"],
)
QUEUE_DEPTH = Gauge(
    "rerank_queue_depth",
    "Messages waiting in a queue (read from Redis at scrape), per served model.",
    ["queue", "model"],
)
BACKLOG_CHUNKS = Gauge(
    "rerank_backlog_chunks",
    "Bulk chunks waiting in a model's backlog, not yet sent to its lanes (read from Redis at scrape), per tenant. "
    "With rerank_queue_depth, the work waiting: what autoscaling follows.",
    ["model", "tenant"],
)
BACKLOG_PAIRS = Gauge(
    "rerank_backlog_pairs", "Pairs of the chunks in rerank_backlog_chunks, per model and tenant.", ["model", "tenant"]
)
REDIS_MEMORY_USED = Gauge("rerank_redis_memory_used_bytes", "Redis used_memory (INFO memory, at scrape).")
REDIS_MEMORY_MAX = Gauge("rerank_redis_memory_max_bytes", "Redis maxmemory (INFO memory, at scrape); 0: no limit.")
WORKERS_ALIVE = Gauge("rerank_workers_alive", "Scoring workers with a fresh heartbeat (at scrape).")

CHUNK_SENDS = Counter(
    "rerank_chunk_sends_total",
    "Chunk messages sent to the broker (`store.dispatch`), by cause: first (fed from a model's backlog), "
    "engine_error (sent again after its engine call failed), lost (sent again by recovery: its worker died or the "
    "broker lost it).",
    ["cause"],
)
CHUNKS_GIVEN_UP = Counter(
    "rerank_chunks_given_up_total",
    "Chunks not sent again, their job failed instead, by the job's error code (engine_error, chunk_lost: sent "
    "RERANK_CHUNK_MAX_RETRIES + 1 times; store_full: Redis too full to count another send).",
    ["code"],
)
PAIRS_SERVED = Counter(
    "rerank_pairs_served_total",
    "Pairs of the chunks this worker recorded, per model and tenant (bulk and interactive): each tenant's share.",
    ["model", "tenant"],
)
PAIRS_SCORED = Counter("rerank_pairs_scored_total", "Pairs scored by this worker.", ["model"])
TOKENS_SCORED = Counter(
    "rerank_tokens_scored_total", "Prompt tokens scored by this worker (without padding).", ["model"]
)
BATCH_PAIRS = Histogram(
    "rerank_batch_pairs", "Pairs per engine call.", ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
)
BATCH_TOKENS = Histogram(
    "rerank_batch_padded_tokens",
    "Padded tokens per engine call.",
    ["model"],
    buckets=(256, 1024, 4096, 8192, 16384, 32768, 65536, 131072),
)
ENGINE_SECONDS = Histogram(
    "rerank_engine_seconds",
    "Time of one engine call.",
    ["model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
JOB_LATENCY = Histogram(
    "rerank_job_latency_seconds",
    "From submission to success, by kind and model.",
    ["kind", "model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
GPU_MEMORY_USED = Gauge("rerank_gpu_memory_used_bytes", "GPU memory in use (NVML), per worker.", ["worker", "gpu"])
GPU_UTILIZATION = Gauge("rerank_gpu_utilization_ratio", "GPU busy fraction (NVML), per worker.", ["worker", "gpu"])

WEBHOOK_DELIVERIES = Counter(
    "rerank_webhook_deliveries_total",
    "Webhook delivery attempts by the webhook's state after them (delivered, pending, failed, gone) and tenant.",
    ["outcome", "tenant"],
)
# The delivery schedule, the farm's as a whole: every webhook worker exports the same values (aggregate with max).
WEBHOOK_IN_FLIGHT = Gauge("rerank_webhook_in_flight", "Webhook attempts in flight, per destination.", ["destination"])
WEBHOOK_TENANT_IN_FLIGHT = Gauge(
    "rerank_webhook_tenant_in_flight", "Webhook attempts in flight, per tenant.", ["tenant"]
)
WEBHOOK_PAUSED = Gauge(
    "rerank_webhook_paused_destinations", "Destinations paused by the circuit breaker, per tenant.", ["tenant"]
)
WEBHOOK_DUE = Gauge("rerank_webhook_due", "Webhook deliveries due now and not yet taken, per tenant.", ["tenant"])
