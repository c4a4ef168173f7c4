"""A bulk job through the whole farm: HTTP -> Redis -> a real Celery worker process -> Redis -> HTTP."""

from __future__ import annotations

import random
import time

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from tests.conftest import random_text
from tests.integration.conftest import WorkerProcess, farm_settings, wait_for

pytestmark = pytest.mark.integration


def _job_body(rng: random.Random) -> dict:
    requests = []
    for r in range(4):
        docs: list = [random_text(rng, 1, 150) for _ in range(rng.randint(6, 13))]
        if r == 2:
            docs = [{"text": d, "id": f"doc-{i}"} for i, d in enumerate(docs)]
        requests.append(
            {
                "custom_id": f"req-{r}",
                "query": random_text(rng, 2, 9),
                "documents": docs,
                "instruction": "Find the passage about w7" if r == 1 else None,
                "top_n": 4 if r == 3 else None,
                "return_documents": r != 0,
            }
        )
    return {"requests": requests, "priority": 7, "metadata": {"team": "search"}}


def test_job_scores_equal_transformers_alone_for_every_pair(client, worker, reference) -> None:
    body = _job_body(random.Random(11))
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["progress"] == {"completed": 0, "total": sum(len(q["documents"]) for q in body["requests"])}

    done = wait_for(client, job["id"])
    assert done["status"] == "succeeded", done
    assert done["progress"]["completed"] == done["progress"]["total"]
    assert done["started_at"] and done["finished_at"] and done["metadata"] == {"team": "search"}
    assert sum(done["workers"].values()) == done["progress"]["total"]

    data = client.get(f"/v1/jobs/{job['id']}/results").json()["data"]
    assert [d["custom_id"] for d in data] == [q["custom_id"] for q in body["requests"]]
    for request, entry in zip(body["requests"], data, strict=True):
        texts = [d if isinstance(d, str) else d["text"] for d in request["documents"]]
        results = entry["results"]
        assert len(results) == (request["top_n"] or len(texts))
        scores = [x["relevance_score"] for x in results]
        assert scores == sorted(scores, reverse=True)
        for x in results:
            expected = reference.score(request["query"], texts[x["index"]], request["instruction"])
            assert x["relevance_score"] == pytest.approx(expected, abs=1e-3)
            assert (x.get("document") or {}).get("text") == (texts[x["index"]] if request["return_documents"] else None)
        if request["top_n"]:  # the cut keeps the best ones
            all_scores = [reference.score(request["query"], t, request["instruction"]) for t in texts]
            assert min(scores) >= sorted(all_scores, reverse=True)[request["top_n"] - 1] - 1e-3
    assert [x["id"] for x in data[2]["results"]] == [f"doc-{x['index']}" for x in data[2]["results"]]


def test_results_are_409_until_the_job_succeeded(fresh_url, tiny_model_dir) -> None:
    # A database no worker consumes: the job stays queued.
    with TestClient(create_app(farm_settings(fresh_url, tiny_model_dir))) as c:
        job = c.post("/v1/jobs", json={"requests": [{"query": "w1", "documents": ["w2"]}]}).json()
        r = c.get(f"/v1/jobs/{job['id']}/results")
        assert r.status_code == 409 and "queued" in r.json()["error"]["message"]


def test_a_job_past_its_deadline_ends_expired_when_read_with_no_worker_at_all(fresh_url, tiny_model_dir) -> None:
    with TestClient(create_app(farm_settings(fresh_url, tiny_model_dir))) as c:
        body = {"requests": [{"query": "w1", "documents": ["w2", "w3"]}], "deadline_s": 1}
        job = c.post("/v1/jobs", json=body).json()
        assert job["status"] == "queued" and job["deadline_at"]
        time.sleep(1.2)
        ended = c.get(f"/v1/jobs/{job['id']}").json()
        assert ended["status"] == "failed" and ended["error"]["code"] == "expired"
        assert ended["progress"] == {"completed": 0, "total": 2}
        assert c.post("/v1/jobs", json={**body, "deadline_s": 0}).status_code == 422


def test_an_expired_jobs_results_hold_what_was_scored_before_its_deadline(client, worker) -> None:
    """A job too big for its 4 s deadline ends expired part-way; its results hold exactly the pairs it scored."""
    rng = random.Random(7)
    documents = [random_text(rng, 50, 200) for _ in range(3000)]
    body = {
        "requests": [{"query": "w1", "documents": documents[:1500]}, {"query": "w2", "documents": documents[1500:]}]
    }
    job = client.post("/v1/jobs", json={**body, "deadline_s": 4}).json()
    ended = wait_for(client, job["id"], timeout=60)
    assert ended["status"] == "failed" and ended["error"]["code"] == "expired", ended
    data = client.get(f"/v1/jobs/{job['id']}/results").json()["data"]
    scored = [len(entry["results"]) for entry in data]
    assert 0 < sum(scored) == client.get(f"/v1/jobs/{job['id']}").json()["progress"]["completed"] < 3000
    for entry in data:  # ranked as usual, among the documents scored
        values = [r["relevance_score"] for r in entry["results"]]
        assert values == sorted(values, reverse=True)


def test_the_workers_expire_a_job_waiting_past_its_deadline(client, worker, redis_url) -> None:
    """A job with a 1 s deadline waits behind a big one of a higher priority (of the same tenant at the same priority,
    it would share the workers with it); no one reads it, and the workers' periodic look (every 5 s) ends it expired;
    the big one is not disturbed."""
    import redis

    from schemas import keys

    rng = random.Random(6)
    big = {"requests": [{"query": "w1", "documents": [random_text(rng, 50, 200) for _ in range(2000)]}], "priority": 9}
    first = client.post("/v1/jobs", json=big).json()
    late = client.post(
        "/v1/jobs", json={"requests": [{"query": "w2", "documents": ["w3"]}], "priority": 1, "deadline_s": 1}
    ).json()
    direct = redis.Redis.from_url(redis_url, decode_responses=True)
    deadline = time.monotonic() + 30
    while direct.hget(keys.job_key(late["id"]), "status") != "failed":  # read from Redis: the API would expire it
        assert time.monotonic() < deadline, direct.hgetall(keys.job_key(late["id"]))
        time.sleep(0.2)
    assert direct.hget(keys.job_key(late["id"]), "error_code") == "expired"
    assert client.get(f"/v1/jobs/{first['id']}").json()["status"] in ("queued", "running")
    client.post(f"/v1/jobs/{first['id']}/cancel")


def test_cancel_stops_scoring_the_rest(client, worker) -> None:
    rng = random.Random(5)
    body = {
        "requests": [
            {"query": random_text(rng, 2, 5), "documents": [random_text(rng, 50, 200) for _ in range(400)]}
            for _ in range(5)
        ]
    }
    job = client.post("/v1/jobs", json=body).json()
    wait_for(client, job["id"], until=("running",), timeout=60)
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"]
    at_cancel = cancelled["progress"]["completed"]
    time.sleep(3)  # long enough to score hundreds of pairs: a worker that ignored the cancel would
    later = client.get(f"/v1/jobs/{job['id']}").json()
    assert later["status"] == "cancelled"
    # Only the chunks the worker held when the cancel came may still finish: its concurrency x the chunk size,
    # however fast or slow the machine is.
    assert later["progress"]["completed"] - at_cancel <= worker.concurrency * 5, (at_cancel, later["progress"])
    assert client.get(f"/v1/jobs/{job['id']}/results").status_code == 409
    assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"  # idempotent


def test_two_workers_share_one_big_job(client, worker, redis_url, tiny_model_dir, log_dir) -> None:
    second = WorkerProcess(redis_url, tiny_model_dir, log_dir).start()
    try:
        rng = random.Random(9)
        body = {
            "requests": [
                {"query": random_text(rng, 2, 5), "documents": [random_text(rng, 20, 80) for _ in range(60)]}
                for _ in range(5)
            ]
        }
        job = client.post("/v1/jobs", json=body).json()
        done = wait_for(client, job["id"])
        assert done["status"] == "succeeded"
        by_worker = done["workers"]
        assert {h.split("@")[0] for h in by_worker} == {worker.node, second.node}, by_worker
        assert all(n > 0 for n in by_worker.values()) and sum(by_worker.values()) == 300
    finally:
        second.stop()
