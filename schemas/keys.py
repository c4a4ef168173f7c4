"""Every Redis key and queue name the farm uses, in one place."""

NAMESPACE = "rerank"

QUEUE_BULK = "rerank.bulk"
QUEUE_INTERACTIVE = "rerank.interactive"  # consumed before QUEUE_BULK
TASK_SCORE_CHUNK = "rerank.score_chunk"

WORKER_KEY_PATTERN = f"{NAMESPACE}:worker:*"
WORKER_TTL_FACTOR = 3  # a worker is alive while its heartbeat is younger than 3 heartbeat periods


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


def job_script_keys(job_id: str) -> list[str]:
    """The KEYS every job-state Lua script receives, in this order; NOTIFY_LUA expects the done-list fifth."""
    return [
        job_key(job_id),
        job_scores_key(job_id),
        job_workers_key(job_id),
        job_input_key(job_id),
        job_done_key(job_id),
    ]


# Lua prelude for the job-state scripts: pushes the final status to the job's done-list when someone waits on it
# (the job's `notify` field). The script's last ARGV is the list's TTL in seconds.
NOTIFY_LUA = """
local function notify(status)
  if redis.call('HGET', KEYS[1], 'notify') == '1' then
    redis.call('RPUSH', KEYS[5], status)
    redis.call('EXPIRE', KEYS[5], tonumber(ARGV[#ARGV]))
  end
end
"""
