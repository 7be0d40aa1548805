"""`facediffuser preprocess` / `python -m pipelines.preprocess`: photos of people → Parquet shards, on Ray Data.

read + decode → detect faces → person masks → caption → link nouns → OUTPUT/shards/*.parquet,
OUTPUT/rejects/rejects.parquet and OUTPUT/manifest.json. Each stage is a library function on one image
(facediffuser/data/stages.py) wrapped here in a small map_batches class; model stages load their model once
per actor and run on an ActorPoolStrategy pool.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import pyarrow as pa

from facediffuser.data import io as dataio
from facediffuser.data import stages
from facediffuser.data.captions import TEMPLATE, check_captioner, make_captioner
from facediffuser.data.fastcomposer import convert_stage, list_fastcomposer_items
from facediffuser.data.faces import DETECTORS, make_detector
from facediffuser.data.masks import PersonSegmenter
from facediffuser.data.schema import REJECT_SCHEMA, SCHEMA_VERSION
from facediffuser.data.stages import PreprocessConfig, work_table
from facediffuser.manifest import package_versions

# Ray workers get these from the driver so that S3 (and an AWS_ENDPOINT_URL such as a local MinIO/moto) works
# the same in every stage, whatever environment the cluster was started with.
AWS_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_DEFAULT_REGION", "AWS_REGION")
TASK_CPUS = 0.1  # model-free stages (read/decode, template captions, linking) are light next to the models
ACTOR_CPU_SHARE = 0.8  # of the cluster's CPUs, split among the model-stage actors; the rest runs the tasks


# ------------------------------------------------------------------------------------ stage wrappers


class _ItemStage:
    """Runs `apply` on each item of a batch; items already rejected pass through untouched."""

    def apply(self, item: dict) -> dict:
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _map_items(batch, self.apply)


def _device(config: PreprocessConfig) -> str:
    return "cuda" if config.num_gpus_per_stage > 0 else "cpu"


class DetectFaces(_ItemStage):
    def __init__(self, config: PreprocessConfig):
        self.config = config
        self.detector = make_detector(config.detector, config.min_face_score, device=_device(config))

    def apply(self, item):
        return stages.detect_stage(item, self.detector, self.config)


class SegmentPersons(_ItemStage):
    def __init__(self, config: PreprocessConfig):
        self.segmenter = PersonSegmenter()

    def apply(self, item):
        return stages.segment_stage(item, self.segmenter)


class WriteCaptions(_ItemStage):
    def __init__(self, config: PreprocessConfig):
        self.captioner = make_captioner(config.captioner, device=_device(config))

    def apply(self, item):
        return stages.caption_stage(item, self.captioner)


# Model-free stages run as plain Ray tasks (nothing to load once per actor).


def _map_items(batch: pa.Table, function) -> pa.Table:
    return work_table([item if item["stage"] else function(item) for item in batch.to_pylist()])


def read_images(batch: pa.Table, config: PreprocessConfig) -> pa.Table:
    return _map_items(batch, lambda item: stages.read_stage(item, config))


def template_captions(batch: pa.Table, config: PreprocessConfig) -> pa.Table:
    return _map_items(batch, lambda item: stages.caption_stage(item, None))


def link_nouns(batch: pa.Table, config: PreprocessConfig) -> pa.Table:
    return _map_items(batch, stages.link_stage)


def convert_fastcomposer(batch: pa.Table, config: PreprocessConfig) -> pa.Table:
    return _map_items(batch, lambda item: convert_stage(item, config))


def to_shard_rows(batch: pa.Table) -> pa.Table:
    return stages.shard_table(batch.to_pylist())


# ---------------------------------------------------------------------------------------- the pipeline


def _runtime_env() -> dict:
    env = {name: os.environ[name] for name in AWS_VARIABLES if name in os.environ}
    return {"runtime_env": {"env_vars": env}} if env else {}


def build_dataset(items: list[dict], config: PreprocessConfig, cluster_cpus: float):
    """The lazy Ray Dataset of work rows (all stages applied; rejected rows carry stage + reason)."""
    import ray
    from ray.data import ActorPoolStrategy

    actors = config.actors_per_stage or max(1, int(cluster_cpus))
    model_stages = [DetectFaces, SegmentPersons] + ([WriteCaptions] if config.captioner != TEMPLATE else [])
    actor_cpus = ACTOR_CPU_SHARE * cluster_cpus / (actors * len(model_stages))
    remote = _runtime_env()
    common = dict(batch_format="pyarrow", batch_size=config.batch_size, **remote)

    def task_stage(ds, function):
        return ds.map_batches(function, fn_kwargs={"config": config}, num_cpus=TASK_CPUS, **common)

    def model_stage(ds, cls, uses_gpu: bool):
        return ds.map_batches(cls, fn_constructor_args=(config,), compute=ActorPoolStrategy(size=actors),
                              num_cpus=actor_cpus, num_gpus=config.num_gpus_per_stage if uses_gpu else 0, **common)

    rows = [{"id": i["id"], "source": i["source"], "caption_source": i["caption_source"] or ""} for i in items]
    blocks = max(1, min(len(rows), (len(rows) + config.batch_size - 1) // config.batch_size))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.map_batches(_as_work_rows, batch_format="pyarrow", num_cpus=TASK_CPUS, **remote)
    if config.source == "fastcomposer":
        return task_stage(ds, convert_fastcomposer)
    ds = task_stage(ds, read_images)
    # mediapipe's Python solutions run on the CPU; MTCNN and captioning models can use the GPU
    ds = model_stage(ds, DetectFaces, uses_gpu=config.detector == "mtcnn")
    ds = model_stage(ds, SegmentPersons, uses_gpu=False)
    if config.captioner != TEMPLATE:
        ds = model_stage(ds, WriteCaptions, uses_gpu=True)
    else:
        ds = task_stage(ds, template_captions)
    return task_stage(ds, link_nouns)


def _as_work_rows(batch: pa.Table) -> pa.Table:
    return work_table([stages.new_item(r["id"], r["source"], r["caption_source"] or None) for r in batch.to_pylist()])


def list_items(config: PreprocessConfig) -> list[dict]:
    items = (stages.list_image_items if config.source == "images" else list_fastcomposer_items)(config.input)
    if not items:
        kind = "image files" if config.source == "images" else "FastComposer samples (.jpg/.json)"
        raise ValueError(f"--input {config.input}: no {kind} found")
    return items


def check_config(config: PreprocessConfig) -> None:
    """Everything that can be wrong with the arguments, checked before any work starts."""
    config.validate()
    dataio.check_input_dir(config.input)
    dataio.check_output_dir(config.output)
    if config.source == "images":
        check_captioner(config.captioner)


def preprocess(config: PreprocessConfig) -> dict:
    """Run the pipeline on the current Ray cluster (started locally when none is). Returns the manifest."""
    import ray
    import pyarrow.parquet as pq

    check_config(config)
    items = list_items(config)
    started = time.time()
    if not ray.is_initialized():
        ray.init()
    cluster_cpus = ray.cluster_resources().get("CPU", 1.0)

    # a rerun replaces the previous output instead of adding rows beside it
    shards_uri, rejects_uri = dataio.join(config.output, "shards"), dataio.join(config.output, "rejects")
    dataio.remove_dir(shards_uri)
    dataio.remove_dir(rejects_uri)

    ds = build_dataset(items, config, cluster_cpus).materialize()
    statuses = ds.select_columns(["id", "source", "stage", "reason"]).take_all()
    rejected = [s for s in statuses if s["stage"]]
    written = len(statuses) - len(rejected)
    if written:
        ds.map_batches(to_shard_rows, batch_format="pyarrow", num_cpus=TASK_CPUS, **_runtime_env()).write_parquet(
            shards_uri, min_rows_per_file=min(written, config.rows_per_shard),
            max_rows_per_file=config.rows_per_shard, ray_remote_args={**_runtime_env(), "num_cpus": TASK_CPUS})
    fs, path = dataio.resolve(dataio.join(rejects_uri, "rejects.parquet"))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(pa.Table.from_pylist(sorted(rejected, key=lambda r: r["id"]), schema=REJECT_SCHEMA), path,
                   filesystem=fs)

    if len(statuses) != len(items):  # the accounting identity: every input is written or rejected
        raise RuntimeError(f"pipeline lost rows: {len(items)} in, {len(statuses)} out")
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "counts": stages.stage_counts(config.source, len(items), [r["stage"] for r in rejected]),
        "config": config.to_dict(),
        "cluster_cpus": cluster_cpus,
        "package_versions": package_versions(("facediffuser", "ray", "pyarrow", "numpy", "mediapipe",
                                              "facenet-pytorch", "torch", "transformers", "pillow")),
        "wall_time_s": round(time.time() - started, 3),
        "images_per_s": round(len(items) / max(time.time() - started, 1e-9), 3),
    }
    dataio.write_bytes(dataio.join(config.output, "manifest.json"), json.dumps(manifest, indent=2).encode())
    return manifest


# --------------------------------------------------------------------------------------------- the CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="directory or s3:// prefix of photos (or a FastComposer tree)")
    parser.add_argument("--output", required=True, help="directory or s3:// prefix for shards/, rejects/, manifest.json")
    parser.add_argument("--source", choices=stages.SOURCES, default="images",
                        help="images: run the models; fastcomposer: convert jpg+json+npy without models")
    parser.add_argument("--detector", choices=DETECTORS, default="mediapipe")
    parser.add_argument("--captioner", default=TEMPLATE,
                        help="'template' (default) or a transformers image-to-text model directory / hub id")
    parser.add_argument("--max-subjects", type=int, default=4, help="images with more faces are rejected")
    parser.add_argument("--resolution", type=int, default=512, help="short side of stored images (downscale only)")
    parser.add_argument("--num-gpus-per-stage", type=float, default=0.0,
                        help="GPUs per actor of the stages that use one (MTCNN, a captioner model)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per map_batches call")
    parser.add_argument("--actors-per-stage", type=int, default=None,
                        help="actors in each model stage's pool (default: the cluster's CPU count)")
    parser.add_argument("--rows-per-shard", type=int, default=1000)
    parser.add_argument("--max-pixels", type=int, default=stages.DEFAULT_MAX_PIXELS,
                        help="larger images are rejected before decoding")


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    return PreprocessConfig(input=args.input, output=args.output, source=args.source, detector=args.detector,
                            captioner=args.captioner, max_subjects=args.max_subjects, resolution=args.resolution,
                            num_gpus_per_stage=args.num_gpus_per_stage, batch_size=args.batch_size,
                            actors_per_stage=args.actors_per_stage, rows_per_shard=args.rows_per_shard,
                            max_pixels=args.max_pixels)


def run(args: argparse.Namespace) -> int:
    manifest = preprocess(config_from_args(args))
    counts = manifest["counts"]
    print(f"preprocess: {counts['input']} in, {counts['written']} written, {counts['rejected']} rejected "
          f"in {manifest['wall_time_s']:.1f} s → {args.output}")
    return 0


if __name__ == "__main__":
    from facediffuser.cli import module_main

    module_main("preprocess")
