"""The farm's state in Redis, read and written by the API, the workers and the webhook worker alike: a job's record
and its moves (`job_state`), each chunk's sends (`chunk_ledger`), a job's results (`results`), the queues chunk
messages travel in (`queueing`), API keys (`api_keys`). Key names live in `schemas.keys`; the shapes that go over
HTTP in `schemas`."""
