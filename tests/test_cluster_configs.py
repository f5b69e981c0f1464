"""The deployment files under cluster/ are checked offline, without a Ray runtime or a cloud.

Launcher YAMLs go through Ray's own checks: jsonschema against the installed
``ray/autoscaler/ray-schema.json``, then ``prepare_config`` (merges the provider's defaults.yaml,
no cloud calls) and ``validate_config`` (node-type references, min/max workers). Neither looks
inside ``provider`` or ``node_config`` (RAY-NOTES), so those are checked here by hand. The KubeRay
RayJob is checked for the fields the operator needs; no CRD schema is installed here.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

ray = pytest.importorskip("ray")
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

from diet_ray import ray_runtime  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER_FILES = ["aws-gpu.yaml", "gcp-gpu.yaml"]
RAYJOB = CLUSTER / "kuberay-rayjob.yaml"
IMAGE_RE = re.compile(r"^rayproject/ray:(?P<version>\d+\.\d+\.\d+)-py311-(?P<flavor>cpu|gpu|cu\d+)$")


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _ray_validate(raw: dict) -> dict:
    """Ray's own offline validation; returns the prepared config."""
    jsonschema.validate(raw, _ray_schema())
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return prepared


def _pyproject_ray_pin() -> tuple:
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'"ray\[[^\]]*\]>=(\d+)\.(\d+),<(\d+)\.(\d+)"', text)
    assert m, "pyproject.toml no longer pins ray as ray[...]>=X.Y,<X.Z"
    return (int(m.group(1)), int(m.group(2))), (int(m.group(3)), int(m.group(4)))


def _minor(version: str) -> tuple:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


# ------------------------------------------------------------------------- launcher YAMLs


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_yaml_passes_rays_schema_and_validation(name):
    raw = _load(name)
    prepared = _ray_validate(raw)
    types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    assert head in types
    # prepare_config fills the head's max_workers with 0 and keeps ours for the workers.
    assert types[head]["max_workers"] == 0
    workers = {k: v for k, v in types.items() if k != head}
    assert len(workers) >= 2
    assert sum(v["min_workers"] for v in workers.values()) <= prepared["max_workers"]
    for node in workers.values():
        assert 0 <= node["min_workers"] <= node["max_workers"] <= prepared["max_workers"]


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_yaml_cpu_head_and_gpu_workers(name):
    raw = _load(name)
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"]["CPU"] >= 4
    for key, node in types.items():
        if key == raw["head_node_type"]:
            continue
        assert node["resources"]["GPU"] >= 1, key
        assert "docker" not in node or "worker_image" not in node["docker"], key
    docker = raw["docker"]
    assert IMAGE_RE.match(docker["head_image"]).group("flavor") == "cpu"
    assert IMAGE_RE.match(docker["worker_image"]).group("flavor") != "cpu"


def test_aws_node_configs():
    raw = _load("aws-gpu.yaml")
    assert raw["provider"]["type"] == "aws"
    types = raw["available_node_types"]
    head = raw["head_node_type"]
    gpu_instances = {types[k]["node_config"]["InstanceType"] for k in types if k != head}
    assert all(t.split(".")[0] in {"g4dn", "g5", "g6", "g6e", "p3", "p4d", "p5"} for t in gpu_instances)
    for key, node in types.items():
        assert node["node_config"]["ImageId"], key
        # Every node needs S3 access; Ray would give only the head a (broad) default profile.
        assert node["node_config"]["IamInstanceProfile"]["Name"], key


def test_gcp_node_configs():
    raw = _load("gcp-gpu.yaml")
    assert raw["provider"]["type"] == "gcp"
    assert raw["provider"]["project_id"]
    types = raw["available_node_types"]
    for key, node in types.items():
        if key == raw["head_node_type"]:
            continue
        cfg = node["node_config"]
        # GPU VMs cannot live-migrate: GCE refuses them without TERMINATE.
        assert cfg["scheduling"]["onHostMaintenance"] == "TERMINATE", key
        has_gpu = cfg["machineType"].startswith(("g2-", "a2-", "a3-")) or cfg.get("guestAccelerators")
        assert has_gpu, key
        for acc in cfg.get("guestAccelerators", []):
            assert acc["acceleratorType"].startswith("nvidia-") and acc["acceleratorCount"] >= 1


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_ray_version_matches_installed_and_pyproject(name):
    raw = _load(name)
    lo, hi = _pyproject_ray_pin()
    installed = _minor(ray.__version__)
    assert lo <= installed < hi, f"installed ray {ray.__version__} outside pyproject's pin"
    for key in ("head_image", "worker_image"):
        m = IMAGE_RE.match(raw["docker"][key])
        assert m, raw["docker"][key]
        assert m.group("version") == ray.__version__, (key, m.group("version"), ray.__version__)
        assert lo <= _minor(m.group("version")) < hi


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_setup_installs_pinned_torch_and_diet_ray(name):
    raw = _load(name)
    setup = " ; ".join(raw["setup_commands"])
    assert '"torch==2.13.0"' in setup
    assert "~/diet_ray" in setup and raw["file_mounts"]["~/diet_ray"] == "."
    # No CPU-only index on GPU nodes: the default index brings the CUDA build.
    assert "download.pytorch.org/whl/cpu" not in setup
    assert "boto3==1.43.117" in setup


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_dashboard_private_and_token_auth(name):
    raw = _load(name)
    head_start = " ".join(raw["head_start_ray_commands"])
    worker_start = " ".join(raw["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start
    for cmds in (head_start, worker_start):
        assert "RAY_AUTH_MODE=token" in cmds
    # The token reaches every node at Ray's default token path.
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


@pytest.mark.parametrize(
    "breakage",
    ["unknown_top_level_key", "wrong_head_type", "unknown_node_type_key", "min_over_max", "string_resource"],
)
@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_broken_launcher_copies_fail_validation(name, breakage):
    broken = _load(name)
    worker = next(k for k in broken["available_node_types"] if k != broken["head_node_type"])
    if breakage == "unknown_top_level_key":
        broken["availble_node_types"] = broken.pop("available_node_types")
    elif breakage == "wrong_head_type":
        broken["head_node_type"] = "no_such_node_type"
    elif breakage == "unknown_node_type_key":
        broken["available_node_types"][worker]["min_worker"] = 1
    elif breakage == "min_over_max":
        for node in broken["available_node_types"].values():
            node["min_workers"] = broken["max_workers"]
    elif breakage == "string_resource":
        broken["available_node_types"][worker]["resources"]["GPU"] = "1"
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _ray_validate(broken)


# ---------------------------------------------------------------------------- KubeRay RayJob


def _rayjob() -> dict:
    return yaml.safe_load(RAYJOB.read_text())


def _containers(spec: dict) -> list:
    return spec["template"]["spec"]["containers"]


def test_rayjob_required_fields():
    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])
    spec = job["spec"]
    assert spec["entrypoint"].split()[:2] == ["diet-ray", "run"]
    assert "ray.address=auto" in spec["entrypoint"].split()
    assert any(a.startswith("run.dir=s3://") for a in spec["entrypoint"].split())
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert _containers(head)[0]["image"].endswith("-cpu")
    assert any(p["containerPort"] == 8265 for p in _containers(head)[0]["ports"])


def test_rayjob_entrypoint_config_exists_in_repo():
    args = _rayjob()["spec"]["entrypoint"].split()
    config = args[args.index("-c") + 1]
    assert (ROOT / config).is_file(), config


def test_rayjob_gpu_worker_group():
    cluster = _rayjob()["spec"]["rayClusterSpec"]
    groups = cluster["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        worker = _containers(group)[0]
        assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert IMAGE_RE.match(worker["image"]).group("flavor") != "cpu"


def test_rayjob_ray_version_matches_images_and_installed():
    cluster = _rayjob()["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    images = [c["image"] for c in _containers(cluster["headGroupSpec"])]
    images += [c["image"] for g in cluster["workerGroupSpecs"] for c in _containers(g)]
    for image in images:
        m = IMAGE_RE.match(image)
        assert m and m.group("version") == cluster["rayVersion"], image


def test_rayjob_runtime_env_parses_and_avoids_driver_env_conflicts():
    spec = _rayjob()["spec"]
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(env, dict)
    assert env["working_dir"].startswith(("https://", "s3://", "gs://"))
    packages = env["pip"]["packages"] if isinstance(env["pip"], dict) else env["pip"]
    assert "torch==2.13.0" in packages
    assert any(p.startswith("diet_ray") for p in packages)
    # Ray refuses to merge a job runtime env and init_ray's runtime env that set the same
    # variable (checked for real with a local head, see cluster/README.md).
    forwarded = set(ray_runtime._ENV) | {"AWS_ENDPOINT_URL", "DIET_RAY_S3_ENDPOINT", "DIET_RAY_FAULT"}
    assert not forwarded & set(env.get("env_vars", {}))
    assert not any(k.startswith("AWS_") for k in env.get("env_vars", {}))


def test_rayjob_aws_credentials_come_from_a_secret():
    cluster = _rayjob()["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        env = {e["name"]: e for e in _containers(group)[0]["env"]}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "value" not in env[name], name
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref["name"] and ref["key"] == name


# Access key ids (AKIA/ASIA + 16), 40-char secret values assigned to a secret key name.
_ACCESS_KEY_RE = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
_SECRET_VALUE_RE = re.compile(
    r"(aws_secret_access_key|AWS_SECRET_ACCESS_KEY)\s*[:=]\s*[\"']?[A-Za-z0-9/+]{40}\b"
)


@pytest.mark.parametrize("path", sorted(p.name for p in CLUSTER.glob("*") if p.is_file()))
def test_no_literal_credentials_in_cluster_files(path):
    text = (CLUSTER / path).read_text()
    assert not _ACCESS_KEY_RE.search(text), path
    assert not _SECRET_VALUE_RE.search(text), path


def test_credential_scan_would_catch_a_leak():
    leaked = "env:\n  AWS_SECRET_ACCESS_KEY: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n  id: AKIAIOSFODNN7EXAMPLE\n"
    assert _ACCESS_KEY_RE.search(leaked)
    assert _SECRET_VALUE_RE.search(leaked)


def test_readme_covers_every_placeholder():
    readme = (CLUSTER / "README.md").read_text()
    texts = [(CLUSTER / n).read_text() for n in LAUNCHER_FILES] + [RAYJOB.read_text()]
    placeholders = set()
    for text in texts:
        placeholders |= set(re.findall(r"\b(SET_[A-Z_]+|YOUR_[A-Z]+|BUCKET)\b", text))
    assert placeholders
    for placeholder in placeholders:
        assert placeholder in readme, placeholder
