"""Every Redis key and queue name the farm uses, in one place."""

NAMESPACE = "rerank"

QUEUE_BULK = "rerank.bulk"
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
    """Hash: chunk index -> JSON list of scores. HSETNX makes a redelivered chunk count once."""
    return f"{NAMESPACE}:job:{job_id}:scores"


def job_workers_key(job_id: str) -> str:
    """Hash: worker hostname -> pairs it scored for this job."""
    return f"{NAMESPACE}:job:{job_id}:workers"


def all_job_keys(job_id: str) -> list[str]:
    return [job_key(job_id), job_input_key(job_id), job_scores_key(job_id), job_workers_key(job_id)]


def worker_key(hostname: str) -> str:
    """String (JSON) with a TTL: a live worker's heartbeat and what it runs."""
    return f"{NAMESPACE}:worker:{hostname}"
