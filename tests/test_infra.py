"""KubeRay manifests validate against the real CRDs; serveConfigV2 is our serve config and passes Ray's schema;
entrypoint modules exist and answer --help."""

from __future__ import annotations

import copy
import functools
import re
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
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@functools.cache
def crds() -> dict[str, dict]:
    """kind → the CRD, parsed once (the files are megabytes of YAML; libyaml's loader when PyYAML has it)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    parsed = (yaml.load(file.read_text(), Loader=loader) for file in sorted(CRDS.glob("*.yaml")))
    return {crd["spec"]["names"]["kind"]: crd for crd in parsed}


def crd_schema(kind: str) -> dict:
    crd = crds().get(kind)
    assert crd is not None, f"no CRD for {kind} in {CRDS}"
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return strict(version["schema"]["openAPIV3Schema"])


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
    images = {
        c["image"]
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        for c in group["template"]["spec"]["containers"]
    }
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
    run = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert run.returncode == 0, run.stderr
    flags = [a.split("=")[0] for a in entrypoint[3:] if a.startswith("--")]
    for flag in flags:
        assert flag in run.stdout, f"{path.name} passes {flag}, which `{module} --help` does not list"


def test_dockerfile_installs_from_the_lock_file():
    text = (ROOT / "infra/docker/Dockerfile").read_text()
    assert "uv sync --frozen" in text and "FROM nvidia/cuda" in text
    assert (ROOT / "uv.lock").is_file()


# ------------------------------------------------------------------------------ stopping on Kubernetes


def pod_groups(manifest: dict) -> list[tuple[str, dict]]:
    """(group name, pod spec) of the head and every worker group."""
    cluster = cluster_specs(manifest)
    return [("head", cluster["headGroupSpec"]["template"]["spec"])] + [
        (g["groupName"], g["template"]["spec"]) for g in cluster["workerGroupSpecs"]
    ]


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def serve_settings() -> tuple[dict, dict]:
    config = yaml.safe_load((ROOT / "serving/config/serve.yaml").read_text())
    return config, config["applications"][0]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_kills_a_pod_only_after_its_drain(path):
    """Every pod: Kubernetes' SIGKILL (terminationGracePeriodSeconds) comes after the preStop sleep and the node
    drain that `ray start` runs on SIGTERM (RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S); on the RayService that drain
    covers the app's drain period (serve.yaml drain_timeout_s: how long a replica Serve stops finishes its
    requests), and an old cluster outlives the switch of a rolling update by as much."""
    manifest = yaml.safe_load(path.read_text())
    _, app = serve_settings()
    drain = app["args"]["drain_timeout_s"]
    for group, pod in pod_groups(manifest):
        container = pod["containers"][0]
        node_drain = float(env_of(container)["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"])
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        sleep = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
        assert pod["terminationGracePeriodSeconds"] > sleep + node_drain, (path.name, group)
        if manifest["kind"] == "RayService":
            assert node_drain >= drain, (group, node_drain, drain)
    if manifest["kind"] == "RayService":
        assert manifest["spec"]["rayClusterDeletionDelaySeconds"] >= drain
    else:  # `ray job stop` / deleting the RayJob: SIGTERM to the driver, SIGKILL only after this (Ray's default: 3 s)
        head = pod_groups(manifest)[0][1]
        stop_wait = float(env_of(head["containers"][0])["RAY_JOB_STOP_WAIT_TIME_S"])
        assert 30 <= stop_wait < head["terminationGracePeriodSeconds"]


def test_serve_deployments_get_the_drain_period():
    """serve.yaml's drain_timeout_s is every deployment's graceful_shutdown_timeout_s."""
    from serving.app import build_app
    from serving.settings import ServeConfig

    _, app = serve_settings()
    config = ServeConfig.from_dict({**app["args"], "allow_anonymous": True})
    built = build_app(config)
    deployments = [built._bound_deployment, *[a._bound_deployment for a in built._bound_deployment.init_args[:2]]]
    for deployment in deployments:
        assert deployment._deployment_config.graceful_shutdown_timeout_s == app["args"]["drain_timeout_s"]


def test_rayservice_probes_and_pre_stop_match_the_app():
    """Worker pods (the only ones the Serve Service sends traffic to) are ready only while the raylet, the node's
    Serve proxy (it fails while its node drains) and the app's own public /healthz answer, leave the endpoints
    before draining (preStop), and are restarted only when the raylet stops answering."""
    from serving.gate import PUBLIC_PATHS
    from serving.ingress import api

    manifest = yaml.safe_load((ROOT / "infra/kuberay/rayservice.yaml").read_text())
    config, app = serve_settings()
    healthz = f"http://localhost:{config['http_options']['port']}{app['route_prefix'].rstrip('/')}/healthz"
    assert "/healthz" in api.openapi()["paths"] and "/healthz" in PUBLIC_PATHS  # the route, and no token for probes
    assert manifest["spec"]["excludeHeadPodFromServeSvc"] is True
    for group, pod in pod_groups(manifest)[1:]:
        container = pod["containers"][0]
        ready = " ".join(container["readinessProbe"]["exec"]["command"])
        alive = " ".join(container["livenessProbe"]["exec"]["command"])
        assert healthz in ready and "/-/healthz" in ready and "local_raylet_healthz" in ready, group
        assert "/healthz" not in alive.replace("raylet_healthz", ""), group  # loading models is not dead
        assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
        assert {"containerPort": config["http_options"]["port"], "name": "serve"} in container["ports"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_ray_container_has_probes_the_image_can_run(path):
    """Explicit probes everywhere: KubeRay's defaults call wget, which the image does not install (curl it does)."""
    dockerfile = (ROOT / "infra/docker/Dockerfile").read_text()
    assert re.search(r"apt-get install[^\n]*\bcurl\b", dockerfile) and "wget" not in dockerfile
    for group, pod in pod_groups(yaml.safe_load(path.read_text())):
        container = pod["containers"][0]
        for probe in ("livenessProbe", "readinessProbe"):
            command = " ".join(container[probe]["exec"]["command"])
            assert "curl" in command and "wget" not in command, (path.name, group, probe)


def test_rayservice_keeps_its_state_in_redis_when_the_head_goes():
    """GCS fault tolerance the way KubeRay >= 1.3 takes it: gcsFaultToleranceOptions with an external Redis (its
    password from a Secret), and none of the older settings KubeRay refuses beside it (the ray.io/ft-enabled
    annotation, RAY_REDIS_ADDRESS / REDIS_PASSWORD in the head's env, redis-password in rayStartParams)."""
    manifest = yaml.safe_load((ROOT / "infra/kuberay/rayservice.yaml").read_text())
    cluster = cluster_specs(manifest)
    options = cluster["gcsFaultToleranceOptions"]
    assert options["redisAddress"].startswith("redis://")
    assert options["redisPassword"]["valueFrom"]["secretKeyRef"]["key"]
    assert "ray.io/ft-enabled" not in (manifest["metadata"].get("annotations") or {})
    head = cluster["headGroupSpec"]
    assert not {"RAY_REDIS_ADDRESS", "REDIS_PASSWORD"} & set(env_of(head["template"]["spec"]["containers"][0]))
    assert "redis-password" not in head["rayStartParams"]


def test_a_typo_in_the_fault_tolerance_options_is_caught():
    manifest = yaml.safe_load((ROOT / "infra/kuberay/rayservice.yaml").read_text())
    manifest["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisAdress"] = "redis://x:6379"
    with pytest.raises(jsonschema.ValidationError, match="redisAdress"):
        jsonschema.validate(manifest, crd_schema("RayService"))


def test_rayservice_yaml_is_generated_from_the_serve_config():
    sys.path.insert(0, str(ROOT / "infra" / "kuberay"))
    try:
        import make_rayservice
    finally:
        sys.path.pop(0)
    assert (ROOT / "infra/kuberay/rayservice.yaml").read_text() == make_rayservice.render(), (
        "run python infra/kuberay/make_rayservice.py"
    )


DASHBOARD = ROOT / "infra" / "grafana" / "facediffuser.json"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def dashboard_series() -> set[str]:
    """Every metric name the Grafana dashboard's queries read."""
    import json

    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    return {name for expr in exprs for name in re.findall(r"\bray_[a-z_]+", expr)}


def _defined(name: str, known: set[str]) -> bool:
    return (
        name in known
        or any(name.endswith(s) and name[: -len(s)] in known for s in HISTOGRAM_SUFFIXES)
        or (name.endswith("_total") and name[: -len("_total")] in known)
    )


def test_the_grafana_dashboard_reads_only_series_that_exist():
    """Our series are the names serving/metrics.py and pipelines/progress_metrics.py declare; Ray Serve's are
    names Ray Serve's source declares (a renamed metric would leave an empty panel). tests/test_serve_jobs.py
    also finds the serving ones live at Ray's endpoint."""
    import ast

    ours = set()
    for path in (ROOT / "serving" / "metrics.py", ROOT / "pipelines" / "progress_metrics.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("Counter", "Gauge", "Histogram"):
                ours.add("ray_" + node.args[0].value)
    serve_source = "\n".join(p.read_text() for p in Path(__import__("ray.serve").serve.__file__).parent.rglob("*.py"))
    theirs = {"ray_" + n for n in re.findall(r'"(serve_[a-z_]+)"', serve_source)}
    theirs |= {
        "ray_" + n.replace("{protocol_name}", "http")
        for n in re.findall(r'f"(serve_[a-z_]*\{protocol_name\}[a-z_]*)"', serve_source)
    }
    series = dashboard_series()
    assert any(s.startswith("ray_facediffuser_") for s in series) and any(s.startswith("ray_serve_") for s in series)
    unknown = [s for s in sorted(series) if not _defined(s, ours | theirs)]
    assert not unknown, f"the dashboard reads series nobody exports: {unknown}"
    assert {s for s in ours if not any(_defined(d, {s}) for d in series)} == set(), "an exported series has no panel"
