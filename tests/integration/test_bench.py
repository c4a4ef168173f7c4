"""`rerankfarm bench` runs on any machine with the tiny model and its farm scores equal the raw engine's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import VLLM_TEST_ENV

pytestmark = pytest.mark.integration


def test_bench_compares_farm_and_raw_engine_and_writes_json(tmp_path) -> None:
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
    env.update(HOME=str(tmp_path), CUDA_VISIBLE_DEVICES="", RERANK_WORKER_HEARTBEAT_S="1", **VLLM_TEST_ENV)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "rerankfarm.cli",
            "bench",
            "--model",
            "tiny",
            "--pairs",
            "150",
            "--jobs",
            "2",
            "--latency-calls",
            "2",
            "--latency-docs",
            "5",
            "--json",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["pairs"] == 150
    assert result["raw_pairs_per_s"] > 0 and result["farm_pairs_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["farm_pairs_per_s"] / result["raw_pairs_per_s"], rel=0.01)
    assert result["max_abs_score_diff"] < 1e-4
    assert result["interactive_idle_p50_s"] > 0 and result["interactive_under_bulk_p99_s"] > 0
    assert "| farm / raw" in run.stdout
    assert result["engine"] == "vllm"  # `auto` resolves to vLLM where it is installed
    cpu = result["farm_cpu_s"]
    # On the CPU the forward passes are most of a worker's time: the engine's threads (its compute threads among
    # them) were told apart from the rest of the worker.
    assert 0 < cpu["engine"] <= cpu["worker"] and cpu["engine"] > 0.5 * cpu["worker"], cpu
    assert result["farm_cpu_outside_engine_ms_per_pair"] > 0


def test_bench_interactive_runs_the_size_ladder_idle_and_under_another_tenants_flood(tmp_path) -> None:
    """The interactive benchmark's farm (auth on, two tenants) answers every call of every size, idle and while the
    other tenant floods it, and its JSON and table say so (small sizes here: a smoke test, not a measure)."""
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
    env.update(HOME=str(tmp_path), CUDA_VISIBLE_DEVICES="", RERANK_WORKER_HEARTBEAT_S="1", **VLLM_TEST_ENV)
    command = [sys.executable, "-m", "rerankfarm.bench_interactive", "--engine", "transformers", "--sizes", "5", "40"]
    command += ["--calls", "3", "--flood", "2", "--flood-docs", "200", "--json", str(out)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    for phase in ("idle", "under_flood"):
        assert {d: r["codes"] for d, r in result[phase].items()} == {"5": {"200": 3}, "40": {"200": 3}}, result
        assert 0 < result[phase]["5"]["p50"] <= result[phase]["5"]["max"]
    assert result["flood_codes"].get("200", 0) > 0 and set(result["flood_codes"]) <= {"200", "429"}, result
    assert result["bulk_pairs"] == 40 and result["bulk_s"] > 0
    assert "| 40 |" in run.stdout and "under flood, p90 <=" in run.stdout


def test_bench_webhooks_measures_a_tenants_event_behind_anothers_hanging_receiver(tmp_path) -> None:
    """The webhook benchmark, small (10 hanging deliveries, a 3 s timeout, the worker looking every 0.2 s): with the
    farm's caps tenant A holds 4 of the 8 slots and B's event goes at once; with the caps opened to every slot, A
    holds all 8 and B's event waits for one, as one FIFO made it wait."""
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
    env["RERANK_WEBHOOK_DISPATCH_INTERVAL_S"] = "0.2"
    command = [sys.executable, "-m", "rerankfarm.bench_webhooks", "--jobs", "10", "--timeout", "3"]
    run = subprocess.run([*command, "--json", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    fair, fifo = json.loads(out.read_text())["rows"]
    assert fair["target_met"] and fair["a_attempts_at_once"] == 4, fair  # the destination's cap
    assert fifo["a_attempts_at_once"] == 8, fifo  # every slot
    assert fifo["b_event_after_job_end_s"] > fair["b_event_after_job_end_s"] + 1, (fair, fifo)
    assert "farm caps (defaults)" in run.stdout


def test_bench_fairness_measures_two_tenants_shares_and_a_small_job_behind_a_backlog(tmp_path) -> None:
    """The fairness benchmark, small (a few seconds of backlog, a 4 s window): both weight pairs run, B's small job
    ends while A's backlog waits, both tenants are served in the 1:1 window, and A's share is larger at 3:1."""
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
    env.update(HOME=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "rerankfarm.bench_fairness", "--backlog-s", "12", "--window-s", "4"]
    run = subprocess.run(
        [*command, "--repeats", "1", "--json", str(out)], env=env, capture_output=True, text=True, timeout=400
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    even, weighted = result["runs"]
    assert even["weights"] == [1, 1] and weighted["weights"] == [3, 1]
    assert all(r["small_job_s"] > 0 and r["engine_busy"] > 0 for r in (even, weighted)), result
    assert even["pairs_served"]["a"] > 0 and even["pairs_served"]["b"] > 0, even
    assert even["both_waiting"] and weighted["both_waiting"], (even, weighted)  # the shares mean something
    assert weighted["share_a"] > even["share_a"], (even, weighted)
    assert "| 3:1 |" in run.stdout
