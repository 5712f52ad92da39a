"""The Helm chart ``helm/dask-zarr-cache``: rendered offline with Helm's own Go SDK.

helm-python-sdk binds Helm v4's SDK (no ``helm`` binary); kubernetes-validate checks every
rendered manifest against the Kubernetes OpenAPI schemas. The last tests run the rendered
scheduler and worker commands as local processes and read data through the cache.
"""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import yaml
from dask.utils import parse_bytes
from distributed import Client

from dask_zarr_cache import cluster_stats
from tests.conftest import cached, chunk_gets, dask_processes, free_port, read_all, write_array
from tests.test_worker_faults import wait_for

if TYPE_CHECKING:
    from collections.abc import Iterator

    from dask_zarr_cache.testing import LocalS3Server

try:
    import helm_python as helm

    helm.helm_sdk_version()  # loads the bundled native library
except Exception as err:  # pragma: no cover - only where the native library cannot load
    pytest.skip(f"helm-python-sdk cannot load: {err}", allow_module_level=True)

import kubernetes_validate

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "dask-zarr-cache"
EXAMPLE = ROOT / "examples" / "kubernetes"
RELEASE = "zc"
SCHEDULER_HOST = f"{RELEASE}-dask-zarr-cache-scheduler"
KUBE_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
CACHE_VARS = (
    "DASK_ZARR_CACHE__MAX_SIZE",
    "DASK_ZARR_CACHE__DIRECTORY",
    "DASK_ZARR_CACHE__MAX_AGE_SECONDS",
    "DASK_ZARR_CACHE__INDEX_SHARDS",
    "DASK_ZARR_CACHE__FILE_MODE",
    "DASK_ZARR_CACHE__TRUSTED_PARENT",
)
UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}
UNITS |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}

NON_DEFAULT = {
    "worker": {
        "replicas": 5,
        "nthreads": 4,
        "memoryLimit": "12GiB",
        "resources": {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"memory": "16Gi"}},
    },
    "scheduler": {
        "serviceType": "LoadBalancer",
        "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"cpu": "1"}},
    },
    "cache": {
        "maxSize": "40GiB",
        "maxAgeSeconds": 3600,
        "mountPath": "/scratch/zarr",
        "indexShards": 4,
    },
    "extraEnv": [
        {"name": "AWS_REGION", "value": "eu-west-1"},
        {
            "name": "AWS_SECRET_ACCESS_KEY",
            "valueFrom": {"secretKeyRef": {"name": "s3", "key": "secret"}},
        },
    ],
    "nodeSelector": {"node.kubernetes.io/instance-type": "i4i.2xlarge"},
    "tolerations": [{"key": "dask", "operator": "Exists", "effect": "NoSchedule"}],
}


# --- helpers -----------------------------------------------------------------------------


def render(values: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], str]:
    """Render the chart: (manifests, NOTES.txt)."""
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values or {}, name=RELEASE, namespace="default")
    notes = rendered.pop(f"{CHART.name}/templates/NOTES.txt", "")
    docs = [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]
    return docs, notes


def lint_errors(values: dict[str, Any] | None = None) -> list[str]:
    """Errors (and, being strict, warnings) of ``helm lint --strict``."""
    report = helm.lint(CHART, values or {}, strict=True, namespace="default")
    assert report["total_charts_linted"] == 1
    return [m["error"] for m in report["messages"] if m["severity"] >= 2] + report["errors"]


def find(docs: list[dict[str, Any]], kind: str, component: str) -> dict[str, Any]:
    """The one manifest of ``kind`` for ``component`` (scheduler or worker)."""
    (doc,) = (
        d
        for d in docs
        if d["kind"] == kind and d["metadata"]["labels"]["app.kubernetes.io/component"] == component
    )
    return doc


def container(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    """The container of the scheduler or worker Deployment."""
    (ctr,) = find(docs, "Deployment", component)["spec"]["template"]["spec"]["containers"]
    return ctr


def env_of(ctr: dict[str, Any]) -> dict[str, Any]:
    """``{name: value or valueFrom}`` of a container's env."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in ctr.get("env", [])}


def worker_volume(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The worker pod's ``cache`` volume."""
    spec = find(docs, "Deployment", "worker")["spec"]["template"]["spec"]
    (volume,) = (v for v in spec["volumes"] if v["name"] == "cache")
    return volume


def quantity_bytes(quantity: str) -> int:
    """Bytes in a Kubernetes quantity such as ``50Gi`` (test-side reference)."""
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", quantity).groups()
    return int(float(number) * UNITS[unit])


def set_option(args: list[str], flag: str, value: str) -> list[str]:
    """Replace the value after ``flag`` in a command line, or append ``flag value``."""
    if flag in args:
        i = args.index(flag)
        return [*args[: i + 1], value, *args[i + 2 :]]
    return [*args, flag, value]


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion of container args."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


# --- rendering, lint and schema ----------------------------------------------------------


def test_chart_metadata() -> None:
    with helm.Chart.load(CHART) as chart:
        meta = chart.metadata
        assert chart.schema is not None
    assert meta["apiVersion"] == "v2"
    assert (meta["name"], meta["version"], meta["appVersion"]) == (CHART.name, "0.1.0", "0.1.0")
    assert meta["description"]


VALUE_SETS = {
    "default": {},
    "non-default": NON_DEFAULT,
    "hostPath": {"cache": {"volume": {"type": "hostPath", "hostPath": {"path": "/mnt/nvme"}}}},
    "ephemeral": {
        "cache": {
            "size": "100Gi",
            "maxAgeSeconds": 86400,
            "volume": {"type": "ephemeral", "ephemeral": {"storageClassName": "local-nvme"}},
        }
    },
    "example": yaml.safe_load((EXAMPLE / "values.yaml").read_text()),
}


@pytest.mark.parametrize("name", VALUE_SETS)
def test_renders_lints_and_validates(name: str) -> None:
    values = VALUE_SETS[name]
    assert lint_errors(values) == []
    docs, notes = render(values)
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert kinds == [
        ("Deployment", f"{SCHEDULER_HOST}"),
        ("Deployment", f"{RELEASE}-dask-zarr-cache-worker"),
        ("Service", f"{SCHEDULER_HOST}"),
    ]
    for doc in docs:
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    assert "/individual-zarr-cache" in notes
    assert f"port-forward svc/{SCHEDULER_HOST} 8786 8787" in notes
    assert 'Client("tcp://localhost:8786")' in notes
    assert "dask-zarr-cache stats --scheduler tcp://localhost:8786" in notes


def test_default_render() -> None:
    docs, _ = render()
    service = find(docs, "Service", "scheduler")
    assert service["spec"]["type"] == "ClusterIP"
    assert {p["port"] for p in service["spec"]["ports"]} == {8786, 8787}
    scheduler, worker = container(docs, "scheduler"), container(docs, "worker")
    args = scheduler.get("command", []) + scheduler["args"]
    assert args[:2] == ["dask", "scheduler"]
    assert args[args.index("--preload") + 1] == "dask_zarr_cache.preload"
    args = worker.get("command", []) + worker["args"]
    assert args[:3] == ["dask", "worker", f"tcp://{SCHEDULER_HOST}:8786"]
    assert args[args.index("--preload") + 1] == "dask_zarr_cache.preload"
    assert args[args.index("--name") + 1] == "$(POD_NAME)"
    assert args[args.index("--nthreads") + 1] == "2"
    assert args[args.index("--memory-limit") + 1] == "auto"
    assert "--dashboard-address" in args
    env = env_of(worker)
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["DASK_ZARR_CACHE__DIRECTORY"] == "/cache"
    assert "DASK_ZARR_CACHE__MAX_AGE_SECONDS" not in env  # no TTL unless asked
    assert env["DASK_ZARR_CACHE__INDEX_SHARDS"] == "1"
    assert env["DASK_ZARR_CACHE__FILE_MODE"] == "0600"  # private chunks by default
    assert env["DASK_ZARR_CACHE__TRUSTED_PARENT"] == "true"  # an emptyDir is the pod's own
    assert "securityContext" not in find(docs, "Deployment", "worker")["spec"]["template"]["spec"]
    assert parse_bytes(env["DASK_ZARR_CACHE__MAX_SIZE"]) == math.floor(50 * 2**30 * 0.9)
    # $(POD_NAME) in args only expands if POD_NAME is defined before use.
    assert worker["env"][0]["name"] == "POD_NAME"
    # The scheduler's preload registers the plugin with the scheduler's environment.
    assert {k: v for k, v in env_of(scheduler).items() if k != "POD_NAME"} == {
        k: v for k, v in env.items() if k != "POD_NAME"
    }
    assert worker["volumeMounts"] == [{"name": "cache", "mountPath": "/cache"}]
    assert worker_volume(docs) == {"name": "cache", "emptyDir": {"sizeLimit": "50Gi"}}
    assert find(docs, "Deployment", "worker")["spec"]["replicas"] == 2


def test_non_default_render() -> None:
    docs, notes = render(NON_DEFAULT)
    worker_deploy = find(docs, "Deployment", "worker")
    assert worker_deploy["spec"]["replicas"] == 5
    scheduler, worker = container(docs, "scheduler"), container(docs, "worker")
    assert worker["resources"] == NON_DEFAULT["worker"]["resources"]
    # Helm merges maps with the defaults: the default memory limit stays.
    assert scheduler["resources"] == {
        "requests": {"cpu": "250m", "memory": "512Mi"},
        "limits": {"cpu": "1", "memory": "2Gi"},
    }
    assert find(docs, "Service", "scheduler")["spec"]["type"] == "LoadBalancer"
    args = worker["args"]
    assert args[args.index("--nthreads") + 1] == "4"
    assert args[args.index("--memory-limit") + 1] == "12GiB"
    for ctr in (scheduler, worker):
        env = env_of(ctr)
        assert env["DASK_ZARR_CACHE__MAX_SIZE"] == "40GiB"  # explicit maxSize wins
        assert float(env["DASK_ZARR_CACHE__MAX_AGE_SECONDS"]) == 3600
        assert env["DASK_ZARR_CACHE__DIRECTORY"] == "/scratch/zarr"
        assert env["DASK_ZARR_CACHE__INDEX_SHARDS"] == "4"
        assert env["AWS_REGION"] == "eu-west-1"
        assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "s3", "key": "secret"}}
    assert worker["volumeMounts"] == [{"name": "cache", "mountPath": "/scratch/zarr"}]
    for component in ("scheduler", "worker"):
        pod = find(docs, "Deployment", component)["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == NON_DEFAULT["nodeSelector"]
        assert pod["tolerations"] == NON_DEFAULT["tolerations"]
    assert "40GiB" in notes


def test_host_path_volume() -> None:
    docs, _ = render(VALUE_SETS["hostPath"])
    assert worker_volume(docs) == {
        "name": "cache",
        "hostPath": {"path": "/mnt/nvme", "type": "DirectoryOrCreate"},
    }
    assert container(docs, "worker")["volumeMounts"] == [{"name": "cache", "mountPath": "/cache"}]
    # A node's directory other pods may share: its parent is not trusted by default.
    assert env_of(container(docs, "worker"))["DASK_ZARR_CACHE__TRUSTED_PARENT"] == "false"


def test_shared_node_settings_render() -> None:
    values = {
        "cache": {"fileMode": "0640", "trustedParent": False},
        "worker": {"podSecurityContext": {"runAsUser": 1000, "fsGroup": 2000}},
    }
    docs, _ = render(values)
    env = env_of(container(docs, "worker"))
    assert env["DASK_ZARR_CACHE__FILE_MODE"] == "0640"
    assert env["DASK_ZARR_CACHE__TRUSTED_PARENT"] == "false"
    pod = find(docs, "Deployment", "worker")["spec"]["template"]["spec"]
    assert pod["securityContext"] == {"runAsUser": 1000, "fsGroup": 2000}


def test_ephemeral_volume() -> None:
    docs, _ = render(VALUE_SETS["ephemeral"])
    claim = worker_volume(docs)["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim["storageClassName"] == "local-nvme"
    assert claim["accessModes"] == ["ReadWriteOnce"]
    assert claim["resources"] == {"requests": {"storage": "100Gi"}}
    env = env_of(container(docs, "worker"))
    assert parse_bytes(env["DASK_ZARR_CACHE__MAX_SIZE"]) == math.floor(100 * 2**30 * 0.9)
    assert env["DASK_ZARR_CACHE__MAX_AGE_SECONDS"] == "86400"
    # Without a storage class the cluster default is used: the key is left out.
    docs, _ = render({"cache": {"volume": {"type": "ephemeral"}}})
    assert "storageClassName" not in worker_volume(docs)["ephemeral"]["volumeClaimTemplate"]["spec"]


@pytest.mark.parametrize(
    ("size", "fraction"),
    [("50Gi", 0.9), ("500Mi", 0.9), ("1Ti", 0.9), ("100G", 0.9), ("64Mi", 0.5), ("1.5Gi", 1)],
)
def test_max_size_derived_from_volume_size(size: str, fraction: float) -> None:
    docs, _ = render({"cache": {"size": size, "fillFraction": fraction}})
    rendered = env_of(container(docs, "worker"))["DASK_ZARR_CACHE__MAX_SIZE"]
    expected = math.floor(quantity_bytes(size) * fraction)
    assert abs(parse_bytes(rendered) - expected) <= 2**20
    assert parse_bytes(rendered) <= expected  # never above the volume's share


@pytest.mark.parametrize(
    "values",
    [
        {"cache": {"volume": {"type": "nfs"}}},
        {"cache": {"size": "lots"}},
        {"cache": {"fillFraction": 1.5}},
        {"cache": {"maxAgeSeconds": -1}},
        {"cache": {"indexShards": 0}},
        {"cache": {"fileMode": "0777x"}},
        {"cache": {"trustedParent": "yes"}},
        {"worker": {"replicas": "three"}},
        {"scheduler": {"serviceType": "Ingress"}},
        {"unknownTopLevel": True},
    ],
)
def test_schema_rejects_bad_values(values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError, match="schema"):
        render(values)
    assert lint_errors(values)


def test_schema_rejects_unknown_volume_type_by_name() -> None:
    with pytest.raises(helm.HelmValuesError) as info:
        render({"cache": {"volume": {"type": "nfs"}}})
    assert "/cache/volume/type" in str(info.value)


def test_every_value_is_documented() -> None:
    """Every leaf key in values.yaml has a comment directly above it (or its block)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "- ")) or ":" not in stripped:
            continue
        key, _, rest = stripped.partition(":")
        if rest.strip() == "" and i + 1 < len(lines) and lines[i + 1].strip().startswith("-"):
            pass  # a list: documented like a leaf
        elif rest.strip() == "":
            continue  # a mapping whose children are documented
        above = lines[i - 1].strip() if i else ""
        if above.startswith("- "):
            continue  # a later key of a list item (e.g. an env entry's value)
        in_default_block = line.startswith(" " * 4) and any(
            lines[j].strip() in ("resources:", "requests:", "limits:") for j in range(i - 3, i)
        )
        assert above.startswith("#") or in_default_block, f"values.yaml: {key} is undocumented"


# --- the rendered commands, run locally --------------------------------------------------


def local_commands(
    docs: list[dict[str, Any]], port: int, cache_dir: Path, n_workers: int
) -> tuple[list[str], list[list[str]], dict[str, str]]:
    """The rendered scheduler/worker commands and env, moved onto 127.0.0.1 and a tmp dir."""
    scheduler, worker = container(docs, "scheduler"), container(docs, "worker")
    env = {k: v for k, v in env_of(worker).items() if isinstance(v, str)}
    assert {k: v for k, v in env_of(scheduler).items() if isinstance(v, str)} == env
    env["DASK_ZARR_CACHE__DIRECTORY"] = str(cache_dir)

    sched = scheduler.get("command", []) + scheduler["args"]
    sched = set_option(sched, "--port", str(port))
    sched = set_option(sched, "--dashboard-address", f"127.0.0.1:{free_port()}")
    sched = set_option(sched, "--host", "127.0.0.1")

    workers = []
    for n in range(n_workers):
        pod_env = {**env, "POD_NAME": f"{RELEASE}-dask-zarr-cache-worker-{n}"}
        args = [expand(a, pod_env) for a in worker.get("command", []) + worker["args"]]
        args = [a.replace(f"tcp://{SCHEDULER_HOST}:8786", f"tcp://127.0.0.1:{port}") for a in args]
        args = set_option(args, "--dashboard-address", f"127.0.0.1:{free_port()}")
        workers.append(set_option(args, "--host", "127.0.0.1"))
    return sched, workers, env


@pytest.fixture(scope="module")
def rendered_cluster(
    s3: LocalS3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Client, int, Path]]:
    """A 2-worker cluster run from the chart's rendered commands: (client, port, cache dir)."""
    docs, _ = render({"cache": {"size": "64Mi"}, "extraEnv": []})
    port, cache_dir = free_port(), tmp_path_factory.mktemp("helm") / "cache"
    scheduler, workers, env = local_commands(docs, port, cache_dir, n_workers=2)
    assert all("dask_zarr_cache.preload" in cmd for cmd in [scheduler, *workers])
    with (
        dask_processes(scheduler, workers, env),
        Client(f"tcp://127.0.0.1:{port}") as client,
    ):
        client.wait_for_workers(2, timeout=60)
        wait_for(lambda: len(cluster_stats(client)["workers"]) == 2, timeout=30)
        yield client, port, cache_dir


def test_rendered_commands_run_a_caching_cluster(rendered_cluster, s3, s3_path) -> None:
    client, _, cache_dir = rendered_cluster
    budget = math.floor(64 * 2**20 * 0.9)
    stats = cluster_stats(client)
    assert len(stats["workers"]) == 2
    assert {w["capacity"] for w in stats["workers"].values()} == {budget}
    names = {info["name"] for info in client.scheduler_info()["workers"].values()}
    assert names == {f"{RELEASE}-dask-zarr-cache-worker-{n}" for n in range(2)}

    data = np.random.default_rng(7).random((64, 64))
    write_array(s3, s3_path, data, chunks=(16, 16))
    s3.reset_counts()
    for _ in range(3):
        np.testing.assert_array_equal(read_all(cached(s3, s3_path), client), data)
    gets = chunk_gets(s3, s3_path)
    assert len(gets) == 16
    assert set(gets.values()) == {1}
    assert cache_dir.is_dir()


def load_example_client():
    """``examples/kubernetes/client.py`` as a module."""
    spec = importlib.util.spec_from_file_location("k8s_example_client", EXAMPLE / "client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_client_against_rendered_cluster(rendered_cluster, s3, s3_path, capsys) -> None:
    _, port, _ = rendered_cluster
    data = np.arange(48 * 48, dtype="f8").reshape(48, 48)
    write_array(s3, s3_path, data, chunks=(16, 16))
    s3.reset_counts()
    options = s3.storage_options
    argv = ["--scheduler", f"tcp://127.0.0.1:{port}", "--url", f"s3://{s3_path}", "--passes", "3"]
    for key in ("endpoint_url", "key", "secret"):
        argv += ["--storage-option", f"{key}={options[key]}"]
    assert load_example_client().main(argv) == 0
    out = capsys.readouterr().out
    sums = re.findall(r"pass \d+: sum=(\S+) in", out)
    assert len(sums) == 3
    assert all(float(s.removeprefix("np.float64(").rstrip(")")) == data.sum() for s in sums)
    assert "cache:" in out
    gets = chunk_gets(s3, s3_path)
    assert len(gets) == 9
    assert set(gets.values()) == {1}


def test_example_values_file() -> None:
    docs, _ = render(VALUE_SETS["example"])
    assert find(docs, "Deployment", "worker")["spec"]["replicas"] == 4
    claim = worker_volume(docs)["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim["resources"]["requests"]["storage"] == "100Gi"
    env = env_of(container(docs, "worker"))
    assert env["DASK_ZARR_CACHE__MAX_AGE_SECONDS"] == "86400"
    assert parse_bytes(env["DASK_ZARR_CACHE__MAX_SIZE"]) == math.floor(100 * 2**30 * 0.9)
