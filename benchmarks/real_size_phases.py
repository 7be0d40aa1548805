"""benchmarks/real_size.py's phases, each run in a fresh child process (`real_size.py --phase NAME`): the pipeline,
a training step, saving the model directory, a Serve request; the memory measurements they share are in
benchmarks/real_size_memory.py. The heavy imports are inside the functions.
"""

from __future__ import annotations

import base64
import gc
import io
import json
import socket
import statistics
import time
from pathlib import Path

from benchmarks.real_size_memory import GIB, MemoryGuard, max_rss, nbytes, rss_now, tree_rss

PROMPT = "a woman <|image|> on the moon"


# ------------------------------------------------------------------------------------------------ helpers
def reference_photo():
    from PIL import Image
    from skimage.data import astronaut

    return Image.fromarray(astronaut())


# ------------------------------------------------------------------------------------------------ phases (children)
def phase_pipeline(a: dict) -> dict:
    import torch

    from facediffuser.models.sd15 import sd15_pipeline

    started = time.perf_counter()
    pipe = sd15_pipeline(seed=0, torch_dtype=getattr(torch, a["dtype"]))
    pipe.set_progress_bar_config(disable=True)
    build_s, rss_built = time.perf_counter() - started, rss_now()
    weights = nbytes(
        p
        for name in ("sdm_unet", "tdm_unet", "vae", "text_encoder", "subject_encoder")
        for p in getattr(pipe, name).parameters()
    )
    calls = unet_calls(pipe)  # UNet forward (start, end)
    marks: list[float] = []  # end of each denoising iteration
    begin = time.perf_counter()
    result = pipe(
        PROMPT,
        [reference_photo()],
        check_references=False,  # sampling timed alone: the reference checks run on the CPU, apart
        num_inference_steps=a["steps"],
        guidance_scale=5.0,
        alpha=0.3,
        beta=0.6,
        height=a["size"],
        width=a["size"],
        seed=0,
        output_type="pt",
        callback=lambda i, n: marks.append(time.perf_counter()),
    )
    end = time.perf_counter()
    assert torch.isfinite(result.images).all(), "non-finite pixels"
    # the first iteration timed from its first call
    steps = [end_ - start_ for start_, end_ in zip([calls[0][0], *marks[:-1]], marks)]
    unet_s = [e - s for s, e in calls]
    return {
        "build_s": build_s,
        "encode_s": calls[0][0] - begin,
        "step_s": steps,
        "s_per_step": statistics.mean(steps),
        "unet_calls": len(calls),
        "s_per_unet_call": statistics.median(unet_s),
        "decode_s": end - marks[-1],
        "total_s": end - begin,
        "boundaries": [result.start_merge_step, result.final_step],
        "weights_gib": weights / GIB,
        "rss_built_gib": rss_built / GIB,
        "peak_rss_gib": max_rss() / GIB,
    }


def unet_calls(pipe) -> list[tuple[float, float]]:
    """Hooks on both UNets; → the list each forward call appends its (start, end) perf_counter times to."""
    calls: list[tuple[float, float]] = []

    def pre(module, args):
        calls.append((time.perf_counter(), 0.0))

    def post(module, args, output):
        calls[-1] = (calls[-1][0], time.perf_counter())

    for unet in (pipe.tdm_unet, pipe.sdm_unet):
        unet.register_forward_pre_hook(pre)
        unet.register_forward_hook(post)
    return calls


def phase_train(a: dict) -> dict:
    import torch

    from facediffuser.models.sd15 import sd15_components
    from facediffuser.training.step import OptimConfig, TrainingModel, TrainStep, make_optimizer

    which = a["model"]
    started = time.perf_counter()
    parts = sd15_components(seed=0, share_unet=True)  # one UNet: the one this run trains
    if which == "tdm":
        parts.pop("subject_encoder")
    gc.collect()
    build_s = time.perf_counter() - started
    unet = parts["sdm_unet"]
    if a["checkpointing"]:
        unet.enable_gradient_checkpointing()
    optim = OptimConfig()  # AdamW as trained (METHOD.md §3); fp32 on a CPU (mixed precision applies on CUDA)
    model = TrainingModel(
        which,
        unet,
        parts["vae"],
        parts["text_encoder"],
        parts["scheduler"].config,
        parts.get("subject_encoder"),
        optim,
        seed=0,
    ).train()
    optimizer = make_optimizer(model, optim)
    step = TrainStep(model, optimizer, optim, torch.device("cpu"))
    batch = train_batch(which, a, parts["tokenizer"])
    rss_built = rss_now()
    times, losses = [], []
    for _ in range(a["steps"]):
        begin = time.perf_counter()
        losses.append(step(batch))
        times.append(time.perf_counter() - begin)
    return {"build_s": build_s, "step_s": times, "losses": losses, **train_memory(model, optimizer, rss_built)}


def train_batch(which: str, a: dict, tokenizer) -> dict:
    """One training batch of `a["batch_size"]` sample rows (the astronaut photo), every subject kept, no dropout."""
    import torch
    from skimage.data import astronaut

    from facediffuser.data.schema import to_table
    from facediffuser.training.data import DataConfig, ExampleBuilder
    from facediffuser.training.sample_rows import sample_records

    builder = ExampleBuilder(
        DataConfig(
            which,
            resolution=a["resolution"],
            object_resolution=224,
            subject_keep_prob=1.0,
            uncondition_prob=0.0,
            caption_dropout_prob=0.0,
        ),
        tokenizer,
        seed=0,
    )
    batch = {k: torch.from_numpy(v) for k, v in builder(to_table(sample_records(a["batch_size"], astronaut()))).items()}
    return batch


def train_memory(model, optimizer, rss_built: int) -> dict:
    """The training phase's memory parts: weights (trained/frozen), gradients, AdamW's moments (read from the
    optimizer) and the rest of the peak."""
    import torch

    trained = model.trainable_parameters()
    trained_ids = {id(p) for p in trained}
    frozen = [p for p in model.parameters() if id(p) not in trained_ids]
    moments = nbytes(
        t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t) and t.dim() > 0
    )
    peak = max_rss()
    parts_bytes = {
        "trained_weights": nbytes(trained),
        "frozen_weights": nbytes(frozen),
        "grads": nbytes(trained),
        "adamw_moments": moments,
    }
    return {
        "rss_built_gib": rss_built / GIB,
        "peak_rss_gib": peak / GIB,
        "trained_params": sum(p.numel() for p in trained),
        "frozen_params": sum(p.numel() for p in frozen),
        **{k + "_gib": v / GIB for k, v in parts_bytes.items()},
        # what the peak holds beyond the process at rest (imports, tokenizer, batch) + weights, grads and moments:
        # activations kept for backward, recomputation, temporaries, the allocator's slack
        "rest_gib": (peak - rss_built - parts_bytes["grads"] - moments) / GIB,
    }


def phase_save_model(a: dict) -> dict:
    import torch

    from facediffuser.models.sd15 import sd15_pipeline

    started = time.perf_counter()
    pipe = sd15_pipeline(seed=0, torch_dtype=getattr(torch, a["dtype"]))
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    pipe.save_pretrained(a["model_dir"])
    size = sum(f.stat().st_size for f in Path(a["model_dir"]).rglob("*") if f.is_file())
    return {
        "build_s": build_s,
        "save_s": time.perf_counter() - started,
        "disk_gib": size / GIB,
        "peak_rss_gib": max_rss() / GIB,
    }


def phase_serve(a: dict, guard: MemoryGuard) -> dict:
    import httpx
    import ray
    from ray import serve

    from serving.app import start

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    buffer = io.BytesIO()
    reference_photo().save(buffer, format="PNG")
    config = serve_config(a, port)
    ray.init(address="local", num_cpus=a["threads"], num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        started = time.perf_counter()
        url = start(config)
        start_s = time.perf_counter() - started
        time.sleep(2)
        resident = tree_rss(guard.process)
        guard.peak = 0  # from here: the request's peak
        body = request_body(a, buffer.getvalue())
        started = time.perf_counter()
        response = httpx.post(url + "/v1/generate", json=body, timeout=None)
        request_s = time.perf_counter() - started
        if response.status_code != 200:
            raise RuntimeError(f"generate answered {response.status_code}: {response.text[:500]}")
        answer = response.json()
        return {
            "start_s": start_s,
            "request_s": request_s,
            "timings": answer["timings"],
            "tree_rss_resident_gib": resident / GIB,
            "tree_rss_request_peak_gib": guard.peak / GIB,
        }
    finally:
        serve.shutdown()
        ray.shutdown()


def serve_config(a: dict, port: int):
    """One replica per deployment, no CPU reservations, no batching."""
    from serving.settings import ServeConfig

    return ServeConfig(
        model=a["model_dir"],
        port=port,
        app_name="facediffuser-real-size",
        dtype=a["dtype"],
        num_cpus=0,
        encoder_num_cpus=0,
        ingress_num_cpus=0,
        torch_threads=a["threads"],
        min_replicas=1,
        max_replicas=1,
        max_batch_size=1,
    )


def request_body(a: dict, reference_png: bytes) -> dict:
    """The one generate request: the reference photo, one image at the phase's size and steps."""
    return {
        "prompt": PROMPT,
        "references": [base64.b64encode(reference_png).decode()],
        "seed": 0,
        "steps": a["steps"],
        "width": a["size"],
        "height": a["size"],
        "guidance_scale": 5.0,
        "alpha": 0.3,
        "beta": 0.6,
        "identity_scores": False,
    }


def run_phase(argv_phase: str, values: dict) -> int:
    """Child: run one phase, write its result JSON to values['out']."""
    import torch

    torch.set_num_threads(values["threads"])
    guard = MemoryGuard(values["memory_limit_gb"])
    phase = {"pipeline": phase_pipeline, "train": phase_train, "save-model": phase_save_model}.get(argv_phase)
    result = phase_serve(values, guard) if argv_phase == "serve" else phase(values)
    Path(values["out"]).write_text(json.dumps(result))
    return 0
