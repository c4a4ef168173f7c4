"""Every Redis key and queue name the farm uses, in one place."""

NAMESPACE = "rerank"

QUEUE_BULK = "rerank.bulk"
QUEUE_INTERACTIVE = "rerank.interactive"  # consumed before QUEUE_BULK
QUEUE_WEBHOOKS = "rerank.webhooks"  # consumed by `rerankfarm webhooks`, never by a GPU worker
TASK_DELIVER_WEBHOOK = "rerank.deliver_webhook"
RECENT_JOBS_KEPT = 1000
WEBHOOKS_DUE = f"{NAMESPACE}:webhooks:due"  # sorted set: job id -> unix time its next delivery attempt is due
TASK_SCORE_CHUNK = "rerank.score_chunk"

WORKER_KEY_PATTERN = f"{NAMESPACE}:worker:*"
WORKER_TTL_FACTOR = 3  # a worker is alive while its heartbeat is younger than 3 heartbeat periods


def recent_jobs_key(tenant: str) -> str:
    """Sorted set: the tenant's job ids by creation time (unix s), trimmed to RECENT_JOBS_KEPT."""
    return f"{NAMESPACE}:tenant:{tenant}:recent"


def tenant_inflight_key(tenant: str) -> str:
    """Set: the tenant's queued or running job ids (FINAL_LUA removes a job when it ends)."""
    return f"{NAMESPACE}:tenant:{tenant}:inflight"


def tenant_rate_key(tenant: str, minute: int) -> str:
    """Counter: the tenant's submissions in one minute (unix minute)."""
    return f"{NAMESPACE}:tenant:{tenant}:rate:{minute}"


def job_key(job_id: str) -> str:
    """Hash: the job record (status, counts, timestamps, error)."""
    return f"{NAMESPACE}:job:{job_id}"


def job_input_key(job_id: str) -> str:
    """String (JSON): per request custom_id, top_n, document count, and texts/ids when results must carry them."""
    return f"{NAMESPACE}:job:{job_id}:input"


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


def job_webhook_attempts_key(job_id: str) -> str:
    """List: one JSON entry per webhook delivery attempt (time, status code, error)."""
    return f"{NAMESPACE}:job:{job_id}:webhook"


def job_script_keys(job_id: str) -> list[str]:
    """The KEYS every job-state Lua script receives, in this order (FINAL_LUA relies on it)."""
    return [
        job_key(job_id),
        job_scores_key(job_id),
        job_workers_key(job_id),
        job_input_key(job_id),
        job_done_key(job_id),
        WEBHOOKS_DUE,
    ]


# Lua prelude of the job-state scripts. finalize(status) runs in the same script that sets a final status, so
# nothing is lost between the two: it takes the job out of its tenant's in-flight set (a key built here from the
# job's tenant, as tenant_inflight_key does: fine on one Redis, which is all kombu supports), pushes the status to
# the done-list when someone waits on the job (`notify`), and schedules the webhook event when the job has a
# webhook that wants it. The script's last ARGV is the
# done-list's TTL in seconds.
FINAL_LUA = """
local function finalize(status)
  local tenant = redis.call('HGET', KEYS[1], 'tenant')
  if tenant then
    redis.call('SREM', 'rerank:tenant:' .. tenant .. ':inflight', redis.call('HGET', KEYS[1], 'id'))
  end
  if redis.call('HGET', KEYS[1], 'notify') == '1' then
    redis.call('RPUSH', KEYS[5], status)
    redis.call('EXPIRE', KEYS[5], tonumber(ARGV[#ARGV]))
  end
  local events = redis.call('HGET', KEYS[1], 'webhook_events')
  if events and string.find(events, '"job.' .. status .. '"', 1, true) then
    redis.call('HSET', KEYS[1], 'webhook_event', 'job.' .. status, 'webhook_state', 'pending', 'webhook_attempt', 0)
    redis.call('ZADD', KEYS[6], redis.call('TIME')[1], redis.call('HGET', KEYS[1], 'id'))
  end
end
"""
