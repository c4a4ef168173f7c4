"""Every Redis key and queue name the farm uses, in one place."""

NAMESPACE = "rerank"

QUEUE_BULK = "rerank.bulk"  # + ".{model}": each served model has its own bulk queue ...
QUEUE_INTERACTIVE = "rerank.interactive"  # ... and interactive queue (read by workers/interactive.py's consumer)
RECENT_JOBS_KEPT = 1000
WEBHOOKS_DUE_PREFIX = f"{NAMESPACE}:webhooks:due:"  # + tenant: `webhooks_due_key`
WEBHOOK_TENANTS = f"{NAMESPACE}:webhooks:tenants"  # set: tenants whose due set may hold deliveries
WEBHOOKS_IN_FLIGHT = f"{NAMESPACE}:webhooks:inflight"  # sorted set: "{job}\t{tenant}\t{destination}" -> lease end
WEBHOOK_BREAKER = f"{NAMESPACE}:webhooks:breaker"  # hash: "{tenant}\t{destination}" -> "{failures} {paused until}"
WEBHOOK_SECRETS = f"{NAMESPACE}:webhooks:secrets"  # hash: tenant -> JSON of its signing secrets (store.webhook_secrets)
TASK_SCORE_CHUNK = "rerank.score_chunk"

MODELS_SEEN = f"{NAMESPACE}:models:seen"  # sorted set: served model name -> unix time a live worker last announced it
MODELS_SEEN_KEPT_S = 7 * 86400  # heartbeats drop models not seen for a week

WORKER_KEY_PATTERN = f"{NAMESPACE}:worker:*"
WORKER_TTL_FACTOR = 3  # a worker is alive while its heartbeat is younger than 3 heartbeat periods


def bulk_queue(model: str) -> str:
    """The bulk queue of one served model (kombu adds `:{step}` lists for its priority steps)."""
    return f"{QUEUE_BULK}.{model}"


def interactive_queue(model: str) -> str:
    return f"{QUEUE_INTERACTIVE}.{model}"


def recent_jobs_key(tenant: str) -> str:
    """Sorted set: the tenant's job ids by creation time (unix s), trimmed to RECENT_JOBS_KEPT."""
    return f"{NAMESPACE}:tenant:{tenant}:recent"


def tenant_inflight_key(tenant: str) -> str:
    """Set: the tenant's queued or running job ids (store.job_state's finalize removes a job when it ends)."""
    return f"{NAMESPACE}:tenant:{tenant}:inflight"


def tenant_rate_key(tenant: str, minute: int) -> str:
    """Counter: the tenant's submissions in one minute (unix minute)."""
    return f"{NAMESPACE}:tenant:{tenant}:rate:{minute}"


def idempotency_key(tenant: str, route: str, key_hash: str) -> str:
    """Hash with a TTL: an Idempotency-Key's claim (`fingerprint` of the first request's body) and what it created
    (`resource`: a job, batch or file id). `store.idempotency`."""
    return f"{NAMESPACE}:tenant:{tenant}:idem:{route}:{key_hash}"


def interactive_inflight_key(model: str) -> str:
    """Sorted set with a TTL: the model's interactive calls in flight, `{tenant}|{call id}|{pairs}` -> the unix time
    their wait ends (an entry whose API process died leaves at that time). `store.interactive`."""
    return f"{NAMESPACE}:interactive:{model}:inflight"


def job_key(job_id: str) -> str:
    """Hash: the job record (status, counts, timestamps, error)."""
    return f"{NAMESPACE}:job:{job_id}"


def job_input_key(job_id: str) -> str:
    """String (JSON): per request custom_id, top_n, document count, and texts/ids when results must carry them."""
    return f"{NAMESPACE}:job:{job_id}:input"


def job_chunks_key(job_id: str) -> str:
    """Hash: chunk index -> the chunk's input (`schemas.chunks.Chunk` JSON). The only copy of a job's texts: chunk
    messages carry a `ChunkRef`. Dropped when the job ends unless its results must echo documents."""
    return f"{NAMESPACE}:job:{job_id}:chunks"


def job_ledger_key(job_id: str) -> str:
    """Hash: per chunk index i, `i:sends` (times sent), `i:seq` (its place in its lane when last sent), `i:holder`
    and `i:taken_at` (the worker that last took it, and when). `store.chunk_ledger` reads and writes it."""
    return f"{NAMESPACE}:job:{job_id}:ledger"


# Sorted set: "{job id}:{chunk index}" of every chunk sent and not yet recorded -> the last time something vouched
# for it (sent, taken, renewed by its live holder, or seen waiting in its queue). `store.chunk_ledger`.
CHUNKS_OPEN = f"{NAMESPACE}:chunks:open"

# Sorted set: the id of every job with a deadline that has not ended -> its deadline (unix). `store.job_state`.
JOB_DEADLINES = f"{NAMESPACE}:jobs:deadlines"


# Hash: tenant -> its weight in the fair shares of bulk work (`store.backlog`; 1 when absent).
TENANT_WEIGHTS = f"{NAMESPACE}:tenants:weights"


def backlog_prefix(model: str) -> str:
    """The prefix of a model's backlog keys (`store.backlog`): bulk chunks not yet sent to a worker's lane.
    `{prefix}:{priority}:tenants` (sorted set: tenant -> its virtual time at that priority), `{prefix}:{priority}:
    jobs:{tenant}` (sorted set: job -> its virtual time within its tenant), `{prefix}:{priority}:clock` (hash: `_` the
    tenants' clock, tenant -> its jobs' clock), `{prefix}:left` (hash: job -> chunks not yet sent, `{job}:pairs` their
    pairs) and `{prefix}:waiting` (hash: chunks and pairs waiting, `chunks` and `pairs` in all, `{tenant}:chunks` ...
    per tenant, `#{priority}:chunks` ... per priority)."""
    return f"{NAMESPACE}:backlog:{model}"


def lane_key(lane: str) -> str:
    """Hash: a queue lane's (one Redis list of kombu's) `sent` counter (sequence numbers given at send) and `taken`
    (the highest sequence number a worker has taken). Lanes are FIFO, so a chunk whose number is at most `taken`
    has left its list."""
    return f"{NAMESPACE}:lane:{lane}"


def job_scores_key(job_id: str) -> str:
    """Hash: chunk index -> ChunkResult JSON. HSETNX makes a redelivered chunk count once."""
    return f"{NAMESPACE}:job:{job_id}:scores"


def job_workers_key(job_id: str) -> str:
    """Hash: worker hostname -> pairs it scored for this job."""
    return f"{NAMESPACE}:job:{job_id}:workers"


def job_done_key(job_id: str) -> str:
    """List: gets the final status pushed when a job that someone waits on (`notify`) ends; the waiter BLPOPs it."""
    return f"{NAMESPACE}:job:{job_id}:done"


DONE_TTL_S = 600  # a done-list nobody popped disappears after 10 minutes


def worker_key(hostname: str) -> str:
    """String (JSON) with a TTL: a live worker's heartbeat and what it runs."""
    return f"{NAMESPACE}:worker:{hostname}"


def webhooks_due_key(tenant: str) -> str:
    """Sorted set: the tenant's job ids -> unix time their next webhook delivery attempt is due. One per tenant, so
    that a tenant's backlog of deliveries never hides another's (`store.webhook_queue`)."""
    return f"{WEBHOOKS_DUE_PREFIX}{tenant}"


def job_webhook_attempts_key(job_id: str) -> str:
    """List: one JSON entry per webhook delivery attempt (time, status code, error)."""
    return f"{NAMESPACE}:job:{job_id}:webhook"


def file_key(file_id: str) -> str:
    """Hash with a TTL: an uploaded file's record (tenant, name, purpose, size, times); its bytes are on disk."""
    return f"{NAMESPACE}:file:{file_id}"


def tenant_files_key(tenant: str) -> str:
    """Sorted set: the tenant's file ids by upload time (unix s)."""
    return f"{NAMESPACE}:tenant:{tenant}:files"


FILES_EXPIRY = f"{NAMESPACE}:files:expiry"  # sorted set: file id -> unix time its bytes may be deleted


def batch_key(batch_id: str) -> str:
    """Hash: a batch's record (its job, input file, endpoint, window, metadata, validation errors)."""
    return f"{NAMESPACE}:batch:{batch_id}"


def batch_lines_key(batch_id: str) -> str:
    """List: per input line, JSON [custom_id, shape, render options, requests it became] (output is rendered from
    them)."""
    return f"{NAMESPACE}:batch:{batch_id}:lines"


def tenant_batches_key(tenant: str) -> str:
    """Sorted set: the tenant's batch ids by creation time (unix s)."""
    return f"{NAMESPACE}:tenant:{tenant}:batches"
