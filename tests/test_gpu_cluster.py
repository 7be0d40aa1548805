"""Logical GPUs on a multi-node cluster on this machine (cluster/local.py, tests/cluster_fixtures.py), and
the rule for GPUs torch cannot see (facediffuser/devices.py): fail at once with one line naming the node, unless
FACEDIFFUSER_CPU_UNDER_GPU=1 (rehearsals) runs CPU kernels there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cluster_fixtures import submit

from facediffuser import devices

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# ------------------------------------------------------------------------------- the rule, without Ray


def test_a_gpu_torch_cannot_see_is_one_line_naming_the_node(monkeypatch):
    monkeypatch.delenv(devices.CPU_UNDER_GPU_ENV, raising=False)
    monkeypatch.setattr(devices, "cuda_visible", lambda: False)
    assert devices.torch_device(0, "node n1 (host h)") == "cpu"
    with pytest.raises(devices.GPUNotVisible) as error:
        devices.torch_device(1, "node n1 (host h)")
    message = str(error.value)
    assert "\n" not in message and message.startswith(devices.NO_GPU_MARK) and "node n1 (host h)" in message
    assert devices.CPU_UNDER_GPU_ENV in message  # says what the way out is (and that it is for rehearsals)
    assert devices.ddp_backend(True) == "nccl" and devices.ddp_backend(False) == "gloo"
    # found again inside the text Ray wraps a worker's error in, which the CLI prints as its one line
    wrapped = RuntimeError(f"ray.exceptions.RayTaskError: Traceback ...\n  File x\nGPUNotVisible: {message}\n")
    assert devices.device_error_line(wrapped) == message

    monkeypatch.setenv(devices.CPU_UNDER_GPU_ENV, "1")
    assert devices.torch_device(1, "node n1 (host h)") == "cpu"
    assert devices.ddp_backend(True) == "gloo"
    monkeypatch.setattr(devices, "cuda_visible", lambda: True)
    assert devices.torch_device(1, "node n1 (host h)") == "cuda"


def test_serve_replica_device_outside_ray_is_the_cpu():
    from serving.models import replica_device

    assert replica_device() == "cpu"  # no Ray, no GPU assigned


# ------------------------------------------------------------------------------- on the cluster


def names_by_id(cluster) -> dict[str, str]:
    return {node_id: name for name, node_id in cluster.node_ids().items()}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-photos")
    done = subprocess.run(
        [str(BIN / "facediffuser"), "sample-photos", "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.slow
def test_cluster_has_a_head_and_two_gpu_nodes(gpu_cluster):
    info = {n["node_name"]: n for n in gpu_cluster.nodes_info() if n["state"] == "ALIVE"}
    assert set(info) == {"head", "gpu_node_a", "gpu_node_b"}
    assert info["head"]["is_head_node"] and not info["head"]["resources_total"].get("GPU")
    for name in ("gpu_node_a", "gpu_node_b"):
        assert info[name]["resources_total"]["GPU"] == 1 and info[name]["resources_total"][name] == 1
    assert len(set(gpu_cluster.node_ids().values())) == 3
    assert gpu_cluster.processes()  # the fixture's teardown checks that none is left after stop()


@pytest.mark.slow
def test_preprocess_gpu_stages_run_as_actor_pools_on_both_gpu_nodes(gpu_cluster, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-prep") / "data"
    # the test makes the GPU pool wait for both its actors before the first block, so each gets a share of
    # 12 photos (left alone, Ray Data starts them asynchronously and a fast first actor may take every block)
    done = submit(
        gpu_cluster,
        "python",
        "-m",
        "pipelines.preprocess",
        "--input",
        str(photos),
        "--output",
        str(out),
        "--num-gpus-per-stage",
        "1",
        "--detector",
        "mtcnn",
        env_vars={"RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "600"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["input"] == 12 and counts["input"] == counts["written"] + counts["rejected"]
    assert counts["written"] > 0 and manifest["cluster_gpus"] == 2
    gpu_pools = [s for s in manifest["stages"] if s["num_gpus"]]
    assert [p["stages"] for p in gpu_pools] == [["detect"]]  # MTCNN: the one GPU stage with template captions
    detect = gpu_pools[0]
    assert detect["actors"] == 2 and detect["num_gpus"] == 1
    ran_on = {n["node_name"]: n["rows"] for n in detect["nodes"]}
    assert set(ran_on) == {"gpu_node_a", "gpu_node_b"} and all(ran_on.values()), detect
    assert sum(ran_on.values()) == 12
    for pool in manifest["stages"]:
        assert pool.get("tasks") or pool.get("actors")
        assert sum(n["rows"] for n in pool["nodes"]) == 12  # every row went through every pool, somewhere
    pytest.shared_gpu_data = out  # the training test below reads these shards


@pytest.mark.slow
def test_train_use_gpu_places_one_worker_per_gpu_node(gpu_cluster, tmp_path_factory):
    data = getattr(pytest, "shared_gpu_data", None)
    if data is None:
        pytest.skip("needs the preprocessing test's shards")
    storage = tmp_path_factory.mktemp("gpu-runs")
    done = submit(
        gpu_cluster,
        "python",
        "-m",
        "pipelines.train",
        "--model",
        "tdm",
        "--tiny",
        "--data",
        str(data),
        "--storage",
        str(storage),
        "--name",
        "gpu",
        "--use-gpu",
        "--workers",
        "2",
        "--max-steps",
        "2",
        "--checkpoint-every",
        "2",
        "--batch-size",
        "1",
        "--resolution",
        "64",
        "--cpus-per-worker",
        "0.5",
        "--data-cpus",
        "0.25",
        "--max-failures",
        "0",
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "resources per model: 2 worker(s) × 0.5 CPU, 1 GPU" in output
    assert "DDP backend gloo" in output  # FACEDIFFUSER_CPU_UNDER_GPU=1: NCCL cannot start without CUDA
    line = next(text for text in output.splitlines() if text.startswith("tdm: 2 worker(s) on node(s)"))
    nodes = line.split("on node(s) ")[1].split(";")[0].split(", ")
    assert sorted(nodes) == ["gpu_node_a", "gpu_node_b"], line
    assert (storage / "gpu" / "final" / "tdm" / "unet").is_dir()


@pytest.mark.slow
def test_without_the_rehearsal_setting_a_gpu_stage_fails_with_one_line(gpu_cluster, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-fail") / "data"
    done = submit(
        gpu_cluster,
        "python",
        "-m",
        "pipelines.preprocess",
        "--input",
        str(photos),
        "--output",
        str(out),
        "--num-gpus-per-stage",
        "1",
        "--detector",
        "mtcnn",
        env_vars={devices.CPU_UNDER_GPU_ENV: "0"},
    )  # the job's setting wins over the nodes'
    assert done.returncode != 0
    errors = [
        text for text in (done.stdout + done.stderr).splitlines() if text.startswith("facediffuser preprocess: error:")
    ]
    # one line (`ray job submit` may echo the job's output twice: its log stream and its failure summary)
    assert len(set(errors)) == 1, (done.stdout + done.stderr)[-3000:]
    assert devices.NO_GPU_MARK in errors[0] and "given 1 GPU" in errors[0]
    assert any(node_id in errors[0] for node_id in names_by_id(gpu_cluster)), errors[0]
    assert not (out / "manifest.json").exists()
