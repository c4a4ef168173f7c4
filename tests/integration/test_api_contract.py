"""What callers meet at the edges: validation, unknown ids, readiness."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from tests.integration.conftest import farm_settings

pytestmark = pytest.mark.integration

GOOD = {"query": "w1", "documents": ["w2"]}


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"requests": [{"query": "", "documents": ["w1"]}]}, 422, "requests.0.query"),
        ({"requests": [{"query": "   ", "documents": ["w1"]}]}, 422, "query"),
        ({"requests": [{"query": "w1", "documents": []}]}, 422, "documents"),
        ({"requests": [{"query": "w1"}]}, 422, "documents"),
        ({"requests": [{"query": "w1", "documents": [""]}]}, 422, "documents"),
        ({"requests": [{"query": "w1", "documents": [{"text": ""}]}]}, 422, "documents"),
        ({"requests": [{"query": "w1", "documents": [3, 4]}]}, 422, "documents"),
        ({"requests": [{"query": "w1", "documents": [None]}]}, 422, "documents"),
        ({"requests": []}, 422, "requests"),
        ({}, 422, "requests"),
        ([1, 2], 422, "object"),
        ({"requests": [{**GOOD, "top_n": 0}]}, 422, "top_n"),
        ({"requests": [{**GOOD, "top_n": 5}]}, 422, "top_n"),
        ({"requests": [GOOD], "priority": 12}, 422, "priority"),
        ({"requests": [{**GOOD, "custom_id": "a"}, {**GOOD, "custom_id": "a"}]}, 422, "unique"),
        ({"requests": [{**GOOD, "qurey": "typo"}]}, 422, "qurey"),
        ({"requests": [{"query": "w1", "documents": ["w"] * 11}]}, 413, "10"),
        ({"requests": [GOOD] * 6}, 413, "requests"),
        ({"requests": [{"query": "w1", "documents": ["x" * 501]}]}, 413, "characters"),
    ],
)
def test_bad_jobs_get_a_4xx_with_a_message(redis_url, tiny_model_dir, body, status, words) -> None:
    settings = farm_settings(
        redis_url, tiny_model_dir, max_documents_per_request=10, max_requests_per_job=5, max_document_chars=500
    )
    with TestClient(create_app(settings)) as c:
        r = c.post("/v1/jobs", json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_invalid_json_is_400(client) -> None:
    r = client.post("/v1/jobs", content=b'{"requests": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("path", ["/v1/jobs/{id}", "/v1/jobs/{id}/results"])
@pytest.mark.parametrize("job_id", ["job_" + "0" * 32, "nope", "job_../../x"])
def test_unknown_job_is_404(client, path, job_id) -> None:
    r = client.get(path.format(id=job_id))
    assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 404


def test_readyz_needs_a_live_worker(fresh_url, tiny_model_dir, client, worker) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and any(h.startswith(f"{worker.node}@") for h in ready.json()["workers"])
    assert {e for h, e in ready.json()["engines"].items() if h.startswith(f"{worker.node}@")} == {"vllm on cpu"}
    with TestClient(create_app(farm_settings(fresh_url, tiny_model_dir))) as lonely:
        r = lonely.get("/readyz")
    assert r.status_code == 503 and r.json()["error"]["message"] == "no worker alive"
    with TestClient(create_app(farm_settings("redis://127.0.0.1:1/0", tiny_model_dir))) as cut_off:
        r = cut_off.get("/readyz")
        assert r.status_code == 503 and "redis" in r.json()["error"]["message"]
        r = cut_off.post("/v1/jobs", json={"requests": [GOOD]})
        assert r.status_code == 503 and r.headers["retry-after"]


def test_openapi_docs_are_served(client) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and "swagger-ui" in page.text and "/openapi.json" in page.text
    spec = client.get("/openapi.json").json()
    assert spec["info"]["title"] == "rerank farm"
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/rerank", "/v2/rerank"} <= set(spec["paths"])
    assert "/v1/jobs/{job_id}/results" in client.get("/openapi.json").json()["paths"]


def test_api_never_imports_torch_or_vllm() -> None:
    code = "import sys, api.main; sys.exit(bool({'torch', 'vllm', 'transformers'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], env=os.environ).returncode == 0


@pytest.mark.parametrize("entry", ["api.main", "webhooks.worker"])
def test_the_api_and_the_webhook_worker_import_nothing_of_the_workers(entry: str) -> None:
    """The layers: `api/` and `webhooks/` reach the scoring workers through Redis alone (a model's instruction
    comes from its workers' heartbeats, not from an import)."""
    code = f"import sys, {entry}; sys.exit(sorted(m for m in sys.modules if m.split('.')[0] == 'workers') or 0)"
    run = subprocess.run([sys.executable, "-c", code], env=os.environ, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
