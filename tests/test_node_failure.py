"""A node dies (issue 23, item 1): in preprocessing, training and serving, on ONE multi-node cluster on this machine
(cluster/local.py): a head (2 CPUs, no GPU) and three worker nodes with 1 CPU and 1 logical GPU each
(FACEDIFFUSER_CPU_UNDER_GPU=1: CPU kernels under them). Each test kills one worker node (SIGKILL of its raylet:
what a node failure looks like to Ray) in the middle of its work and checks what the user gets; then a fresh worker
node joins (`add_node`), so the next test again has three. The tests run in order and share the cluster (one start
for the module): preprocess → its shards are the training data → serve.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from cluster_fixtures import submit

from cluster.local import LocalCluster, NodeSpec

BIN = Path(sys.executable).parent
_spare = iter("defghijk")


def gpu_node(name: str) -> NodeSpec:
    return NodeSpec(name, num_cpus=1, num_gpus=1, resources={name: 1})


@pytest.fixture(scope="module")
def cluster():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is a folder of scripts
    from benchmarks.node_failure import cluster_env

    # every worker node's Serve proxy on a port of its own: clients reach the head's (benchmarks/node_failure.py)
    cluster = LocalCluster(head_cpus=2, workers=[gpu_node(f"gpu_node_{x}") for x in "abc"], env=cluster_env())
    with cluster:
        yield cluster
    assert not cluster.processes(), "processes of the cluster left after stop"


def replace_node(cluster: LocalCluster, dead: str) -> str:
    """A new worker node joins for the one that died (the next test needs three GPU nodes again)."""
    name = f"gpu_node_{next(_spare)}"
    cluster.add_node(gpu_node(name))
    assert dead not in cluster.node_ids()
    return name


def job(cluster: LocalCluster, command: list[str], result: dict) -> threading.Thread:
    thread = threading.Thread(target=lambda: result.update(done=submit(cluster, *command)))
    thread.start()
    return thread


def wait_until(ready, what: str, timeout: float, thread: threading.Thread | None = None, result: dict | None = None):
    deadline = time.monotonic() + timeout
    while not ready():
        if thread is not None and not thread.is_alive():
            done = result["done"]
            raise AssertionError(f"the job ended before {what}: {(done.stdout + done.stderr)[-3000:]}")
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.5)


# ----------------------------------------------------------------------------------------------- preprocess


def test_sweep_leaves_only_the_counted_shard_files(tmp_path):
    """What a node that died mid-block leaves, and what the driver's sweep removes: the hidden partial file of a
    write cut short, and a whole file of a block whose statuses never came back (it ran again elsewhere, bundled
    differently); the counted files and another run's files stay. No Ray."""
    from pipelines.preprocess_workers import SHARD, ShardWriter, sweep_shards

    shards = tmp_path / "shards"
    writer = ShardWriter(str(shards), "run1")
    statuses = writer([{"id": "a", "source": "a", "stage": "detect", "reason": "no face"}]).to_pylist()
    assert statuses[0][SHARD] is None and not shards.exists()  # a reject: no file
    shards.mkdir()
    counted = "run1_0000.parquet"
    for name in (counted, "run1_1111.parquet", ".run1_2222.parquet.abcd1234.partial", "run0_3333.parquet"):
        (shards / name).write_bytes(b"x")
    removed = sweep_shards(str(shards), "run1", {counted})
    assert removed == [".run1_2222.parquet.abcd1234.partial", "run1_1111.parquet"]
    assert sorted(p.name for p in shards.iterdir()) == ["run0_3333.parquet", counted]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """48 photos: the 12 of `facediffuser sample-photos`, four times under other names (ids are relative paths)."""
    one = tmp_path_factory.mktemp("one")
    done = subprocess.run(
        [str(BIN / "facediffuser"), "sample-photos", "--out", str(one)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    out = tmp_path_factory.mktemp("photos")
    for copy in range(4):
        for path in sorted(one.iterdir()):
            shutil.copy(path, out / f"c{copy}_{path.name}")
    return out


@pytest.mark.slow
def test_preprocess_node_dies_mid_run_every_input_once(cluster, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "data"
    shards = out / "shards"
    result: dict = {}
    # two rows per block: 24 blocks over the five CPUs of the cluster, one shard file each
    thread = job(
        cluster,
        [
            "python",
            "-m",
            "pipelines.preprocess",
            "--input",
            str(photos),
            "--output",
            str(out),
            "--rows-per-shard",
            "2",
            "--batch-size",
            "2",
        ],
        result,
    )
    try:
        wait_until(
            lambda: shards.is_dir() and any(p.suffix == ".parquet" for p in shards.iterdir()),
            "the first shard file",
            600,
            thread,
            result,
        )
        cluster.kill_node("gpu_node_a")
        killed = time.monotonic()
    finally:
        thread.join(timeout=900)
    done = result["done"]
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    print(f"preprocess finished {time.monotonic() - killed:.0f} s after gpu_node_a died")

    manifest = json.loads((out / "manifest.json").read_text())
    inputs = sorted(p.name for p in photos.iterdir())
    counts = manifest["counts"]
    assert counts["input"] == len(inputs) == counts["written"] + counts["rejected"], counts
    written = [i for f in sorted(shards.glob("*.parquet")) for i in pq.read_table(f, columns=["id"])["id"].to_pylist()]
    rejected = pq.read_table(out / "rejects" / "rejects.parquet", columns=["id"])["id"].to_pylist()
    assert len(written) == len(set(written)) == counts["written"], "an id written twice (across shards)"
    assert len(rejected) == len(set(rejected)) == counts["rejected"]
    assert not set(written) & set(rejected), "an id both written and rejected"
    assert sorted(written + rejected) == inputs, "an input lost"
    assert not [p.name for p in shards.iterdir() if p.name.startswith(".")], "a partial shard file left"
    assert {e["file"] for e in manifest["shards"]} == {p.name for p in shards.glob("*.parquet")}
    pytest.node_failure_data = out
    replace_node(cluster, "gpu_node_a")


# ----------------------------------------------------------------------------------------------- train


@pytest.mark.slow
def test_train_node_dies_run_resumes_from_last_checkpoint_and_finishes(cluster, tmp_path_factory):
    data = getattr(pytest, "node_failure_data", None)
    if data is None:
        pytest.skip("needs the preprocessing test's shards")
    storage = tmp_path_factory.mktemp("runs")
    every, steps = 2, 16
    run_dir = storage / "nf" / "tdm"
    result: dict = {}
    thread = job(
        cluster,
        [
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
            "nf",
            "--use-gpu",
            "--workers",
            "2",
            "--max-steps",
            str(steps),
            "--checkpoint-every",
            str(every),
            "--batch-size",
            "1",
            "--resolution",
            "64",
            "--cpus-per-worker",
            "0.5",
            "--data-cpus",
            "0.25",
            "--max-failures",
            "1",
        ],
        result,
    )
    try:
        # where a worker runs is asked first (the state API takes seconds here), so the kill follows the checkpoint
        nodes: list = []
        wait_until(lambda: nodes.extend(worker_nodes(cluster)) or nodes, "the train workers", 900, thread, result)
        wait_until(lambda: checkpoint_steps(run_dir), "the first checkpoint", 900, thread, result)
        before = checkpoint_steps(run_dir)[-1]
        # Ray Train's controller registers a reported checkpoint at its next poll (every 2 s): a node lost before
        # that restarts from the one before. Give it three polls, then the node dies.
        time.sleep(6)
        victim = nodes[0]
        cluster.kill_node(victim)
    finally:
        thread.join(timeout=1200)
    done = result["done"]
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    resumed = [
        int(line.rsplit(" ", 1)[1])
        for line in output.splitlines()
        if "tdm: resuming from the checkpoint at step" in line
    ]
    # from the last checkpoint (at least the one seen on disk when the node died): at most `every` steps lost
    assert resumed and resumed[0] >= before and resumed[0] % every == 0 and resumed[0] < steps, output[-4000:]
    assert "restarts 1" in output, output[-3000:]
    with open(run_dir / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(float(r["step"])) for r in rows] == list(range(1, steps + 1)), "a step missing or repeated"
    # the steps after the checkpoint the run resumed from were done again by the restarted attempt
    assert {int(float(r["attempt"])) for r in rows if int(float(r["step"])) > resumed[0]} == {1}
    line = next(text for text in output.splitlines() if text.startswith("tdm: 2 worker(s) on node(s)"))
    assert victim not in line, line  # the restarted group ran on the nodes left
    assert (storage / "nf" / "final" / "tdm" / "unet").is_dir()
    print(f"killed {victim} after checkpoint {before}; resumed from {resumed[0]}; {line}")
    replace_node(cluster, victim)


def checkpoint_steps(run_dir: Path) -> list[int]:
    """The steps of the checkpoint folders (`checkpoint_00000004`) in a run directory, in order; Ray Train also
    writes its `checkpoint_manager_snapshot.json` there, which is not one."""
    if not run_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in run_dir.iterdir() if (m := re.fullmatch(r"checkpoint_(\d+)", p.name)))


def worker_nodes(cluster: LocalCluster) -> list[str]:
    """The names of the nodes running a Ray Train worker (a RayTrainWorker actor)."""
    names = {node_id: name for name, node_id in cluster.node_ids().items()}
    done = cluster._ray(
        "list",
        "actors",
        "--address",
        cluster.dashboard_url,
        "--format",
        "json",
        "--detail",
        "--filter",
        "state=ALIVE",
        "--limit",
        "1000",
    )
    return sorted(
        {
            names.get(a["node_id"])
            for a in json.loads(done.stdout or "[]")
            if "RayTrainWorker" in (a.get("class_name") or "")
        }
        - {None, "head"}
    )


# ----------------------------------------------------------------------------------------------- serve


@pytest.mark.slow
def test_serve_sampler_node_dies_under_load_503_with_retry_after_and_replica_back(cluster, tmp_path):
    from benchmarks.node_failure import node_failure, table

    figures = node_failure(
        cluster,
        tmp_path,
        concurrency=4,
        kill_after_s=10,
        after_s=8,
        request_timeout_s=120,
        recovery_limit_s=240,
        log=print,
    )
    answers = figures.pop("answers")
    serve_output = figures.pop("serve_output")
    print(table(figures))
    assert figures["serve_exit"] == 0, serve_output[-3000:]
    assert figures["recovery_s"] is not None, f"the sampler was not back to two replicas: {figures}"
    assert set(figures["sampler_nodes_after"]) and figures["victim"] not in figures["sampler_nodes_after"]
    bad = [(round(a.sent, 1), round(a.done, 1), a.status, a.error) for a in answers if a.status not in (200, 503)]
    assert not bad, f"answers other than 200 and 503 (500: a server fault; -1: no answer in time): {bad}"
    unavailable = [a for a in answers if a.status == 503]
    assert all(a.retry_after and a.error == "unavailable" for a in unavailable), figures
    assert sum(a.status == 200 for a in answers if a.sent > figures["killed_at_s"] + figures["recovery_s"]) > 0
