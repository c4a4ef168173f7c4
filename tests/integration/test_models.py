"""Two models of the two families on one farm: a tiny Qwen3 reranker and a tiny BERT cross-encoder, each on a worker
of its own. Jobs, interactive calls and batch lines land on the worker of the model they name (or of the default
model) and equal that family's reference scores; an unserved model is refused with the served names; a job for a
model whose only worker died completes once a worker of that model is back."""

from __future__ import annotations

import json
import random
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from tests.conftest import TINY, TINY_CE, random_text
from tests.integration.conftest import WorkerProcess, farm_settings, wait_for
from workers.models.qwen3_reranker import DEFAULT_INSTRUCTION

pytestmark = pytest.mark.integration


def _docs(seed: int, n: int) -> tuple[str, list[str]]:
    rng = random.Random(seed)
    return random_text(rng, 2, 6), [random_text(rng, 3, 40) for _ in range(n)]


def _scores(results: list[dict[str, Any]]) -> dict[int, float]:
    return {r["index"]: r["relevance_score"] for r in results}


def _close(got: dict[int, float], query: str, docs: list[str], reference: Any) -> None:
    expected = {i: reference.score(query, d) for i, d in enumerate(docs)}
    assert got.keys() == expected.keys()
    assert max(abs(got[i] - expected[i]) for i in got) < 1e-4, (got, expected)


@pytest.fixture(scope="module")
def two_models(databases, tiny_model_dir, tiny_cross_encoder_dir, log_dir):
    with databases.take() as url:
        qwen = WorkerProcess(url, tiny_model_dir, log_dir, concurrency=1).start()
        cross = WorkerProcess(url, tiny_cross_encoder_dir, log_dir, concurrency=1).start()
        try:
            yield url, qwen, cross
        finally:
            qwen.stop()
            cross.stop()


def test_each_model_is_served_by_its_own_workers_with_its_familys_rule(
    two_models, tiny_model_dir, reference, cross_encoder_reference
) -> None:
    url, qwen, cross = two_models
    settings = farm_settings(url, tiny_model_dir, model_aliases={"rerank-v3.5": TINY_CE})
    with TestClient(create_app(settings)) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [TINY, TINY_CE]  # the default first
        info = client.get("/v1/info").json()
        assert info["model"] == TINY
        assert {m["name"]: (m["live"], m["aliases"], m["instruction"]) for m in info["models"]} == {
            TINY: (True, [], DEFAULT_INSTRUCTION),  # Qwen3-Reranker's, as its workers announce it
            TINY_CE: (True, ["rerank-v3.5"], None),  # a cross-encoder takes no instruction
        }
        assert info["default_instruction"] == DEFAULT_INSTRUCTION

        # Bulk jobs: the model named, or the default.
        for seed, model, worker, ref in ((1, TINY_CE, cross, cross_encoder_reference), (2, None, qwen, reference)):
            query, docs = _docs(seed, 12)
            body: dict[str, Any] = {"requests": [{"query": query, "documents": docs}]}
            if model:
                body["model"] = model
            job = client.post("/v1/jobs", json=body).json()
            done = wait_for(client, job["id"])
            assert done["status"] == "succeeded" and done["model"] == (model or TINY)
            assert set(done["workers"]) == set(worker.alive_hostnames())  # scored by that model's worker alone
            [entry] = client.get(f"/v1/jobs/{job['id']}/results").json()["data"]
            _close(_scores(entry["results"]), query, docs, ref)

        # Interactive calls: Cohere's shape naming an alias, TEI's naming none (the default), then naming one.
        query, docs = _docs(3, 6)
        cohere = client.post("/v1/rerank", json={"model": "rerank-v3.5", "query": query, "documents": docs})
        assert cohere.status_code == 200, cohere.text
        _close(_scores(cohere.json()["results"]), query, docs, cross_encoder_reference)
        tei = client.post("/rerank", json={"query": query, "texts": docs}).json()
        _close({r["index"]: r["score"] for r in tei}, query, docs, reference)
        tei_named = client.post("/rerank", json={"model": TINY_CE, "query": query, "texts": docs}).json()
        _close({r["index"]: r["score"] for r in tei_named}, query, docs, cross_encoder_reference)

        # A batch whose lines name the cross-encoder.
        call = {"model": TINY_CE, "query": query, "documents": docs}
        lines = "\n".join(json.dumps({"custom_id": f"r{n}", "url": "/v1/rerank", "body": call}) for n in range(2))
        file_id = client.post("/v1/files", files={"file": ("in.jsonl", lines)}, data={"purpose": "batch"}).json()["id"]
        batch = client.post(
            "/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/rerank", "completion_window": "24h"}
        ).json()
        job = wait_for(client, batch["id"].replace("batch_", "job_"))
        assert job["status"] == "succeeded" and job["model"] == TINY_CE
        output = client.get(f"/v1/files/{batch['id'].replace('batch_', 'file-')}-output/content").text.splitlines()
        for raw in output:
            body = json.loads(raw)["response"]["body"]
            _close(_scores(body["results"]), query, docs, cross_encoder_reference)

        # A batch mixing models is refused line by line.
        mixed = "\n".join(
            json.dumps({"custom_id": f"m{n}", "body": {"model": m, "query": query, "documents": docs}})
            for n, m in enumerate((TINY, TINY_CE))
        )
        mixed_id = client.post("/v1/files", files={"file": ("m.jsonl", mixed)}, data={"purpose": "batch"}).json()["id"]
        refused = client.post(
            "/v1/batches", json={"input_file_id": mixed_id, "endpoint": "/v1/rerank", "completion_window": "24h"}
        ).json()
        assert refused["status"] == "failed" and refused["errors"]["data"][0]["code"] == "model_mismatch"


def test_an_unserved_model_is_refused_in_the_callers_shape_with_the_served_names(two_models, tiny_model_dir) -> None:
    url, _, _ = two_models
    with TestClient(create_app(farm_settings(url, tiny_model_dir, model_aliases={}))) as client:
        before = len(client.get("/v1/jobs").json()["data"])
        job = client.post("/v1/jobs", json={"model": "rerank-v3.5", "requests": [{"query": "w1", "documents": ["w2"]}]})
        assert job.status_code == 404 and job.json()["error"]["code"] == "model_not_found"
        message = job.json()["error"]["message"]
        assert "rerank-v3.5" in message and TINY in message and TINY_CE in message  # no alias: never by accident
        voyage = client.post("/v1/rerank", json={"model": "rerank-2", "query": "w1", "documents": ["w2"], "top_k": 1})
        assert voyage.status_code == 404 and TINY_CE in voyage.json()["detail"]  # Voyage's error shape
        score = client.post("/v1/score", json={"model": "nope", "text_1": "w1", "text_2": ["w2"]})
        assert score.status_code == 404 and score.json()["error"]["code"] == "model_not_found"
        assert len(client.get("/v1/jobs").json()["data"]) == before  # nothing was queued


def test_a_job_for_a_model_whose_only_worker_died_completes_once_one_is_back(
    two_models, tiny_model_dir, tiny_cross_encoder_dir, log_dir, cross_encoder_reference
) -> None:
    url, _, cross = two_models
    cross.kill()
    with TestClient(create_app(farm_settings(url, tiny_model_dir))) as client:
        query, docs = _docs(5, 20)
        job = client.post("/v1/jobs", json={"model": TINY_CE, "requests": [{"query": query, "documents": docs}]})
        assert job.status_code == 202, job.text  # no live worker, still within the grace period: accepted
        time.sleep(3)  # the Qwen3 worker, alive, never takes the cross-encoder's chunks
        waiting = client.get(f"/v1/jobs/{job.json()['id']}").json()
        assert waiting["status"] == "queued" and waiting["progress"]["completed"] == 0
        back = WorkerProcess(url, tiny_cross_encoder_dir, log_dir, concurrency=1).start()
        try:
            done = wait_for(client, job.json()["id"], timeout=120)
            assert done["status"] == "succeeded" and set(done["workers"]) == set(back.alive_hostnames())
            [entry] = client.get(f"/v1/jobs/{done['id']}/results").json()["data"]
            _close(_scores(entry["results"]), query, docs, cross_encoder_reference)
        finally:
            back.stop()
