"""Deployment files: docker-compose.yml against the Compose Specification, the Kubernetes manifests against the
Kubernetes schemas (KEDA's CRD by structure), and the Grafana dashboard against the metrics the code defines."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from prometheus_client import REGISTRY

import schemas.metrics  # noqa: F401  # registers the farm's metrics
from schemas import keys
from schemas.settings import public_name

ROOT = Path(__file__).parents[2]
K8S = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))


def _docs() -> list[dict]:
    return [d for path in K8S for d in yaml.safe_load_all(path.read_text()) if d]


def test_compose_file_is_valid_compose_with_the_farms_services() -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(ROOT / "docker-compose.yml"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "api", "flower", "worker", "webhooks"} <= set(services)
    assert "--appendonly" in services["redis"]["command"]
    assert _option(services["redis"]["command"], "--maxmemory-policy") == "noeviction"
    assert _option(services["redis"]["command"], "--maxmemory")
    [device] = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["device_ids"] == ["0"] and device["capabilities"] == ["gpu"]
    for name in ("api", "worker", "flower", "webhooks"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert all("healthcheck" in services[n] for n in ("redis", "api", "flower", "worker"))


def _option(args: list[str], name: str) -> str | None:
    """The value after `name` in a redis-server command line."""
    return args[args.index(name) + 1] if name in args else None


def test_api_image_has_no_torch_or_vllm() -> None:
    lines = (ROOT / "deploy" / "Dockerfile.api").read_text().splitlines()
    instructions = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    assert "pip install" in instructions
    assert "[gpu]" not in instructions and "[cpu]" not in instructions and "torch" not in instructions


@pytest.mark.parametrize("doc", [d for d in _docs() if d["kind"] != "ScaledObject"], ids=lambda d: d["kind"])
def test_kubernetes_manifests_are_schema_valid(doc: dict) -> None:
    kubernetes_validate.validate(doc, "1.30", strict=True)


def test_workers_take_one_gpu_each_and_keda_scales_each_model_on_its_queues() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _docs()}
    config = docs[("ConfigMap", "rerankfarm-config")]["data"]
    served = {}
    for (kind, name), worker in docs.items():
        if kind != "Deployment" or not name.startswith("rerankfarm-worker"):
            continue
        [container] = worker["spec"]["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        served[name] = public_name(env.get("RERANK_MODEL", config["RERANK_MODEL"]))
    assert served == {
        "rerankfarm-worker": "qwen3-reranker-0.6b",
        "rerankfarm-worker-bge-reranker-v2-m3": "bge-reranker-v2-m3",
    }
    for name, model in served.items():  # each model's workers scale on the work waiting for that model
        scaled = docs[("ScaledObject", name)]
        assert scaled["apiVersion"] == "keda.sh/v1alpha1"
        assert scaled["spec"]["scaleTargetRef"]["name"] == name
        queries = [t["metadata"]["query"] for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"]
        assert len(queries) == len(scaled["spec"]["triggers"]) == 2
        bulk, interactive = queries
        # bulk work waits mostly in the backlog (the broker lists hold RERANK_LANE_DEPTH chunks): both are counted
        assert f'rerank_backlog_chunks{{model="{model}"}}' in bulk
        assert f'rerank_queue_depth{{model="{model}",queue="{keys.bulk_queue(model)}"}}' in bulk
        assert f'rerank_queue_depth{{model="{model}",queue="{keys.interactive_queue(model)}"}}' in interactive
        assert set(re.findall(r"rerank_[a-z_]+", bulk + interactive)) <= exported_metrics()
    assert ("StatefulSet", "rerankfarm-redis") in docs and ("Deployment", "rerankfarm-flower") in docs
    redis_args = docs[("StatefulSet", "rerankfarm-redis")]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--appendonly" in redis_args
    assert _option(redis_args, "--maxmemory-policy") == "noeviction"
    assert _option(redis_args, "--maxmemory") == "3gb"  # under the container's 4Gi limit


def exported_metrics() -> set[str]:
    """The series names of every rerank_ metric the farm defines (counters' _total, histograms' parts)."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    return {f.name + suffix for f in REGISTRY.collect() if f.name.startswith("rerank_") for suffix in suffixes[f.type]}


def test_dashboard_uses_only_metrics_the_farm_exports() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "rerankfarm-dashboard.json").read_text())
    exported = exported_metrics()
    used = {m for p in dashboard["panels"] for t in p["targets"] for m in re.findall(r"rerank_[a-z_]+", t["expr"])}
    assert used <= exported, used - exported
    assert len(used) >= 12
    assert {"rerank_redis_memory_used_bytes", "rerank_redis_memory_max_bytes"} <= used
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yaml").read_text())
    alerting = {m for g in rules["groups"] for r in g["rules"] for m in re.findall(r"rerank_[a-z_]+", r["expr"])}
    assert alerting and alerting <= exported, alerting - exported


def test_compose_override_gives_each_gpu_its_own_worker(tmp_path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "rerankfarm.cli", "compose-gpus", "--gpus", "4"],
        capture_output=True,
        text=True,
        check=True,
    )
    override = tmp_path / "compose.gpus.yml"
    override.write_text(run.stdout)
    check = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(override)],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout
    services = yaml.safe_load(run.stdout)["services"]
    devices = [s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for s in services.values()]
    assert devices == [["1"], ["2"], ["3"]]  # GPU 0 is docker-compose.yml's own worker
    assert list(services) == ["worker-gpu1", "worker-gpu2", "worker-gpu3"]
    assert all(s["extends"] == {"file": "docker-compose.yml", "service": "worker"} for s in services.values())


@pytest.mark.parametrize("dockerfile", ["Dockerfile.api", "Dockerfile.worker"])
def test_images_copy_every_package_the_project_installs(dockerfile: str) -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    text = (ROOT / "deploy" / dockerfile).read_text()
    assert {p for p in packages if f"COPY {p} {p}" not in text} == set()
