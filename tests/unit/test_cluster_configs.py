"""The cluster configs validate, and they name jobs and presets that exist, not hyperparameters."""

import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from ecar.presets import PRESETS

pytestmark = pytest.mark.unit

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
REPO = CLUSTER.parent

RESOURCES = {
    "type": "object",
    "properties": {"requests": {"type": "object"}, "limits": {"type": "object"}},
    "additionalProperties": False,
}
CONTAINER = {
    "type": "object",
    "required": ["name", "image", "resources"],
    "properties": {
        "name": {"type": "string"},
        "image": {"type": "string"},
        "resources": RESOURCES,
        "env": {"type": "array"},
        "ports": {"type": "array"},
    },
}
POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {"containers": {"type": "array", "minItems": 1, "items": CONTAINER}},
        }
    },
}
START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}
CLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec", "workerGroupSpecs"],
    "properties": {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "headGroupSpec": {
            "type": "object",
            "required": ["template"],
            "properties": {"rayStartParams": START_PARAMS, "template": POD_TEMPLATE},
        },
        "workerGroupSpecs": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["groupName", "template", "minReplicas", "maxReplicas"],
                "properties": {
                    "groupName": {"type": "string"},
                    "replicas": {"type": "integer", "minimum": 0},
                    "minReplicas": {"type": "integer", "minimum": 0},
                    "maxReplicas": {"type": "integer", "minimum": 1},
                    "rayStartParams": START_PARAMS,
                    "template": POD_TEMPLATE,
                },
            },
        },
    },
}
# The subset of KubeRay's ray.io/v1 CRDs that the manifests use.
SCHEMAS = {
    "RayCluster": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"const": "ray.io/v1"}, "spec": CLUSTER_SPEC},
    },
    "RayJob": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "spec": {
                "type": "object",
                "required": ["entrypoint", "rayClusterSpec"],
                "properties": {
                    "entrypoint": {"type": "string"},
                    "runtimeEnvYAML": {"type": "string"},
                    "shutdownAfterJobFinishes": {"type": "boolean"},
                    "ttlSecondsAfterFinished": {"type": "integer"},
                    "rayClusterSpec": CLUSTER_SPEC,
                },
            },
        },
    },
}


def test_cluster_launcher_config_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((CLUSTER / "aws.yaml").read_text()))
    validate_config(config)
    pools = config["available_node_types"]
    assert {"head", "cpu_pool", "gpu_pool"} <= set(pools)
    assert any("pip install" in command and "ecar" in command for command in config["setup_commands"])


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob-train.yaml"])
def test_kuberay_manifests_match_the_crd_subset(name):
    manifest = yaml.safe_load((CLUSTER / "kuberay" / name).read_text())
    jsonschema.validate(manifest, SCHEMAS[manifest["kind"]])
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]


def test_the_rayjobs_elastic_worker_bounds_are_whole_gpu_pods_and_a_valid_config():
    """The training job's --workers MIN-MAX is what the GPU pool's pod bounds hold, and the
    preset accepts it as an elastic run."""
    from jobs.train import resolve_config

    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob-train.yaml").read_text())
    spec = job["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is True
    (pool,) = [
        g
        for g in spec["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    gpus = int(pool["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    words = shlex.split(job["spec"]["entrypoint"])
    workers = words[words.index("--workers") + 1]
    assert workers == f"{pool['minReplicas'] * gpus}-{pool['maxReplicas'] * gpus}"
    train = resolve_config(words[words.index("--preset") + 1], [], None, None, workers).train
    assert 0 < train.min_workers < train.num_workers


def test_entrypoints_name_existing_jobs_and_presets_and_no_hyperparameters():
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob-train.yaml").read_text())
    words = shlex.split(job["spec"]["entrypoint"])
    module = words[words.index("-m") + 1]
    assert (REPO / (module.replace(".", "/") + ".py")).exists()
    assert words[words.index("--preset") + 1] in PRESETS
    for path in CLUSTER.rglob("*.y*ml"):
        text = path.read_text()
        assert not re.search(r"\b(train|model|flow|stages|sampling)\.\w+=", text), path
        assert not re.search(r"\b0(\.0){3}\b", text), f"{path} binds to all interfaces"


def test_the_image_build_context_leaves_out_outputs_databases_and_history():
    """cluster/Dockerfile copies the repository root: .dockerignore must keep run outputs, MLflow
    databases, git history and credentials out of the image."""
    import fnmatch
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    patterns = [
        line.strip()
        for line in (root / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(
            fnmatch.fnmatch(prefix, pattern.removeprefix("**/"))
            or fnmatch.fnmatch(prefix, pattern)
            or fnmatch.fnmatch(parts[-1], pattern.removeprefix("**/"))
            for pattern in patterns
            for prefix in prefixes
        )

    for path in [
        "outputs/headline/mlflow.db",
        "mlflow.db",
        ".git/config",
        "outputs/runs/a/export/model.safetensors",
        "ecar/__pycache__/x.pyc",
        ".aws/credentials",
        ".env",
    ]:
        assert ignored(path), path
    for path in ["ecar/models/ecar.py", "pyproject.toml", "jobs/train.py", "cluster/Dockerfile"]:
        assert not ignored(path), path
