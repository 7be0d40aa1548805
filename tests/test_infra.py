"""KubeRay manifests validate against the real CRDs; serveConfigV2 is our serve config and passes Ray's schema;
entrypoint modules exist and answer --help."""

from __future__ import annotations

import copy
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT.parent / "shared" / "kuberay-crds"  # shared/ sits beside the checkout, in CI too
MANIFESTS = sorted((ROOT / "infra" / "kuberay").glob("*.yaml"))
RAY_VERSION = __import__("ray").__version__


def strict(schema: dict) -> dict:
    """Forbid fields the CRD does not define (Kubernetes would silently prune them: a typo would vanish)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def crd_schema(kind: str) -> dict:
    for file in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(file.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
            return strict(version["schema"]["openAPIV3Schema"])
    raise AssertionError(f"no CRD for {kind} in {CRDS}")


def cluster_specs(manifest: dict) -> dict:
    spec = manifest["spec"]
    return spec.get("rayClusterSpec") or spec["rayClusterConfig"]


def test_there_are_manifests_for_every_job():
    kinds = sorted((m.name, yaml.safe_load(m.read_text())["kind"]) for m in MANIFESTS)
    assert ("rayjob-preprocess.yaml", "RayJob") in kinds and ("rayjob-train.yaml", "RayJob") in kinds
    assert ("rayservice.yaml", "RayService") in kinds


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_the_crd(path):
    manifest = yaml.safe_load(path.read_text())
    assert manifest["apiVersion"] == "ray.io/v1"
    jsonschema.validate(manifest, crd_schema(manifest["kind"]), cls=jsonschema.Draft7Validator)
    cluster = cluster_specs(manifest)
    assert cluster["rayVersion"] == RAY_VERSION
    assert cluster["enableInTreeAutoscaling"] is True
    images = {c["image"] for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
              for c in group["template"]["spec"]["containers"]}
    assert len(images) == 1 and images.pop().endswith("/facediffuser:0.1.0")


def test_a_typo_in_a_manifest_is_caught():
    manifest = yaml.safe_load((ROOT / "infra/kuberay/rayjob-train.yaml").read_text())
    manifest["spec"]["rayClusterSpec"]["enableInTreeAutoscalling"] = True
    with pytest.raises(jsonschema.ValidationError, match="enableInTreeAutoscalling"):
        jsonschema.validate(manifest, crd_schema("RayJob"))


def test_gpu_workers_request_gpus():
    manifest = yaml.safe_load((ROOT / "infra/kuberay/rayjob-train.yaml").read_text())
    groups = {g["groupName"]: g for g in manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == "1"
    assert "--use-gpu" in manifest["spec"]["entrypoint"]


def test_rayservice_embeds_our_serve_config_and_ray_accepts_it():
    from ray.serve.schema import ServeDeploySchema

    service = yaml.safe_load((ROOT / "infra/kuberay/rayservice.yaml").read_text())
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    ours = yaml.safe_load((ROOT / "serving/config/serve.yaml").read_text())
    assert embedded == ours, "infra/kuberay/rayservice.yaml must embed serving/config/serve.yaml unchanged"
    ServeDeploySchema.model_validate(embedded)
    for app in embedded["applications"]:
        module, _, attr = app["import_path"].partition(":")
        imported = __import__(module, fromlist=[attr])
        assert callable(getattr(imported, attr))


def test_ray_rejects_a_broken_serve_config():
    from ray.serve.schema import ServeDeploySchema

    ours = yaml.safe_load((ROOT / "serving/config/serve.yaml").read_text())
    del ours["applications"][0]["import_path"]
    with pytest.raises(Exception, match="import_path"):
        ServeDeploySchema.model_validate(ours)


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in MANIFESTS if "rayjob" in p.name], ids=lambda p: p.name)
def test_entrypoints_exist_and_answer_help(path):
    entrypoint = shlex.split(yaml.safe_load(path.read_text())["spec"]["entrypoint"])
    assert entrypoint[:2] == ["python", "-m"]
    module = entrypoint[2]
    run = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    flags = [a.split("=")[0] for a in entrypoint[3:] if a.startswith("--")]
    for flag in flags:
        assert flag in run.stdout, f"{path.name} passes {flag}, which `{module} --help` does not list"


def test_dockerfile_installs_from_the_lock_file():
    text = (ROOT / "infra/docker/Dockerfile").read_text()
    assert "uv sync --frozen" in text and "FROM nvidia/cuda" in text
    assert (ROOT / "uv.lock").is_file()
