"""The Python client (sync and async) and `rerankfarm submit` drive a running farm end to end."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys

import pytest

from rerankfarm import AsyncRerankFarm, RerankFarm, RerankFarmError, verify_webhook

pytestmark = pytest.mark.integration

REQUESTS = [
    {"custom_id": "a", "query": "w1 w2", "documents": ["w1 w2 w3", "w9", "w4 w5"], "top_n": 2},
    {"custom_id": "b", "query": "w7", "documents": ["w7 w8", "w6"]},
]


def test_sync_client_submits_waits_and_streams_results(live_api, worker, reference) -> None:
    with RerankFarm(live_api) as farm:
        job = farm.submit(REQUESTS, priority=7, metadata={"from": "test"})
        done = farm.wait(job["id"], timeout=60, poll=0.1)
        assert done["status"] == "succeeded" and done["metadata"] == {"from": "test"}
        streamed = list(farm.iter_results(job["id"]))
        assert [e["custom_id"] for e in streamed] == ["a", "b"]
        assert streamed == farm.results(job["id"])["data"]
        assert len(streamed[0]["results"]) == 2
        for entry, request in zip(streamed, REQUESTS, strict=True):
            for r in entry["results"]:
                expected = reference.score(request["query"], request["documents"][r["index"]])
                assert r["relevance_score"] == pytest.approx(expected, abs=1e-3)
        answer = farm.rerank("w1", ["w1 w2", "w3", "w4 w5 w6"], top_n=1)
        best = max(range(3), key=lambda i: reference.score("w1", ["w1 w2", "w3", "w4 w5 w6"][i]))
        assert [r["index"] for r in answer["results"]] == [best]
        with pytest.raises(RerankFarmError) as err:
            farm.job("job_" + "0" * 32)
        assert err.value.status == 404 and err.value.code == "job_not_found"


def test_async_client(live_api, worker, reference) -> None:
    async def scenario() -> tuple[dict, list[dict], dict]:
        async with AsyncRerankFarm(live_api) as farm:
            job = await farm.submit(REQUESTS)
            done = await farm.wait(job["id"], timeout=60, poll=0.1)
            entries = [e async for e in farm.iter_results(job["id"])]
            answer = await farm.rerank("w1", ["w1 w2", "w3", "w4 w5 w6"])
            return done, entries, answer

    done, entries, answer = asyncio.run(scenario())
    assert done["status"] == "succeeded" and [e["custom_id"] for e in entries] == ["a", "b"]
    expected = [reference.score("w1", d) for d in ["w1 w2", "w3", "w4 w5 w6"]]
    assert [r["index"] for r in answer["results"]] == sorted(range(3), key=lambda i: -expected[i])
    assert [r["relevance_score"] for r in answer["results"]] == pytest.approx(sorted(expected, reverse=True), abs=1e-3)


def test_verify_webhook_accepts_signed_and_refuses_altered() -> None:
    from datetime import UTC, datetime

    from standardwebhooks import Webhook, WebhookVerificationError

    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = json.dumps({"type": "job.succeeded", "data": {"id": "job_x"}})
    now = datetime.now(UTC)
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign("msg_1", now, body),
    }
    assert verify_webhook(secret, body, headers)["data"]["id"] == "job_x"
    with pytest.raises(WebhookVerificationError):
        verify_webhook(secret, body.replace("job_x", "job_y"), headers)


def test_submit_cli_runs_a_jsonl_file(live_api, worker, tmp_path) -> None:
    source = tmp_path / "in.jsonl"
    lines = [
        {"custom_id": "plain", "query": "w1", "documents": ["w1 w2", "w3"]},
        {
            "custom_id": "batch",
            "method": "POST",
            "url": "/v1/rerank",
            "body": {"query": "w5", "documents": ["w5", "w6", "w7"], "top_n": 1},
        },
    ]
    source.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out.jsonl"
    env = dict(os.environ, RERANK_API_URL=live_api)
    run = subprocess.run(
        [sys.executable, "-m", "rerankfarm.cli", "submit", str(source), "-o", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["custom_id"] for r in results] == ["plain", "batch"]
    assert all(r["response"]["status_code"] == 200 and r["error"] is None for r in results)
    assert len(results[1]["response"]["body"]["results"]) == 1
    assert "pairs" in run.stderr and "done: 2 requests, 5 pairs" in run.stderr
    assert all(set(r) == {"index", "relevance_score"} for line in results for r in line["response"]["body"]["results"])

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"query": "w1", "documents": ["w2"]}\n{not json\n')
    bad = subprocess.run(
        [sys.executable, "-m", "rerankfarm.cli", "submit", str(broken), "-o", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "broken.jsonl:2: not valid JSON" in bad.stderr


def test_submit_cli_cuts_a_file_into_jobs_and_writes_one_output_in_input_order(live_api, worker, tmp_path) -> None:
    """A file cut into 7 jobs of at most 20 pairs (one request of 25 documents is a job alone): one output file, in
    input order, every document of every request ranked once, no field that was not asked for."""
    rng = random.Random(5)
    sizes = [rng.randint(1, 9) for _ in range(20)] + [25] + [rng.randint(1, 9) for _ in range(5)]
    lines = [
        {"custom_id": f"q{i}", "query": f"w{i}", "documents": [f"w{rng.randrange(60)} w{i}" for _ in range(n)]}
        for i, n in enumerate(sizes)
    ]
    source = tmp_path / "many.jsonl"
    source.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "many-out.jsonl"
    run = subprocess.run(
        [sys.executable, "-m", "rerankfarm.cli", "submit", str(source), "-o", str(out), "--part-pairs", "20"],
        env=dict(os.environ, RERANK_API_URL=live_api),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["custom_id"] for r in results] == [x["custom_id"] for x in lines]
    for line, result in zip(lines, results, strict=True):
        ranked = result["response"]["body"]["results"]
        assert sorted(r["index"] for r in ranked) == list(range(len(line["documents"])))
        assert all(set(r) == {"index", "relevance_score"} for r in ranked)
    jobs = {r["id"].split(":")[0] for r in results}
    expected_parts = 1 + sum(1 for _ in _parts(sizes, 20))
    assert len(jobs) == expected_parts - 1 and f"in {len(jobs)} jobs" in run.stderr
    assert f"done: {len(lines)} requests, {sum(sizes)} pairs" in run.stderr


def _parts(sizes: list[int], limit: int):
    """How the client cuts requests of these sizes into parts of at most `limit` pairs."""
    total = 0
    for n in sizes:
        if total and total + n > limit:
            yield total
            total = 0
        total += n
    if total:
        yield total
