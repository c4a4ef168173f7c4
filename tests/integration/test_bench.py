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
