"""`facediffuser demo`: the whole system end to end on a fresh machine, in a few minutes on 2 CPU cores.

1. sample photos: the bundled astronaut photo as one, two and three people (mirrored and tiled side by side)
2. preprocessing (pipelines.preprocess on Ray Data) → Parquet shards with linked subjects
3. training (pipelines.train on Ray Train): tiny TDM and SDM side by side for a few dozen steps
   (skipped with --model DIR: real weights)
4. serving (serving.app on Ray Serve, 127.0.0.1) and one real HTTP generate request with a reference photo
5. OUT/index.html showing the photos, the shards' manifest, the loss curves, the images and fusion masks

A Ray that is already initialised (e.g. a test session's) is reused and left running; otherwise the demo starts
one and shuts it down at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import time
import types
from dataclasses import dataclass
from pathlib import Path

from facediffuser.config import add_arguments as add_config_arguments
from facediffuser.config import arg, from_args
from facediffuser.model_dir import final_dir
from facediffuser.sample_photos import sample_photos
from pipelines.demo_page import PhaseClock, filter_summary, write_index
from pipelines.demo_serve import generate_over_http, serve_http_port

PROMPT = "a person <|image|> walking on the moon"
NAME = "demo"


@dataclass
class DemoConfig:
    out: str = arg("demo-output", "where the results go")
    model: str | None = arg(None, "real weights (a directory holding sdm/ and tdm/): skip training")
    steps: int = arg(24, "training steps per model")
    sample_steps: int = arg(20, "denoising steps of the generate request")
    num_images: int = arg(2, "images in the generate request (1 to 4)")
    resolution: int = arg(64, cli=False)  # training image side (tiny models)
    port: int = arg(0, "HTTP port of the Serve app (0: a free one)")
    num_cpus: int = arg(2, cli=False)  # of the local Ray the demo starts

    def validate(self) -> None:
        if self.model is not None and not Path(self.model).is_dir():
            raise FileNotFoundError(f"--model {self.model}: no such directory")
        for name in ("steps", "sample_steps", "num_images", "num_cpus"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 1 <= self.num_images <= 4:
            raise ValueError(f"--num-images must be 1 to 4, got {self.num_images}")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {self.out}: exists and is not a directory")


def demo(config: DemoConfig, verbose: bool = False) -> dict:
    """Run every phase; → paths of what was written and each phase's time. Validates first, cleans up Ray/Serve
    last."""
    config.validate()
    out = _fresh_output(config.out)
    started = time.perf_counter()
    clock = PhaseClock()
    app_name = f"facediffuser-{NAME}"
    with _ray_for_demo(config.num_cpus, verbose, app_name) as session:
        clock.start("photos", "sample photos: the astronaut as one, two and three people")
        photos = sample_photos(out / "photos")
        print(f"  {len(photos)} photos in {out / 'photos'} ({clock.stop():.1f} s)", flush=True)
        clock.start(
            "preprocess", "preprocessing on Ray Data: detect faces → person masks → captions → link nouns → Parquet"
        )
        manifest = _preprocess(out)
        print(f"  ({clock.stop():.1f} s) → {out / 'preprocessed'}", flush=True)
        model_dir, curves = _models(config, out, clock)
        images, masks, overlays, response_summary = _serve(config, out, session, app_name, clock)
        clock.start("page", "writing index.html")
        index = write_index(
            out,
            [
                ("1. Sample photos (input of preprocessing)", photos, ""),
                ("2. Preprocessing: rejects per filter", [], filter_summary(manifest)),
                ("The shards' manifest", [], json.dumps(manifest, indent=2)),
                ("3. Training: loss curves (TDM, SDM)", curves, "" if curves else f"training skipped: {model_dir}"),
                (f"4. Generated: “{PROMPT}”", images + overlays, json.dumps(response_summary["timings"], indent=2)),
                ("Fusion masks (a row per image, a column per fusion step)", masks, ""),
            ],
        )
        clock.stop()
    seconds = round(time.perf_counter() - started, 1)
    (out / "timings.json").write_text(json.dumps({"total_s": seconds, "phases_s": clock.seconds}, indent=2))
    return {
        "out": str(out),
        "index": str(index),
        "photos": [str(p) for p in photos],
        "shards": str(out / "preprocessed" / "shards"),
        "manifest": str(out / "preprocessed" / "manifest.json"),
        "model": model_dir,
        "curves": [str(c) for c in curves],
        "images": [str(p) for p in images],
        "masks": [str(p) for p in masks + overlays],
        "seconds": seconds,
        "phases": clock.seconds,
        "summary": clock.summary(),
    }


def _serve(config: DemoConfig, out: Path, session, app_name: str, clock: PhaseClock):
    """The serving phase: the Serve app up (Serve shut down at the end when the demo started it) and one HTTP
    generate request; → (images, mask grids, overlays, the response's summary)."""
    clock.start("serve", "serving on Ray Serve (127.0.0.1) and one HTTP generate request")
    session.own_serve = serve_http_port() is None
    images, masks, overlays, response_summary = generate_over_http(
        config.model and str(Path(config.model).resolve()) or final_dir(str(out / "runs" / NAME)),
        out,
        app_name,
        f"/{NAME}",
        config.port,
        PROMPT,
        config.num_images,
        config.sample_steps,
    )
    print(
        f"  {len(images)} image(s) in {response_summary['timings']['total_s']:.1f} s; identity scores "
        f"{response_summary.get('identity_scores')} ({clock.stop():.1f} s) → {out / 'generated'}",
        flush=True,
    )
    return images, masks, overlays, response_summary


def _fresh_output(directory: str) -> Path:
    out = Path(directory).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("photos", "preprocessed", "generated"):  # a rerun replaces the previous results
        shutil.rmtree(out / stale, ignore_errors=True)
    return out


@contextlib.contextmanager
def _ray_for_demo(num_cpus: int, verbose: bool, app_name: str):
    """The running Ray, or a local one started here and shut down at the end (also on errors and Ctrl-C). At the
    end the demo's Serve app is removed, or Serve shut down when the demo started it (`session.own_serve`)."""
    import ray
    from ray import serve

    from cluster.runtime import init_ray
    from cluster.stopping import shutdown_ray

    own_ray = not ray.is_initialized()
    session = types.SimpleNamespace(own_serve=False)
    try:
        init_ray(verbose, num_cpus=num_cpus, num_gpus=0)
        yield session
    finally:
        try:
            if ray.is_initialized():
                if session.own_serve:
                    serve.shutdown()
                else:
                    try:
                        serve.delete(app_name)
                    except Exception:
                        pass
        finally:
            if own_ray:
                shutdown_ray()  # and wait for its processes (kill stragglers of its session)


def _models(config: DemoConfig, out: Path, clock: PhaseClock) -> tuple[str, list[Path]]:
    """The training phase: tiny models trained here, or the given real weights; → (model dir, loss curves)."""
    if config.model:
        clock.start("train", f"training skipped: using the model in {config.model}")
        model_dir, curves = str(Path(config.model).resolve()), []
    else:
        clock.start("train", f"training tiny TDM and SDM side by side on Ray Train ({config.steps} steps each)")
        model_dir, curves = _train(config, out)
    print(f"  models in {model_dir} ({clock.stop():.1f} s)", flush=True)
    return model_dir, curves


def _preprocess(out: Path) -> dict:
    from facediffuser.data.preprocess_config import PreprocessConfig
    from pipelines import preprocess as preprocess_pipeline

    manifest = preprocess_pipeline.preprocess(
        PreprocessConfig(
            input=str(out / "photos"), output=str(out / "preprocessed"), resolution=256, batch_size=2, rows_per_shard=4
        )
    )
    counts = manifest["counts"]
    print(f"  {counts['input']} in, {counts['written']} written, {counts['rejected']} rejected", flush=True)
    if not counts["written"]:
        raise RuntimeError("preprocessing wrote no rows; see preprocessed/rejects/rejects.parquet")
    return manifest


def _train(config: DemoConfig, out: Path) -> tuple[str, list[Path]]:
    """Tiny TDM and SDM side by side, resources derived from the cluster; → (final model dir, loss curves)."""
    from facediffuser.training.metrics import loss_line
    from pipelines import train as train_pipeline
    from pipelines.train_config import TrainConfig

    base = TrainConfig(
        model="tdm",
        data=str(out / "preprocessed" / "shards"),
        storage=str(out / "runs"),
        name=NAME,
        tiny=True,
        resolution=config.resolution,
        batch_size=2,
        max_steps=config.steps,
        checkpoint_every=config.steps,
        keep_checkpoints=1,
        lr=1e-4,
        max_failures=0,
    )
    base.validate()
    configs = [base, TrainConfig(**{**base.__dict__, "model": "sdm"})]
    shutil.rmtree(out / "runs" / NAME, ignore_errors=True)  # a fresh run, not a resume of an old one
    summaries = train_pipeline.train(configs)
    train_pipeline.write_export_note(configs, None)
    for s in summaries:
        print(f"  {s['model']}: {s['steps']} steps, {loss_line(s)}", flush=True)
    return final_dir(str(out / "runs" / NAME)), [
        out / "runs" / NAME / which / "loss_curve.png" for which in ("tdm", "sdm")
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, DemoConfig)


STOPPED_LINE = "stopped; rerun the same command to run the demo again from the start"


def run(args: argparse.Namespace) -> int:
    from cluster.stopping import stoppable

    with stoppable(STOPPED_LINE):  # SIGTERM/SIGINT: Serve and the demo's Ray go down; a rerun starts over
        result = demo(from_args(DemoConfig, args), verbose=args.verbose)
    print(
        f"\ndemo finished in {result['seconds']:.0f} s ({result['summary']}). Open {result['index']}\n"
        f"  photos:       {Path(result['photos'][0]).parent}\n"
        f"  shards:       {result['shards']} (manifest: {result['manifest']})\n"
        f"  models:       {result['model']}\n"
        + "".join(f"  loss curve:   {c}\n" for c in result["curves"])
        + "".join(f"  image:        {p}\n" for p in result["images"])
        + "".join(f"  mask:         {p}\n" for p in result["masks"]),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    from facediffuser.cli import module_main

    module_main("demo")
